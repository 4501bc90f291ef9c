"""The short trainer run the trainer tests start from (any key overrides it), and what the multi-process
tests share: a free port for the launcher, the rows of a run's train log."""

import csv
import os
import socket

from fastpref.train import TrainConfig


def run_config(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=2, synthetic_size=24,
                eval_pairs=2, num_inference_steps=2, checkpointing_steps=1000, report_to="csv", learning_rate=1e-3,
                validation_prompts=["a red disc"])
    base.update(kw)
    return TrainConfig(**base)


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of a torchrun launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rows(run_dir) -> list[dict]:
    """The rows of ``run_dir/logs/train.csv``."""
    with open(os.path.join(run_dir, "logs", "train.csv"), newline="") as fh:
        return list(csv.DictReader(fh))
