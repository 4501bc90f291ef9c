"""``--loss rpo --cache_latents``: the pairs' CLIP embeddings are computed once into a file next to the
latent cache, fingerprinted with the CLIP model, and a run that finds the file loads no CLIP model."""

from __future__ import annotations

import csv
import dataclasses
import os

import pytest
import torch

from fastpref.train import train
from fastpref.train import clip_embed
from fastpref.train.clip_embed import CLIP_FORMAT, build_clip_embedder, clip_fingerprint
from fastpref.train.data import SyntheticPreferences, collate_pairs

pytest.importorskip("open_clip")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGGED = ("loss", "u", "grad_norm")


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "logs", "train.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def _no_clip_model(*args, **kwargs):
    raise AssertionError("a CLIP model was built")


def test_a_cached_run_loads_no_clip_model(run_config, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    base = run_config(loss="rpo", max_train_steps=2, train_batch_size=3, cache_latents=True,
                      latent_cache_dir=str(cache))
    train(base)  # builds the latent cache and the CLIP embedding file
    files = sorted(os.listdir(cache))
    assert [f.split("-")[0] for f in files] == ["clip", "latents"], files

    monkeypatch.setattr(clip_embed, "_tiny_clip", _no_clip_model)
    monkeypatch.setattr(clip_embed, "build_clip_embedder", _no_clip_model)
    again = dataclasses.replace(base, output_dir=str(tmp_path / "again"))
    train(again)
    assert sorted(os.listdir(cache)) == files
    first, second = _rows(base.output_dir), _rows(again.output_dir)
    assert [r["step"] for r in first] == [r["step"] for r in second] == ["1", "2"]
    for a, b in zip(first, second):
        assert {k: a[k] for k in LOGGED} == {k: b[k] for k in LOGGED}


def test_the_file_holds_the_embeddings_and_another_clip_model_gets_another_file(run_config, tmp_path):
    from safetensors import safe_open

    from fastpref.train.cache import LatentCache

    cfg = run_config(loss="rpo", cache_latents=True, latent_cache_dir=str(tmp_path / "cache"))
    data = SyntheticPreferences(size=5, resolution=8, seed=3)
    latents = type("L", (), {"path": str(tmp_path / "cache" / "latents-x.safetensors"), "fingerprint": {"d": "1"}})()
    assert not isinstance(latents, LatentCache)  # only .path and .fingerprint are read
    table = clip_embed.clip_cache_for_run(cfg, latents, data, range(5), "cpu")
    batch = collate_pairs([data[i] for i in (4, 0, 2)])
    want = build_clip_embedder(cfg, "cpu")(batch, "cpu")  # per step, from this batch's pixels
    got = table(batch, "cpu")
    # unit vectors encoded in batches of another size: fp32 summation order, a few ulp of 1
    tol = 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=tol)
    assert (got[0] - got[1]).abs().max() > 100 * tol  # winners and losers differ far more
    (path,) = [p for p in os.listdir(tmp_path / "cache") if p.startswith("clip-")]
    with safe_open(str(tmp_path / "cache" / path), framework="pt") as f:
        assert f.metadata()["fastpref.kind"] == CLIP_FORMAT

    other = dataclasses.replace(cfg, clip_combiner="image")
    assert clip_fingerprint(other) != clip_fingerprint(cfg)
    clip_embed.clip_cache_for_run(other, latents, data, range(5), "cpu")
    assert len([p for p in os.listdir(tmp_path / "cache") if p.startswith("clip-")]) == 2
    # a checkpoint file is known by path, size and time: rewritten, it is another model
    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"1")
    first = clip_fingerprint(dataclasses.replace(cfg, clip_pretrained=str(ckpt)))
    os.utime(ckpt, ns=(0, 0))
    assert clip_fingerprint(dataclasses.replace(cfg, clip_pretrained=str(ckpt))) != first
