"""Training runs of tests/train/test_distributed.py: each loss of :data:`RUNS` trained for
:data:`STEPS` optimizer steps on the tiny model, by every process of the job this runs in.

    torchrun --nproc_per_node 2 tests/train/_distributed_worker.py RECORD_DIR   (B pairs per process)

The test runs :func:`train_all` in its own process too, with 2B pairs (one process). Each run
records, under ``RECORD_DIR/<loss>/``, the denoiser's weights after the last step (process 0),
``logs/train.csv``, and per process the reference point z of each step (KTO).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

from fastpref.train import TrainConfig, train
from fastpref.train.data import SyntheticPreferences
from fastpref.train.models import build_tiny_model

PAIRS_PER_PROCESS = 2  # B
STEPS = 2  # the first step starts at policy = reference (KTO's z = 0 everywhere); the second does not
RUNS = {  # loss → what is trained
    "dpo": dict(lora_rank=4),
    "dmpo": dict(lora_rank=0),  # full fine-tune: every weight of the denoiser gets a gradient
    "kto": dict(lora_rank=4),
}


@contextlib.contextmanager
def one_job_for_all_runs():
    """``train()`` ends with accelerate's ``end_training()``, which destroys the process group: keep it
    for the next loss's run, and destroy it after the last."""
    from accelerate.state import PartialState

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        PartialState.destroy_process_group = destroy


def config(loss: str, output_dir: str, batch_size: int) -> TrainConfig:
    # adam_epsilon ≫ |grad| makes Adam's first steps ≈ lr·g/ε, linear in the gradient (with ε = 1e-8 they
    # are lr·sign(g), blind to its scale); max_grad_norm above any gradient norm, so clipping cannot hide
    # a gradient that is twice too large. Every other setting is the trainer's default.
    return TrainConfig(output_dir=output_dir, loss=loss, max_train_steps=STEPS, train_batch_size=batch_size,
                       synthetic_size=10, eval_pairs=2, learning_rate=1e-2, adam_epsilon=1.0, max_grad_norm=1e6,
                       seed=1, num_inference_steps=1, report_to="csv", validation_prompts=["a red disc"], **RUNS[loss])


def train_all(record_dir: str, batch_size: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    for loss in RUNS:
        out = os.path.join(record_dir, loss)
        cfg = config(loss, out, batch_size)
        model = build_tiny_model(sample_size=8)
        z: dict[str, dict[int, float]] = {"z": {}, "z_local": {}}

        def on_step(step, result):
            if hasattr(result.stats, "reference_point"):  # KTO: the z used, and the z of this process's samples
                s = result.stats
                z["z"][step] = s.reference_point.item()
                z["z_local"][step] = torch.clamp((s.ref_err - s.model_err).mean(), min=0.0).item()

        # each pair's noise and timestep come from (seed, pair, epoch), whatever batch and process it lands in
        # (fastpref.train.noise), so 2 processes × B pairs and 1 process × 2B pairs see the same numbers
        train(cfg, model=model, dataset=SyntheticPreferences(size=cfg.synthetic_size, resolution=8, seed=cfg.seed),
              on_step=on_step)
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in model.denoiser.state_dict().items()},
                       os.path.join(out, "denoiser.pt"))
        with open(os.path.join(out, f"z-{rank}.json"), "w") as fh:
            json.dump(z, fh)


if __name__ == "__main__":
    torch.set_num_threads(1)
    with one_job_for_all_runs():
        train_all(os.path.abspath(sys.argv[1]), PAIRS_PER_PROCESS)
    torch.distributed.destroy_process_group()
