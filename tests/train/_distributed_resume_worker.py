"""Checkpoint and resume in a job of several processes, for tests/train/test_distributed_resume.py.

    torchrun --nproc_per_node 2 tests/train/_distributed_resume_worker.py RECORD_DIR

Three ``train()`` calls in one job: ``straight`` (:data:`STEPS` steps, a checkpoint after each), then
``resumed``: :data:`STOP` steps, stopped, and trained on to :data:`STEPS` from its latest checkpoint.
Per run and process, ``RECORD_DIR/<run>-rank<r>.json`` holds this process's own loss per step, how many
forwards its denoiser ran, and every file it wrote, renamed or removed under the run's output folder;
``<run>-rank<r>.pt`` its final weights.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from fastpref.train import TrainConfig, train
from fastpref.train.data import SyntheticPreferences
from fastpref.train.models import build_tiny_model

from _runs import WriteAudit

STEPS, STOP = 3, 1  # 8 training pairs, 2 per process: 2 steps an epoch; the resume crosses into epoch 1
audit = WriteAudit()  # installed in __main__: the writes under the current run's output folder


def config(out: str, steps: int, resume: bool) -> TrainConfig:
    return TrainConfig(output_dir=out, loss="kto", lora_rank=4, max_train_steps=steps, train_batch_size=2,
                       synthetic_size=10, eval_pairs=2, checkpointing_steps=1, learning_rate=1e-2, seed=2,
                       num_inference_steps=1, report_to="csv", validation_prompts=["a red disc"],
                       resume_from_checkpoint="latest" if resume else None)


def run(record_dir: str, name: str, out: str, steps: int, resume: bool) -> None:
    rank = int(os.environ["RANK"])
    audit.root, audit.written = out, []
    losses: dict[int, float] = {}
    model = build_tiny_model(sample_size=8)
    forwards = []  # training and evaluation: under FSDP every rank must run each forward
    model.denoiser.register_forward_pre_hook(lambda module, args: forwards.append(1))
    cfg = config(out, steps, resume)
    train(cfg, model=model, dataset=SyntheticPreferences(size=cfg.synthetic_size, resolution=8, seed=cfg.seed),
          on_step=lambda step, result: losses.__setitem__(step, result.loss.item()))
    audit.root = ""
    save(os.path.join(record_dir, f"{name}-rank{rank}.pt"), model)
    with open(os.path.join(record_dir, f"{name}-rank{rank}.json"), "w") as fh:
        json.dump({"losses": losses, "forwards": len(forwards), "written": sorted(set(audit.written))}, fh)


def save(path: str, model) -> None:
    torch.save({k: v.detach().cpu() for k, v in model.denoiser.state_dict().items()}, path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    audit.install()
    record = os.path.abspath(sys.argv[1])
    os.makedirs(record, exist_ok=True)
    run(record, "straight", os.path.join(record, "straight"), STEPS, resume=False)
    run(record, "stopped", os.path.join(record, "resumed"), STOP, resume=False)
    run(record, "resumed", os.path.join(record, "resumed"), STEPS, resume=True)
    torch.distributed.destroy_process_group()
