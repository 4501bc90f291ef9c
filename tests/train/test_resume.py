"""Checkpoints and resume: a run stopped at step k and resumed repeats the uninterrupted run exactly,
across epoch boundaries; a save that dies half-way is never resumed from.

The data: 8 synthetic pairs, 2 held out, batches of 2 → 3 micro-batches per epoch. With gradient
accumulation 2 an epoch is 2 updates (2 micro-batches, then the last one alone), so step 1 lies
inside epoch 0 and steps 3–4 / 5–6 are epochs 1 / 2; without accumulation steps 1–3 are epoch 0.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fastpref.train import TrainConfig, train
from fastpref.train.checkpoint import checkpoint_problems, find_latest_checkpoint, list_checkpoints
from fastpref.train.models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGGED = ("loss", "u", "model_err_win", "model_err_lose", "grad_norm", "lr")


def config(output_dir, **kw) -> TrainConfig:
    base = dict(output_dir=str(output_dir), train_batch_size=2, synthetic_size=8, eval_pairs=2, num_inference_steps=2,
                checkpointing_steps=1, report_to="csv", learning_rate=1e-3, validation_prompts=["a red disc"],
                loss="dmpo", lr_scheduler="constant_with_warmup", lr_warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def tiny():
    return build_tiny_model("fastpref:tiny-unet", sample_size=8)


# (name, settings, steps of the uninterrupted run, checkpoints to resume from)
RUNS = {
    "lora-accum2": (dict(lora_rank=4, gradient_accumulation_steps=2), 6),
    "full": (dict(lora_rank=0), 7),
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_torch_thread):
    """The uninterrupted runs (a checkpoint after every step), each built once for the module."""
    done = {}

    def get(name):
        if name not in done:
            settings, steps = RUNS[name]
            model = tiny()
            cfg = config(tmp_path_factory.mktemp(name) / "run", max_train_steps=steps, **settings)
            result = train(cfg, model=model)
            done[name] = result, {k: v.clone() for k, v in model.denoiser.state_dict().items()}
        return done[name]

    return get


@pytest.mark.parametrize("name,start", [
    ("lora-accum2", 1),  # inside epoch 0 (one micro-batch of it left) → epochs 1 and 2
    ("full", 2),         # inside epoch 0 → epochs 1 and 2
    ("full", 3),         # at the end of epoch 0 → epochs 1 and 2
])
def test_resume_repeats_the_uninterrupted_run_across_epochs(tmp_path, straight, name, start):
    base, weights = straight(name)
    settings, steps = RUNS[name]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(os.path.join(base.output_dir, f"checkpoint-{start}"), run / f"checkpoint-{start}")
    model = tiny()
    result = train(config(run, max_train_steps=steps, resume_from_checkpoint="latest", **settings), model=model)
    assert result.global_step == steps
    expected = [r for r in base.history if r["step"] > start]
    assert [r["step"] for r in result.history] == [r["step"] for r in expected] == list(range(start + 1, steps + 1))
    for key in LOGGED:
        assert [r[key] for r in result.history] == [r[key] for r in expected], key
    after = model.denoiser.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)


def test_latest_without_checkpoint_starts_fresh(tmp_path):
    result = train(config(tmp_path / "run", max_train_steps=1, lora_rank=4, resume_from_checkpoint="latest"),
                   model=tiny())
    assert result.global_step == 1 and [r["step"] for r in result.history] == [1]


def test_latest_skips_an_incomplete_checkpoint_with_a_warning(tmp_path, straight):
    base, _ = straight("lora-accum2")
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        shutil.copytree(os.path.join(base.output_dir, f"checkpoint-{step}"), run / f"checkpoint-{step}")
    os.remove(run / "checkpoint-2" / "optimizer.bin")
    assert checkpoint_problems(str(run / "checkpoint-2")) == ["optimizer.bin is missing"]
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*checkpoint-2 \(optimizer.bin is missing\)"):
        result = train(config(run, max_train_steps=3, resume_from_checkpoint="latest", lora_rank=4,
                              gradient_accumulation_steps=2), model=tiny())
    assert [r["step"] for r in result.history] == [2, 3]  # resumed from checkpoint-1
    for key in LOGGED:
        assert [r[key] for r in result.history] == [r[key] for r in base.history[1:3]], key
    # named explicitly, an incomplete checkpoint is refused with what is wrong
    os.remove(run / "checkpoint-1" / "trainer_state.json")
    with pytest.raises(ValueError, match=r"checkpoint-1 is incomplete \(trainer_state.json is missing\)"):
        train(config(run, max_train_steps=3, resume_from_checkpoint=str(run / "checkpoint-1"), lora_rank=4,
                     gradient_accumulation_steps=2), model=tiny())


def test_resume_with_another_batch_geometry_is_refused(tmp_path, straight):
    """The position in the data is counted in optimizer steps: other accumulation, other position."""
    base, _ = straight("lora-accum2")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(os.path.join(base.output_dir, "checkpoint-1"), run / "checkpoint-1")
    with pytest.raises(ValueError, match=r"checkpoint-1: it was written with --gradient_accumulation_steps 2; resume"):
        train(config(run, max_train_steps=3, resume_from_checkpoint="latest", lora_rank=4), model=tiny())


def test_checkpoint_problems_sees_truncated_and_unreadable_files(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "optimizer.bin").write_bytes(b"12345")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 5, "files": {"optimizer.bin": 9}}))
    assert checkpoint_problems(str(folder)) == ["optimizer.bin has 5 bytes, 9 expected"]
    (folder / "trainer_state.json").write_text('{"global_step": 5, "fil')  # killed while writing
    assert checkpoint_problems(str(folder))[0].startswith("trainer_state.json is unreadable")
    assert find_latest_checkpoint(str(tmp_path), warn=False) is None


class Killed(Exception):
    pass


def test_a_save_killed_half_way_is_never_resumed_from(tmp_path, monkeypatch):
    """The files of checkpoint-2 are written, then the process dies before the save completes: there
    is no checkpoint-2 folder (only a temporary one), and `latest` resumes from checkpoint-1."""
    import accelerate

    run = tmp_path / "run"
    save_state = accelerate.Accelerator.save_state

    def dies_at_step_2(self, output_dir=None, **kw):
        out = save_state(self, output_dir, **kw)
        if "checkpoint-2" in str(output_dir):
            raise Killed("during the save of checkpoint-2")
        return out

    monkeypatch.setattr(accelerate.Accelerator, "save_state", dies_at_step_2)
    with pytest.raises(Killed):
        train(config(run, max_train_steps=3, lora_rank=4), model=tiny())
    monkeypatch.undo()
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["checkpoint-1"]
    assert os.path.isdir(run / ".tmp-checkpoint-2")  # what the dead save left behind, under another name
    result = train(config(run, max_train_steps=3, lora_rank=4, resume_from_checkpoint="latest"), model=tiny())
    assert [r["step"] for r in result.history] == [2, 3]
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not os.path.exists(run / ".tmp-checkpoint-2")
    assert all(checkpoint_problems(p) == [] for p in list_checkpoints(str(run)))


def test_checkpoints_total_limit_keeps_the_newest_complete_ones(tmp_path):
    run = tmp_path / "run"
    train(config(run, max_train_steps=4, lora_rank=4, checkpoints_total_limit=2), model=tiny())
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["checkpoint-3", "checkpoint-4"]
    assert [n for n in os.listdir(run) if "checkpoint" in n and not n.startswith("checkpoint-")] == []
