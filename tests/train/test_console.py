"""What a user sees: a line per evaluation and a closing summary that says where the outputs are."""

from __future__ import annotations

import os

import pytest
import torch

from fastpref.train import TrainConfig, train
from fastpref.train.data import PALETTE, SyntheticPreferences
from fastpref.train.models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_evaluations_and_the_summary_reach_the_console(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = TrainConfig(output_dir=out, max_train_steps=2, train_batch_size=2, synthetic_size=24, eval_pairs=4,
                      num_inference_steps=2, checkpointing_steps=1000, report_to="csv,png", validation_steps=1,
                      validation_prompts=["a red disc", "a blue disc"])
    result = train(cfg, model=build_tiny_model(sample_size=8))
    text = capsys.readouterr().out
    evals = [line for line in text.splitlines() if line.startswith("eval step ")]
    assert [line.split(":")[0] for line in evals] == ["eval step 0", "eval step 1", "eval step 2"]
    last = result.eval_history[-1]
    assert f"held-out accuracy {last['heldout_accuracy']:.3f} (4 pairs)" in evals[-1]
    assert f"sample reward {last['reward']:+.3f} ± {last['reward_sem']:.3f}" in evals[-1]
    assert "done, 2 steps in" in text and f"→ {out}" in text
    first = result.eval_history[0]
    assert f"mean sample reward: {first['reward']:+.3f} (step 0) → {last['reward']:+.3f}" in text
    for path in ("pytorch_lora_weights.safetensors", "samples", "curves.png"):
        assert os.path.join(out, path) in text
        assert os.path.exists(os.path.join(out, path))


def test_the_synthetic_loser_is_the_prompt_colours_ring_neighbour():
    """The warm-up sees two colours per prompt (its own, the next one on the ring); the preference
    then has to choose between them."""
    ds = SyntheticPreferences(60, 16)
    names = list(PALETTE)
    table = torch.tensor(list(PALETTE.values()))
    for i in range(60):
        item = ds[i]
        colour = ds.prompt_colour(item["caption"])
        centre = item["pixel_values"][:, :, 8, 8]  # the disc always covers the centre pixel
        drawn = [names[int(torch.cdist(c[None], table).argmin())] for c in centre]
        assert drawn == [colour, names[(names.index(colour) + 1) % len(names)]]
