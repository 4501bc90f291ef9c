"""One process of a multi-process training run, started by torchrun or ``accelerate launch`` from
test_launch.py. It calls ``train()`` like ``python -m fastpref.train`` does, on a tiny model, and
records for the test what this process did: the training pairs it read, its own loss per step,
and every file under the output folder it wrote, renamed or removed.

    python tests/train/_launch_worker.py OUTPUT_DIR RECORD_DIR
"""

import json
import os
import sys

import torch

from fastpref.train import TrainConfig, train
from fastpref.train.data import SyntheticPreferences
from fastpref.train.models import build_tiny_model

from _runs import WriteAudit

output_dir, record_dir = (os.path.abspath(p) for p in sys.argv[1:3])
audit = WriteAudit(output_dir).install()


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
               "written": sorted(set(audit.written)), "global_step": result.global_step}, fh)
