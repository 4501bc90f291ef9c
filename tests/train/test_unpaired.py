"""Unpaired labelled images for --loss kto (fastpref/train/unpaired.py): the layouts read the same rows,
bad rows are named and counted, and a batch of single images runs through the trainer's steps — its
own noise per image, the labels to the loss, the latent and reference-error caches."""

from __future__ import annotations

import io
import json

import pytest
import torch

import fastpref
from fastpref.reference import pair_errors
from fastpref.train import train
from fastpref.train.cache import RefErrorCache, collate_cached, encode, precompute
from fastpref.train.data import CorruptPair, SyntheticPreferences, build_dataset, collate_pairs
from fastpref.train.loop import compute_loss
from fastpref.train.noise import NoisedPairs, draw_noise
from fastpref.train.objectives import get_objective
from fastpref.train.reference import make_reference, reference_prediction
from fastpref.train.unpaired import SplitPairs, UnpairedFolder, UnpairedParquet, parse_label
from _runs import run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
# (file, caption, label): what every layout below holds
ROWS = [("red.png", "a red disc", 1), ("blue.png", "a blue disc", 0), ("green.png", "a green disc", 1)]


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def _images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        (folder / f"{name}.png").write_bytes(_png(rgb))


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _table_folder(tmp_path):
    _images(tmp_path)
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": f, "caption": c, "label": y} for f, c, y in ROWS])
    return str(tmp_path)


def _subfolders(tmp_path):
    for sub, label in (("desirable", 1), ("undesirable", 0)):
        _images(tmp_path / sub)
        _jsonl(tmp_path / sub / "metadata.jsonl", [{"file_name": f, "caption": c} for f, c, y in ROWS if y == label])
    return str(tmp_path)


def _kto_csv(tmp_path):
    """diffusion-kto's table: file_name, caption and the label as its split column."""
    _images(tmp_path / "train")
    split = {1: "exclusive_win", 0: "exclusive_lose"}
    lines = ["file_name,caption,split"] + [f"train/{f},{c},{split[y]}" for f, c, y in ROWS]
    (tmp_path / "train_processed_v3.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path)


def _parquet(tmp_path, struct: bool = False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [_png(COLOURS[f.split(".")[0]]) for f, _, _ in ROWS]
    column = [{"bytes": b, "path": None} for b in images] if struct else images
    table = pa.table({"image": column, "caption": [c for _, c, _ in ROWS], "label": [y for _, _, y in ROWS]})
    path = tmp_path / "kto.parquet"
    pq.write_table(table, path, row_group_size=2)
    return str(path)


LAYOUTS = {"table": _table_folder, "subfolders": _subfolders, "diffusion-kto csv": _kto_csv, "parquet": _parquet,
           "parquet (datasets Image struct)": lambda p: _parquet(p, struct=True)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads_the_same_labelled_images(tmp_path, layout):
    ds = build_dataset(LAYOUTS[layout](tmp_path), resolution=8)
    assert isinstance(ds, UnpairedParquet if layout.startswith("parquet") else UnpairedFolder)
    assert ds.unpaired and not ds.skipped
    items = sorted((ds[i] for i in range(len(ds))), key=lambda it: it["caption"])
    expected = sorted(ROWS, key=lambda r: r[1])
    assert [(it["caption"], it["label"]) for it in items] == [(c, y) for _, c, y in expected]
    for it, (f, _, _) in zip(items, expected):
        assert it["pixel_values"].shape == (1, 3, 8, 8)
        rgb = torch.tensor(COLOURS[f.split(".")[0]]) / 255 * 2 - 1  # the image's own colour, in [−1, 1]
        torch.testing.assert_close(it["pixel_values"][0].mean((1, 2)), rgb, rtol=0, atol=0.02)
    batch = collate_pairs(items)
    assert batch["pixel_values"].shape == (3, 1, 3, 8, 8)
    assert batch["labels"].tolist() == [y for _, _, y in expected]


def test_bad_rows_are_named_and_counted(tmp_path):
    _images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    meta = tmp_path / "metadata.jsonl"
    _jsonl(meta, [
        {"file_name": "red.png", "caption": "a red disc", "label": 1},
        {"file_name": "blue.png", "caption": "", "label": 0},  # 2: missing caption
        {"file_name": "blue.png", "caption": "a blue disc", "label": "maybe"},  # 3: bad label
        {"file_name": "blue.png", "caption": "a blue disc", "label": 0.5},  # 4: bad label (a tie is no label)
        {"file_name": "green.png", "caption": "a green disc"},  # 5: missing label
        {"file_name": "green.png", "caption": "a green disc", "label": "intersections"},  # 6: skipped
        "{not json",  # 7
        {"caption": "no file", "label": 1},  # 8
        {"file_name": "broken.png", "caption": "a broken disc", "label": "undesirable"},
        {"file_name": "missing.png", "caption": "a missing disc", "label": "true"},
    ])
    ds = build_dataset(str(tmp_path), resolution=8)
    assert dict(ds.skipped) == {"missing_caption": 1, "bad_label": 2, "missing_label": 1, "intersection": 1,
                                "bad_metadata_line": 2}
    assert ds.problems["bad_label"][0] == f"{meta} line 3: label 'maybe' is not one of 1/0, true/false, " \
                                          "desirable/undesirable or exclusive_win/exclusive_lose"
    assert ds.problems["intersection"][0].startswith(f"{meta} line 6")
    assert [p.split(":")[0] for p in ds.problems["bad_metadata_line"]] == [f"{meta} line 7", f"{meta} line 8"]
    assert ds.labels().tolist() == [1, 0, 1]
    broken, missing = ds[1], ds[2]
    assert broken == CorruptPair(1, f"{meta} line 9: image cannot be decoded")
    assert missing == CorruptPair(2, f"{meta} line 10: image cannot be decoded")
    batch = collate_pairs([ds[0], broken, missing])
    assert batch["index"].tolist() == [0] and batch["labels"].tolist() == [1]
    assert set(batch["corrupt"]) == {1, 2}

    _jsonl(meta, [{"file_name": "red.png", "caption": "a red disc", "label": 7}])
    with pytest.raises(ValueError, match=r"no usable labelled image \(1 bad_label .*line 1: label 7"):
        build_dataset(str(tmp_path), resolution=8)


@pytest.mark.parametrize("value, parsed", [(1, 1), (0, 0), (True, 1), (1.0, 1), ("0.0", 0), (" Desirable ", 1),
                                           ("exclusive_lose", 0), ("intersections", None), (None, "missing"),
                                           (float("nan"), "missing"), (2, "bad"), ("yes", "bad"), ([1], "bad")])
def test_labels(value, parsed):
    assert parse_label(value) == parsed


def test_a_pair_loss_is_refused_on_unpaired_data_before_a_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr("fastpref.train.loop.load_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    data = _table_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"holds unpaired labelled images; --loss dpo needs preference pairs"):
        train(run_config(tmp_path, dataset=data, loss="dpo"))


def _unpaired_batch(epoch=1):
    ds = SplitPairs(SyntheticPreferences(size=6, resolution=16, seed=4))
    batch = collate_pairs([ds[i] for i in (3, 0, 5, 8, 10)])
    batch["epoch"] = epoch
    return ds, batch


def test_an_unpaired_step_is_kto_on_each_image_with_its_own_noise(tiny, cpu_accelerator, tmp_path):
    """compute_loss on single images = kto_loss on the policy's and reference's predictions, each image
    noised with the noise and timestep of (seed, its row, epoch), with the batch's labels."""
    model = tiny(vae=True, lora=4, lora_b=0.3)
    ds, batch = _unpaired_batch()
    assert batch["labels"].tolist() == [0, 1, 0, 1, 1]  # rows 2i winners, 2i + 1 losers
    cfg = run_config(tmp_path, loss="kto", seed=5)
    out = compute_loss(model, model.denoiser, make_reference("adapter_off", model), get_objective("kto"), batch, cfg,
                       cpu_accelerator)

    latents, cond = encode(model, batch, cfg.seed, "cpu")  # one latent per image (VAE draws: test_cache.py)
    assert latents.shape[0] == 5
    noise, t = draw_noise(model.scheduler, latents.shape[1:], batch["index"], batch["epoch"], cfg.seed)
    assert len(set(t.tolist())) > 1  # one timestep per image, not one per pair
    noisy = model.scheduler.add_noise(latents, noise, t)
    pred = model.predict(model.denoiser, noisy, t, cond)
    ref = reference_prediction(model, model.denoiser, NoisedPairs(noisy, t, noise), cond)
    want, stats = fastpref.kto_loss(pred, ref, noise, batch["labels"], return_stats=True)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats.reference_point, stats.reference_point)
    assert out.num_pairs == 5
    flipped = fastpref.kto_loss(pred, ref, noise, 1 - batch["labels"])
    assert (flipped - want).abs() > 1e-3  # the labels matter: the test can tell them apart


def test_unpaired_caches_give_the_uncached_step(tiny, cpu_accelerator, tmp_path):
    """--cache_latents (latents, conditioning and labels of single images) and --reference_mode cache
    (one reference error per image and epoch) give the step an uncached run computes."""
    model = tiny(vae=True, lora=4, lora_b=0.3)
    ds, batch = _unpaired_batch(epoch=1)
    rows = list(range(len(ds)))
    cfg = run_config(tmp_path, loss="kto", seed=5)
    objective = get_objective("kto")
    lat, ref_cache = precompute(model, ds, rows, seed=cfg.seed, device="cpu", latents_path=tmp_path / "lat.safetensors",
                                ref_path=tmp_path / "ref.safetensors", epochs=2, progress=False)
    assert ref_cache.ref_err.shape == (2, len(ds), 1)
    assert lat.labels.tolist() == [1 - i % 2 for i in rows]
    RefErrorCache.load(tmp_path / "ref.safetensors", ref_cache.fingerprint)  # the (epochs, R, 1) file reads back

    plain = compute_loss(model, model.denoiser, make_reference("adapter_off", model), objective, batch, cfg,
                         cpu_accelerator)
    cached_batch = collate_cached([lat[int(i)] for i in batch["index"]])
    assert cached_batch["labels"].tolist() == batch["labels"].tolist()
    cached = compute_loss(model, model.denoiser, make_reference("cache", model, cache=ref_cache), objective,
                          {**cached_batch, "epoch": 1}, cfg, cpu_accelerator)
    torch.testing.assert_close(cached.model_pred, plain.model_pred)
    torch.testing.assert_close(cached.ref["ref_err"], pair_errors(plain.ref["ref_pred"], plain.target))
    torch.testing.assert_close(cached.loss, plain.loss)


def test_a_kto_run_on_an_unpaired_folder(tmp_path):
    """The CLI path: --dataset a folder of labelled images, --loss kto, --cache_latents; the held-out
    images are scored by the label's sign."""
    import csv

    data = _table_folder(tmp_path / "data")
    _jsonl(tmp_path / "data" / "metadata.jsonl",
           [{"file_name": f, "caption": c, "label": y} for f, c, y in ROWS * 3])  # 9 images
    cfg = run_config(tmp_path, dataset=data, loss="kto", lora_rank=4, eval_pairs=2, resolution=8, cache_latents=True,
                     max_train_steps=2, validation_steps=0)
    result = train(cfg)
    assert result.global_step == 2
    with open(tmp_path / "run" / "logs" / "eval.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert int(last["heldout_pairs"]) == 2
