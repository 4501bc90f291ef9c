"""Bad data and bad outputs: every problem names its file and line (or parquet row), is counted once,
and anything that would stop a run is refused before a model is loaded."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
import torch

from fastpref.train import train
from fastpref.train.data import CorruptPair, FolderPairs, SyntheticPreferences, build_dataset, collate_pairs
from fastpref.train.models import build_tiny_model
from _runs import run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jpeg(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="JPEG")
    return buf.getvalue()


def _folder(tmp_path, records: list, raw_lines: dict | None = None) -> str:
    """A metadata.jsonl folder; ``raw_lines`` {line number: text} replaces those lines verbatim."""
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "red.jpg").write_bytes(_jpeg((220, 20, 20)))
    (tmp_path / "img" / "blue.jpg").write_bytes(_jpeg((20, 20, 220)))
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not a jpeg")
    lines = [json.dumps(r) for r in records]
    for n, text in (raw_lines or {}).items():
        lines[n - 1] = text
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path)


def _pair(label=1, caption="a red disc", image_0="img/red.jpg", image_1="img/blue.jpg") -> dict:
    return {"image_0": image_0, "image_1": image_1, "label_0": label, "caption": caption}




def _no_model_load(monkeypatch):
    """Make loading a model fail loudly: a check that must run first then proves it did."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr("fastpref.train.loop.load_model", refuse)


# ----------------------------------------------------------------------------------------------
# Labels and lines: skipped, counted, located
# ----------------------------------------------------------------------------------------------


def test_a_non_numeric_label_skips_that_line_and_names_it(tmp_path):
    root = _folder(tmp_path, [_pair(), _pair(label="yes"), _pair(label=0), _pair(label=2), _pair(label=True)])
    ds = build_dataset(root, resolution=8)
    assert len(ds) == 2 and dict(ds.skipped) == {"bad_label": 3}
    meta = os.path.join(root, "metadata.jsonl")
    assert ds.problems["bad_label"][0] == f"{meta} line 2: label_0 'yes' is not a number in [0, 1] (1, 0 or 0.5 for a tie)"
    assert [p.split(":")[0] for p in ds.problems["bad_label"]] == [f"{meta} line {n}" for n in (2, 4, 5)]


def test_a_dataset_of_bad_lines_is_refused_with_the_first_locations(tmp_path):
    root = _folder(tmp_path, [_pair(label="yes"), _pair(), _pair(label=0.5)], raw_lines={2: "{broken"})
    with pytest.raises(ValueError) as exc:
        build_dataset(root, resolution=8)
    msg = str(exc.value)
    meta = os.path.join(root, "metadata.jsonl")
    assert "no usable preference pair" in msg
    assert f"1 bad_label ({meta} line 1: label_0 'yes'" in msg
    assert f"1 bad_metadata_line ({meta} line 2: not JSON" in msg
    assert f"1 tie ({meta} line 3: label_0 0.5)" in msg
    assert "could not convert" not in msg


def test_parquet_problems_name_file_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    red, blue = _jpeg((220, 20, 20)), _jpeg((20, 20, 220))
    rows = [(red, blue, 1.0, "a red disc")] * 5 + [(red, blue, 0.5, "tie"), (b"broken", blue, 1.0, "corrupt")]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("jpg_0", "jpg_1", "label_0", "caption"))})
    path = str(tmp_path / "train-0.parquet")
    pq.write_table(table, path, row_group_size=3)  # row 5 sits in the second row group: rows count across groups
    ds = build_dataset(path, resolution=8)
    assert ds.problems == {"tie": [f"{path} row 5: label_0 0.5"]}
    assert ds[5] == CorruptPair(5, f"{path} row 6: image_0 cannot be decoded")


# ----------------------------------------------------------------------------------------------
# Corrupt images: counted once per row however many epochs read it, held-out rows included
# ----------------------------------------------------------------------------------------------


def test_collate_hands_on_which_rows_were_corrupt(tmp_path):
    root = _folder(tmp_path, [_pair(), _pair(image_1="img/bad.jpg"), _pair(image_0="img/missing.jpg")])
    ds = FolderPairs(root, resolution=8)
    meta = os.path.join(root, "metadata.jsonl")
    batch = collate_pairs([ds[0], ds[1], ds[2]])
    assert batch["pixel_values"].shape == (1, 2, 3, 8, 8)
    assert batch["corrupt"] == {1: f"{meta} line 2: image_1 cannot be decoded",
                                2: f"{meta} line 3: image_0 cannot be decoded"}
    empty = collate_pairs([ds[1]])
    assert empty["pixel_values"] is None and list(empty["corrupt"]) == [1]


def test_corrupt_rows_are_counted_once_across_epochs_and_in_the_held_out_part(tmp_path, capsys):
    records = [_pair() for _ in range(8)]
    records[1] = _pair(image_1="img/bad.jpg")  # training part
    records[7] = _pair(image_0="img/bad.jpg")  # held out (the last eval_pairs rows)
    root = _folder(tmp_path, records)
    # 6 training rows, batch 2 → 3 batches an epoch; 7 steps read every training row 2-3 times
    cfg = run_config(tmp_path, dataset=root, eval_pairs=2, max_train_steps=7, validation_steps=3)
    result = train(cfg, model=build_tiny_model(sample_size=8))
    assert result.data_skipped == {"corrupt_image": 2}
    with open(os.path.join(cfg.output_dir, "logs", "train.csv"), newline="") as fh:
        assert [int(r["corrupt_images"]) for r in csv.DictReader(fh)][-1] == 2
    assert [e["heldout_pairs"] for e in result.eval_history] == [1, 1, 1, 1]  # 2 held out, 1 readable
    out = capsys.readouterr().out
    meta = os.path.join(root, "metadata.jsonl")
    assert out.count(f"data: skipped an unreadable pair: {meta} line 2: image_1 cannot be decoded") == 1
    assert out.count(f"data: skipped an unreadable pair: {meta} line 8: image_0 cannot be decoded") == 1
    assert "data skipped: 2 corrupt_image" in out


# ----------------------------------------------------------------------------------------------
# Refused before any model loads
# ----------------------------------------------------------------------------------------------


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made under a file (this holds for root too)
    with pytest.raises(ValueError, match=r"--output_dir '.*a_file/run' is not writable"):
        train(run_config(tmp_path, output_dir=str(blocker / "run")))


def test_a_validation_prompt_the_reward_cannot_score_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=r"--validation_prompts: .* cannot score \['a_red_disc'\]"):
        train(run_config(tmp_path, validation_prompts=["a red disc", "a_red_disc"]))
    with pytest.raises(ValueError, match=r"cannot score \['a red or blue disc'\]"):  # two colours: ambiguous
        train(run_config(tmp_path, validation_prompts=["a red or blue disc"]))


def test_the_cli_reports_the_unscorable_prompt_without_traceback(tmp_path, capsys):
    from fastpref.train import main

    assert main(["--output_dir", str(tmp_path / "run"), "--validation_prompts", "a_red_disc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpref-train: error: --validation_prompts") and "Traceback" not in err


def test_the_reward_never_raises_a_bare_stop_iteration():
    images = torch.zeros(2, 3, 4, 4)
    assert SyntheticPreferences.reward(images, ["a Red disc", "A BLUE disc"]).shape == (2,)  # case-insensitive
    with pytest.raises(ValueError, match="cannot score \\['a_red_disc'\\]"):
        SyntheticPreferences.reward(images, ["a red disc", "a_red_disc"])


def test_the_synthetic_reward_scores_the_prompts_colour_share_of_a_disc_and_never_favours_a_blank():
    ds = SyntheticPreferences(12, 16, seed=7)
    pix = torch.stack([ds[i]["pixel_values"] for i in range(12)])
    caps = [ds[i]["caption"] for i in range(12)]
    win, lose = pix[:, 0], pix[:, 1]
    torch.testing.assert_close(ds.reward(win, caps), torch.ones(12))
    torch.testing.assert_close(ds.reward(lose, caps), torch.zeros(12))
    blank = torch.zeros_like(win)  # a flat grey sample, and one whose disc faded towards the grey
    torch.testing.assert_close(ds.reward(blank, caps), ds.reward(lose, caps))
    torch.testing.assert_close(ds.reward(0.3 * win, caps), ds.reward(lose, caps))
    mixed = torch.cat([win[..., :8], lose[..., 8:]], dim=-1)  # left half of the disc right, right half wrong
    half = torch.cat([win[..., :8], blank[..., 8:]], dim=-1)  # the right half of the disc missing
    for image in (mixed, half):
        r = ds.reward(image, caps)
        assert bool(((r > 0.2) & (r < 0.95)).all()), r  # between the wrong disc (0) and the full one (1)
    own, other = ds.colour_pixels(mixed, caps)
    full = own + other >= ds.DISC_AREA * 16 * 16  # at least a disc's worth of colour: no floor
    assert bool(full.any())
    torch.testing.assert_close(ds.reward(mixed, caps)[full], (own / (own + other))[full])
