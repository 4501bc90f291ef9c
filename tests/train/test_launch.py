"""Launching: every process a launcher starts joins one job (or the run stops and says how), and the
start line says how many there are before anything slow happens.

The two-process tests start a real ``torchrun`` / ``accelerate launch --multi_gpu`` on this machine's
CPU (gloo) with tests/train/_launch_worker.py: a tiny model, one epoch of three steps.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from _runs import free_port

from fastpref.train import launch
from fastpref.train.launch import build_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "train", "_launch_worker.py")


LAUNCHERS = {
    "torchrun": lambda: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                         "--master_port", str(free_port())],
    "accelerate-multi_gpu": lambda: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                     "--main_process_port", str(free_port())],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU-less launch path: gloo processes on the CPU")
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_are_one_job(tmp_path, launcher):
    out, record = tmp_path / "run", tmp_path / "record"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, *LAUNCHERS[launcher](), WORKER, str(out), str(record)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # the start line and the closing summary: once each (process 0 prints), the start with the process count
    starts = [line for line in proc.stdout.splitlines()
              if line.startswith("fastpref-train: ") and not line.startswith("fastpref-train: done")]
    assert len(starts) == 1, log[-4000:]
    assert sum(line.startswith("fastpref-train: done") for line in proc.stdout.splitlines()) == 1, log[-4000:]
    assert re.match(r"fastpref-train: 2 processes \(MULTI_CPU, gloo\) on cpu", starts[0]), starts[0]

    ranks = [json.loads((record / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [3, 3]

    # disjoint data: one epoch of 12 training pairs (2 held out), 3 batches of 2 per process, each pair once
    read = [r["train_read"] for r in ranks]
    assert [len(x) for x in read] == [6, 6]
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == list(range(12))

    # the logged loss is the mean over processes of each process's own loss
    with open(out / "logs" / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for row in rows:
        own = [r["losses"][row["step"]] for r in ranks]
        assert float(row["loss"]) == pytest.approx((own[0] + own[1]) / 2, rel=1e-6, abs=1e-7)
    # at step 1 policy = reference (LoRA's B starts at 0), so every pair has the same loss; later the
    # processes' losses differ and the mean above is not trivially either of them
    assert all(ranks[0]["losses"][s] != ranks[1]["losses"][s] for s in ("2", "3"))

    # one set of outputs, written by process 0; process 1 writes only its own RNG state in the checkpoint
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["num_processes"] == 2
    assert {"logs/train.csv", "run_config.json", "pytorch_lora_weights.safetensors"} <= set(ranks[0]["written"])
    assert any(p.startswith("samples/") for p in ranks[0]["written"])
    assert ranks[1]["written"], "process 1 saved no RNG state"
    for path in ranks[1]["written"]:
        assert re.fullmatch(r"\.tmp-checkpoint-2/random_states_1\.pkl", path), f"process 1 wrote {path}"
    assert sorted(os.listdir(out / "checkpoint-2")) == sorted(
        ["adapter_model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl",
         "trainer_state.json"])


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_processes_accelerate_does_not_join_are_refused(monkeypatch):
    """If the launcher started N processes but accelerate set up fewer, each would train alone into the
    same folder: stop, naming the command that works."""
    monkeypatch.setattr(launch, "launched_processes", lambda: 2)
    refused = r"2 processes were launched but accelerate set up 1 .*torchrun --nproc_per_node N"
    with pytest.raises(ValueError, match=refused):
        build_accelerator()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_accelerate_launch_cpu_says_it_runs_one_process(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process (it sets ACCELERATE_USE_CPU and
    MASTER_ADDR, no WORLD_SIZE): the run goes on, with a warning naming the command for two."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match=r"one process: `accelerate launch --cpu`.*torchrun --nproc_per_node N"):
        accelerator = build_accelerator()
    assert accelerator.num_processes == 1


def test_the_start_line_comes_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """Processes, device, model, loss, data and skips are on the console before anything slow starts."""
    from fastpref.train import TrainConfig, loop, train

    def load_model(*args, **kwargs):
        raise RuntimeError("the model is being loaded")

    monkeypatch.setattr(loop, "load_model", load_model)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), synthetic_size=8, eval_pairs=2, train_batch_size=2,
                      gradient_accumulation_steps=3, lora_rank=4, loss="dmpo", report_to="csv")
    with pytest.raises(RuntimeError, match="the model is being loaded"):
        train(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"fastpref-train: 1 process on (cpu|cuda\S*); model fastpref:tiny-unet \(LoRA r=4, reference adapter_off\); "
        r"loss dmpo; data synthetic: 6 training pairs, 2 held out, skipped: none; 6 pairs per update "
        rf"\(2 × 3 accumulated × 1\); output {re.escape(cfg.output_dir)}", lines[0]), lines[0]
