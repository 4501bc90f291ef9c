"""Training runs of tests/train/test_unreadable_batch.py: process 1's first micro-batch is wholly unreadable.

    torchrun --nproc_per_node 2 tests/train/_unreadable_worker.py RECORD_DIR

Each run of :data:`RUNS` trains :data:`STEPS` optimizer steps on the tiny model with :data:`PAIRS` pairs per
process; on process 1 the dataset answers the first :data:`PAIRS` reads (its first micro-batch) with
:class:`~fastpref.train.data.CorruptPair`, as for corrupt JPEGs. Process 0 records the denoiser's weights
and the loss of each of its micro-batches.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from fastpref.train import TrainConfig, train
from fastpref.train.data import CorruptPair, SyntheticPreferences
from fastpref.train.models import build_tiny_model

PAIRS = 2
STEPS = 1
RUNS = ("dpo", "kto")  # kto: its reference point z is an all-reduce inside the loss


class FirstReadsUnreadable(SyntheticPreferences):
    """The first ``unreadable`` reads answer CorruptPair; every later read is the pair itself."""

    def __init__(self, *args, unreadable: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.unreadable = unreadable

    def __getitem__(self, i):
        if self.unreadable > 0:
            self.unreadable -= 1
            return CorruptPair(int(i), f"row {int(i)} (made unreadable)")
        return super().__getitem__(i)


def config(loss: str, output_dir: str, batch_size: int, learning_rate: float) -> TrainConfig:
    # full fine-tune, no weight decay, Adam's ε ≫ |grad|: the first step is ≈ −lr·g/ε, linear in the gradient,
    # so halving the gradient (DDP's mean with a process that contributes 0) equals halving the learning rate
    return TrainConfig(output_dir=output_dir, loss=loss, lora_rank=0, max_train_steps=STEPS,
                       train_batch_size=batch_size, synthetic_size=10, eval_pairs=2, learning_rate=learning_rate,
                       adam_epsilon=1e6, adam_weight_decay=0.0, max_grad_norm=1e9, seed=1, num_inference_steps=1,
                       report_to="csv", validation_prompts=["a red disc"])


def run(loss: str, out: str, *, batch_size: int, learning_rate: float, unreadable: int) -> None:
    cfg = config(loss, out, batch_size, learning_rate)
    model = build_tiny_model(sample_size=8)
    losses = []
    data = FirstReadsUnreadable(size=cfg.synthetic_size, resolution=8, seed=cfg.seed, unreadable=unreadable)
    train(cfg, model=model, dataset=data, on_step=lambda step, result: losses.append(result.loss.item()))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({k: v.detach().cpu() for k, v in model.denoiser.state_dict().items()},
                   os.path.join(out, "denoiser.pt"))
        with open(os.path.join(out, "losses.json"), "w") as fh:
            json.dump(losses, fh)


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for loss in RUNS:
        run(loss, os.path.join(os.path.abspath(sys.argv[1]), loss), batch_size=PAIRS, learning_rate=1e-2,
            unreadable=PAIRS if rank == 1 else 0)
    torch.distributed.destroy_process_group()
