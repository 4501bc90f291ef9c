"""Distributed correctness: one job of 2 processes × B pairs trains exactly what 1 process × 2B pairs
trains (dpo, dmpo, kto; kto on unpaired images too), to within fp32 summation order.

One ``torchrun --nproc_per_node 2`` (gloo on the CPU) trains the runs in sequence, each a ``train()``
call in the same job (tests/train/_distributed_worker.py); the test process trains them with 2B pairs
per batch. Which process writes what is tested in test_launch.py and test_distributed_resume.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from _runs import torchrun_two, train_rows, worker_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

worker = worker_module("_distributed_worker")

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU-less launch path: gloo processes on the CPU")
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_two_processes_train_what_one_process_trains_on_the_global_batch(tmp_path):
    """Per loss, after 2 optimizer steps: the same weights, the same logged loss and gradient norm, and
    for KTO every process's reference point z equal to the one-process z of the global batch.

    Tolerance (fp32, eps = 2⁻²³): both runs add the same per-pair terms in another order (two
    half-batches, gloo's sum, /2), so each per-sample error e differs by ≲ 2·eps·e and a margin
    u = −½β·(Δθ − Δref) of four errors by δu ≤ 4·β·eps·max e (β ≤ 5000 here: ≈ 2.6e-3). The losses'
    slopes are ≤ 1 in u and their log-slopes ≤ 1 (σ(±u)), so the loss moves by ≤ δu and the gradient by
    ρ = δu relative. Adam's step lr·ĝ/(|ĝ| + ε) moves by ≤ lr·ρ·|g|/(|g| + ε)² ≤ lr·ρ/4 (ε = 1), so after
    the steps the weights differ by ≤ steps·lr·ρ/4 plus their own rounding. z is a mean of
    e_ref − e_θ: ≤ 8·eps·max e apart."""
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun_two("_distributed_worker", two)
    worker.train_all(str(one), 2 * worker.PAIRS_PER_PROCESS)

    for loss in worker.RUNS:  # a run's name (its loss, or kto_unpaired)
        cfg = worker.config(loss, "", 1)
        rows2, rows1 = train_rows(two / loss), train_rows(one / loss)
        assert [int(r["step"]) for r in rows2] == [int(r["step"]) for r in rows1] == list(range(1, worker.STEPS + 1))
        e_max = max(float(r[k]) for r in rows1 for k in r if "err" in k)
        du = 4 * 5000.0 * EPS32 * e_max  # β = 5000, the largest of the three losses' defaults
        for r2, r1 in zip(rows2, rows1):
            what = f"{loss} step {r1['step']}"
            assert float(r2["loss"]) == pytest.approx(float(r1["loss"]), rel=0, abs=du), what
            assert float(r2["grad_norm"]) == pytest.approx(float(r1["grad_norm"]), rel=du, abs=0), what

        w2, w1 = torch.load(two / loss / "denoiser.pt"), torch.load(one / loss / "denoiser.pt")
        assert w2.keys() == w1.keys()
        atol = worker.STEPS * cfg.learning_rate * du / 4 + 2 * EPS32 * max(v.abs().max().item() for v in w1.values())
        for name, v in w1.items():
            torch.testing.assert_close(w2[name], v, rtol=0, atol=atol, msg=f"{loss}: {name}")
        initial = worker.build_tiny_model(sample_size=8).denoiser.state_dict()
        moved = max((v - initial[k]).abs().max().item() for k, v in w1.items() if k in initial)
        if cfg.lora_rank:  # LoRA: the adapters moved (they are not in the initial model)
            moved = max(moved, max(v.abs().max().item() for k, v in w1.items() if "lora_B" in k))
        assert moved > 100 * atol, f"{loss}: the weights hardly moved ({moved:.2e}); the comparison would not bite"

        if cfg.loss == "kto":
            dz = 8 * EPS32 * e_max
            z1 = json.loads((one / loss / "z-0.json").read_text())["z"]
            last = str(worker.STEPS)
            for rank in (0, 1):
                z2 = json.loads((two / loss / f"z-{rank}.json").read_text())
                assert z2["z"].keys() == z1.keys()
                for step, z in z1.items():
                    assert z2["z"][step] == pytest.approx(z, rel=0, abs=dz), f"kto z, rank {rank}, step {step}"
                # the test bites: this process's own samples have another reference point
                assert abs(z2["z_local"][last] - z1[last]) > 10 * dz, f"rank {rank}: z_local = z, choose another seed"
