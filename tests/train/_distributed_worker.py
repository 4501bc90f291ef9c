"""Training runs of tests/train/test_distributed.py: each loss of :data:`RUNS` trained for
:data:`STEPS` optimizer steps on the tiny model, by every process of the job this runs in.

    torchrun --nproc_per_node 2 tests/train/_distributed_worker.py RECORD_DIR   (B pairs per process)

The test runs :func:`train_all` in its own process too, with 2B pairs (one process). Each run
records, under ``RECORD_DIR/<loss>/``, the denoiser's weights after the last step (process 0),
``logs/train.csv``, and per process the reference point z of each step (KTO). All runs are
``train()`` calls in one job: the process group outlives each of them.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from fastpref.train import TrainConfig, train
from fastpref.train.data import SyntheticPreferences
from fastpref.train.models import build_tiny_model
from fastpref.train.unpaired import SplitPairs

PAIRS_PER_PROCESS = 2  # B
STEPS = 2  # the first step starts at policy = reference (KTO's z = 0 everywhere); the second does not
RUNS = {  # run → what is trained (the run's name is its loss unless loss= says otherwise)
    "dpo": dict(lora_rank=4),
    "dmpo": dict(lora_rank=0),  # full fine-tune: every weight of the denoiser gets a gradient
    "kto": dict(lora_rank=4),
    # unpaired labelled images (each pair's two images as two rows, fastpref.train.unpaired.SplitPairs):
    # B images per process, each with its own noise
    "kto_unpaired": dict(loss="kto", lora_rank=4),
}


def dataset(run: str, cfg: TrainConfig):
    pairs = SyntheticPreferences(size=cfg.synthetic_size, resolution=8, seed=cfg.seed)
    return SplitPairs(pairs) if run.endswith("_unpaired") else pairs


def config(run: str, output_dir: str, batch_size: int) -> TrainConfig:
    # adam_epsilon ≫ |grad| makes Adam's first steps ≈ lr·g/ε, linear in the gradient (with ε = 1e-8 they
    # are lr·sign(g), blind to its scale); max_grad_norm above any gradient norm, so clipping cannot hide
    # a gradient that is twice too large. Every other setting is the trainer's default.
    settings = {"loss": run, **RUNS[run]}
    return TrainConfig(output_dir=output_dir, max_train_steps=STEPS, train_batch_size=batch_size,
                       synthetic_size=10, eval_pairs=2, learning_rate=1e-2, adam_epsilon=1.0, max_grad_norm=1e6,
                       seed=1, num_inference_steps=1, report_to="csv", validation_prompts=["a red disc"], **settings)


def train_all(record_dir: str, batch_size: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    for run in RUNS:
        out = os.path.join(record_dir, run)
        cfg = config(run, out, batch_size)
        model = build_tiny_model(sample_size=8)
        z: dict[str, dict[int, float]] = {"z": {}, "z_local": {}}

        def on_step(step, result):
            if hasattr(result.stats, "reference_point"):  # KTO: the z used, and the z of this process's samples
                s = result.stats
                z["z"][step] = s.reference_point.item()
                z["z_local"][step] = torch.clamp((s.ref_err - s.model_err).mean(), min=0.0).item()

        # each pair's noise and timestep come from (seed, pair, epoch), whatever batch and process it lands in
        # (fastpref.train.noise), so 2 processes × B pairs and 1 process × 2B pairs see the same numbers
        train(cfg, model=model, dataset=dataset(run, cfg), on_step=on_step)
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in model.denoiser.state_dict().items()},
                       os.path.join(out, "denoiser.pt"))
        with open(os.path.join(out, f"z-{rank}.json"), "w") as fh:
            json.dump(z, fh)


if __name__ == "__main__":
    torch.set_num_threads(1)
    train_all(os.path.abspath(sys.argv[1]), PAIRS_PER_PROCESS)
    torch.distributed.destroy_process_group()
