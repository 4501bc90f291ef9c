"""One process of tests/train/test_rpo_train.py::test_rpo_two_processes_train_on_the_global_batch, started
by torchrun (or called in-process for the one-process run): one optimizer step of ``--loss rpo`` on a
tiny model, B pairs per process, and a record of what this process computed.

    python tests/train/_rpo_launch_worker.py OUTPUT_DIR RECORD_DIR PAIRS_PER_PROCESS
"""

import json
import os
import sys

import torch

from fastpref.train import TrainConfig, train
from fastpref.train.models import build_tiny_model


def run(output_dir: str, record_dir: str, pairs: int) -> None:
    torch.set_num_threads(1)
    # τ = 1: near-uniform weights, so every winner is compared with the other process's losers too.
    # Adam's ε = 1: the first update is continuous in the gradient (with ε ≈ 0 it is lr·sign(g), and
    # summation-order noise flips the sign of the near-zero entries).
    cfg = TrainConfig(output_dir=output_dir, max_train_steps=1, train_batch_size=pairs, synthetic_size=12,
                      eval_pairs=2, num_inference_steps=1, checkpointing_steps=1000, report_to="csv",
                      learning_rate=1e-2, adam_epsilon=1.0, loss="rpo", rpo_tau=1.0, lora_rank=4, seed=3,
                      validation_prompts=["a red disc"])
    losses = {}

    def on_step(step, out):
        losses[step] = out.loss.item()

    train(cfg, model=build_tiny_model(sample_size=8), on_step=on_step)
    rank = int(os.environ.get("RANK", 0))
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, f"rank-{rank}.json"), "w") as fh:
        json.dump({"losses": losses}, fh)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
