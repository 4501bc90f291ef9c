"""Checkpoint and resume on 2 processes: a job stopped after step k and resumed repeats the uninterrupted
2-process run — every logged number, each process's own loss, the final weights on both processes —
and in every run only process 0 writes logs, samples, weights and the run's config (process 1 writes
its RNG state into the checkpoint, nothing else), while both run the evaluation's forwards.

One ``torchrun --nproc_per_node 2`` (gloo on the CPU) runs the three ``train()`` calls in one job
(tests/train/_distributed_resume_worker.py): KTO, whose reference point z is all-reduced every step, so
a process that resumed out of step with the other would hang or change the numbers.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from _runs import torchrun_two, train_rows, worker_module


pytestmark = pytest.mark.usefixtures("one_torch_thread")

worker = worker_module("_distributed_resume_worker")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU-less launch path: gloo processes on the CPU")
def test_two_process_resume_repeats_the_uninterrupted_run_and_only_process_0_writes(tmp_path):
    torchrun_two("_distributed_resume_worker", tmp_path)
    rec = {(name, r): json.loads((tmp_path / f"{name}-rank{r}.json").read_text())
           for name in ("straight", "stopped", "resumed") for r in (0, 1)}
    steps, stop = worker.STEPS, worker.STOP

    # the log: the stopped run's rows, then the resumed run's, are the uninterrupted run's, number for number
    straight, resumed = train_rows(tmp_path / "straight"), train_rows(tmp_path / "resumed")
    assert [int(r["step"]) for r in straight] == [int(r["step"]) for r in resumed] == list(range(1, steps + 1))
    numbers = [k for k in straight[0] if k not in ("step", "pairs_per_s", "peak_mem_mb", "time")]
    assert {"loss", "grad_norm", "reference_point", "model_err", "ref_err"} <= set(numbers)
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in numbers} == {k: b[k] for k in numbers}, f"step {a['step']}"
    # the processes' own losses: different halves of the batch, the same in both runs, step for step
    for r in (0, 1):
        own = {**rec["stopped", r]["losses"], **rec["resumed", r]["losses"]}
        assert list(rec["stopped", r]["losses"]) == [str(s) for s in range(1, stop + 1)]
        assert list(rec["resumed", r]["losses"]) == [str(s) for s in range(stop + 1, steps + 1)]
        assert own == rec["straight", r]["losses"], f"rank {r}"
    assert rec["straight", 0]["losses"][str(steps)] != rec["straight", 1]["losses"][str(steps)]

    # the weights: equal on both processes, and equal to the uninterrupted run's; and they moved
    initial = worker.build_tiny_model(sample_size=8).denoiser.state_dict()
    final = {(name, r): torch.load(tmp_path / f"{name}-rank{r}.pt") for name in ("straight", "resumed") for r in (0, 1)}
    for key, weights in final.items():
        assert weights.keys() == final["straight", 0].keys()
        assert all(torch.equal(v, final["straight", 0][k]) for k, v in weights.items()), key
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in final["straight", 0].items())
    assert all(torch.equal(final["straight", 0][k], v) for k, v in initial.items() if k in final["straight", 0])

    # who writes what: process 0 the logs, samples, weights, config and checkpoints; process 1 its RNG state.
    # Who computes: both run the evaluation's forwards (a sharded model needs every rank in each forward)
    for name in ("straight", "stopped", "resumed"):
        assert rec[name, 0]["forwards"] == rec[name, 1]["forwards"] > 0, name
        zero, one = set(rec[name, 0]["written"]), rec[name, 1]["written"]
        assert {"logs/train.csv", "run_config.json", "pytorch_lora_weights.safetensors"} <= zero, name
        assert any(p.startswith("samples/") for p in zero), name
        assert any(re.fullmatch(r"\.tmp-checkpoint-\d+/adapter_model\.safetensors", p) for p in zero), name
        assert one, f"{name}: process 1 saved no RNG state"
        for path in one:
            assert re.fullmatch(r"\.tmp-checkpoint-\d+/random_states_1\.pkl", path), f"{name}: process 1 wrote {path}"
    # the resumed run wrote checkpoints after the one it resumed from, not that one again
    assert {p.split("/")[0] for p in rec["resumed", 1]["written"]} == {f".tmp-checkpoint-{s}"
                                                                       for s in range(stop + 1, steps + 1)}
