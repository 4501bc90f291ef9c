"""One process of a multi-process training run, started by torchrun or ``accelerate launch`` from
test_launch.py. It calls ``train()`` like ``python -m fastpref.train`` does, on a tiny model, and
records for the test what this process did: the training pairs it read, its own loss per step,
and every file under the output folder it wrote, renamed or removed.

    python tests/train/_launch_worker.py OUTPUT_DIR RECORD_DIR
"""

import json
import os
import sys

import safetensors.torch
import torch

from fastpref.train import TrainConfig, train
from fastpref.train.data import SyntheticPreferences
from fastpref.train.models import build_tiny_model

output_dir, record_dir = (os.path.abspath(p) for p in sys.argv[1:3])
written: list[str] = []


def _under_output(path) -> str | None:
    if isinstance(path, int):
        return None
    full = os.path.abspath(os.fsdecode(path))
    return os.path.relpath(full, output_dir) if full.startswith(output_dir + os.sep) else None


def audit(event: str, args) -> None:
    """Python's audit hooks see every open(), rename, removal: keep the writes under output_dir."""
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
    elif event in ("os.rename", "os.remove", "shutil.rmtree"):
        path, writes = args[0], True
    else:
        return
    rel = _under_output(path) if writes else None
    if rel is not None:
        written.append(rel)


sys.addaudithook(audit)


def recording(save, path_arg: int):
    """safetensors (Rust) and torch.save (C++ zip writer) open their files out of the audit hook's sight."""

    def wrapper(*args, **kwargs):
        rel = _under_output(args[path_arg]) if isinstance(args[path_arg], (str, os.PathLike)) else None
        if rel is not None:
            written.append(rel)
        return save(*args, **kwargs)

    return wrapper


safetensors.torch.save_file = recording(safetensors.torch.save_file, 1)
torch.save = recording(torch.save, 1)


class RecordingPreferences(SyntheticPreferences):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: list[int] = []

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)


torch.set_num_threads(1)
cfg = TrainConfig(output_dir=output_dir, max_train_steps=3, train_batch_size=2, synthetic_size=14, eval_pairs=2,
                  num_inference_steps=2, checkpointing_steps=2, report_to="csv", learning_rate=1e-3, loss="dmpo",
                  lora_rank=4, validation_prompts=["a red disc"])
dataset = RecordingPreferences(size=cfg.synthetic_size, resolution=8, seed=cfg.seed)
losses: dict[int, float] = {}
read_before_eval: list[int] = []


def on_step(step, out):
    losses[step] = out.loss.item()
    read_before_eval[:] = dataset.read


result = train(cfg, model=build_tiny_model(sample_size=8), dataset=dataset, on_step=on_step)
rank = int(os.environ["RANK"])
os.makedirs(record_dir, exist_ok=True)
with open(os.path.join(record_dir, f"rank-{rank}.json"), "w") as fh:
    json.dump({"world_size": int(os.environ["WORLD_SIZE"]), "train_read": read_before_eval, "losses": losses,
               "written": sorted(set(written)), "global_step": result.global_step}, fh)
