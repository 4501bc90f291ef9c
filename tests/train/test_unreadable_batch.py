"""A process whose whole micro-batch is unreadable, in a job of two: the job neither hangs nor learns from
the stand-in pair it runs in its place.

Each process must run the step's forward and backward — DDP's gradient buckets, KTO's all-reduce of z and
the logged statistics are collectives — so that process runs a readable training pair at zero weight. One
``torchrun --nproc_per_node 2`` (gloo on the CPU) trains DPO and KTO for one step with process 1's first
micro-batch made unreadable (tests/train/_unreadable_worker.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from _runs import torchrun_two, train_rows, worker_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

worker = worker_module("_unreadable_worker")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU-less launch path: gloo processes on the CPU")
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_process_with_an_unreadable_micro_batch_neither_hangs_nor_trains_on_its_stand_in(tmp_path):
    """The job finishes; the unreadable rows are counted in the job's log though process 0 read none; and
    (DPO) the weights and the logged statistics are those of process 0's micro-batch alone: one process on the
    same B pairs at half the learning rate (DDP averages process 0's gradient with process 1's zero, and
    with Adam's ε ≫ |g| the step is linear in the gradient), to within fp32 rounding."""
    two = tmp_path / "two"
    torchrun_two("_unreadable_worker", two, timeout=300)
    for loss in worker.RUNS:
        rows = train_rows(two / loss)
        assert [int(r["step"]) for r in rows] == list(range(1, worker.STEPS + 1)), loss
        assert int(rows[-1]["corrupt_images"]) == worker.PAIRS, loss  # process 1's rows, in process 0's log

    one = tmp_path / "one" / "dpo"
    worker.run("dpo", str(one), batch_size=worker.PAIRS, learning_rate=0.5e-2, unreadable=0)
    rows2, rows1 = train_rows(two / "dpo"), train_rows(one)
    logged = json.loads((two / "dpo" / "losses.json").read_text())
    assert float(rows2[0]["loss"]) == pytest.approx(logged[0], rel=1e-6)  # process 0's loss, not a mean with the stand-in
    assert float(rows2[0]["loss"]) == pytest.approx(float(rows1[0]["loss"]), rel=1e-6)
    for k in ("model_err_win", "model_err_lose", "ref_err_win"):  # per-pair values (at step 1 the loss is ln 2 for all)
        assert float(rows2[0][k]) == pytest.approx(float(rows1[0][k]), rel=1e-5), k
    w2, w1 = torch.load(two / "dpo" / "denoiser.pt"), torch.load(one / "denoiser.pt")
    initial = worker.build_tiny_model(sample_size=8).denoiser.state_dict()
    moved = max((v - initial[k]).abs().max().item() for k, v in w1.items())
    for name, v in w1.items():
        torch.testing.assert_close(w2[name], v, rtol=1e-4, atol=1e-3 * moved, msg=name)
    assert moved > 0
