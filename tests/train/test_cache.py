"""The caches (fastpref.train.cache): the latent cache holds what the step would encode, a
``--cache_latents`` run runs no VAE and no text encoder and changes no number, fingerprints refuse a cache
made for anything else, and ``fastpref-precompute`` writes the caches a run with the same flags reads."""

from __future__ import annotations

import csv
import os
import pickle

import pytest
import torch

import fastpref.train.cache as cache_module
from fastpref.train import parse_args, train
from fastpref.train.cache import (
    LatentCache,
    RefErrorCache,
    collate_cached,
    encode,
    files_fingerprint,
    latents_fingerprint,
    precompute,
    reference_fingerprint,
)
from fastpref.train.data import CorruptPair, SyntheticPreferences, collate_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 5


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class SomeUnreadable(SyntheticPreferences):
    """Row 2's images cannot be read (the dataset gives a CorruptPair, as for a corrupt JPEG)."""

    def __getitem__(self, i):
        return CorruptPair(i, f"row {i}") if i == 2 else super().__getitem__(i)


def test_latent_cache_holds_what_the_step_encodes(tmp_path, tiny):
    model = tiny(vae=True)
    data = SomeUnreadable(6, 16, seed=SEED)
    precompute(model, data, range(6), seed=SEED, device="cpu", latents_path=tmp_path / "l.safetensors",
                        batch_size=4, progress=False)
    cache = LatentCache.load(tmp_path / "l.safetensors", latents_fingerprint(model, data, range(6), SEED))
    assert len(cache) == 6 and isinstance(cache[2], CorruptPair) and cache[2].index == 2
    rows = [5, 0, 3]  # another batch composition than the precompute's
    want_latents, want_cond = encode(model, collate_pairs([data[i] for i in rows]), SEED, "cpu")
    batch = collate_cached([cache[i] for i in [5, 2, 0, 3]])
    assert list(batch["corrupt"]) == [2] and batch["index"].tolist() == rows
    latents, cond = encode(model, batch, SEED, "cpu")
    torch.testing.assert_close(latents, want_latents)
    assert cond.keys() == want_cond.keys()
    for k in cond:
        torch.testing.assert_close(cond[k], want_cond[k])
    # the cached latents are posterior samples (of the pair's own draws), not the mean
    with torch.no_grad():
        px = collate_pairs([data[5]])["pixel_values"][0]
        mean = (model.vae.encode(px).latent_dist.mean - 0.1) * 0.5
    assert (cache[5]["latents"] - mean).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"rows \[7\] are not in the latent cache"):
        cache[7]
    again = pickle.loads(pickle.dumps(cache))  # what DataLoader workers started by spawn receive
    assert torch.equal(again[5]["latents"], cache[5]["latents"]) and isinstance(again[2], CorruptPair)


def test_cache_latents_runs_no_vae_or_text_encoder_and_changes_no_number(tmp_path, tiny, run_config, monkeypatch):
    # 10 training pairs, 2 a batch: 5 steps an epoch; 7 steps read two epochs of the cache
    kw = dict(max_train_steps=7, learning_rate=1e-3, beta=500.0, validation_steps=7)
    plain = run_config(output_dir=str(tmp_path / "plain"), **kw)
    train(plain, model=tiny(vae=True))
    cache_dir = tmp_path / "latents"
    first = run_config(output_dir=str(tmp_path / "first"), cache_latents=True, latent_cache_dir=str(cache_dir), **kw)
    train(first, model=tiny(vae=True))
    (built,) = os.listdir(cache_dir)
    stamp = os.stat(cache_dir / built).st_mtime_ns

    # A second run reuses the file; its steps (and its held-out evaluation) must not run a VAE encoder or a
    # text encoder. Sampling the validation grid still encodes the validation prompts: allowed there only.
    model = tiny(vae=True)
    sampling = {"on": False}

    def refuse(what):
        def forward(*args, **kwargs):
            raise AssertionError(f"the {what} ran in a --cache_latents step")
        return forward

    monkeypatch.setattr(model.vae, "encode", refuse("VAE encoder"))
    for enc in model.text_encoders:
        original = enc.forward
        monkeypatch.setattr(enc, "forward", lambda *a, _orig=original, **k: _orig(*a, **k) if sampling["on"]
                            else refuse("text encoder")())
    sample = model.sample

    def sample_allowing_prompts(*args, **kwargs):
        sampling["on"] = True
        try:
            return sample(*args, **kwargs)
        finally:
            sampling["on"] = False

    monkeypatch.setattr(model, "sample", sample_allowing_prompts)
    second = run_config(output_dir=str(tmp_path / "second"), cache_latents=True, latent_cache_dir=str(cache_dir), **kw)
    result = train(second, model=model)
    assert result.global_step == 7
    assert os.listdir(cache_dir) == [built] and os.stat(cache_dir / built).st_mtime_ns == stamp

    rows = {name: _rows(os.path.join(c.output_dir, "logs", "train.csv")) for name, c in
            (("plain", plain), ("first", first), ("second", second))}
    assert [r["loss"] for r in rows["first"]] == [r["loss"] for r in rows["second"]]
    # Cached and uncached runs see the same latents up to fp32 rounding (the VAE encoded each row in another
    # batch: another convolution summation order): the errors agree to a few ulps (rtol 1e-6 ≈ 8·eps32), and
    # u = −½β·(four errors' difference) — and the loss, |dℓ/du| ≤ 1 — to ½β·4·(8·eps32·max e).
    col = lambda name, key: torch.tensor([float(r[key]) for r in rows[name]])  # noqa: E731
    errors = ("model_err_win", "model_err_lose", "ref_err_win", "ref_err_lose")
    for key in errors:
        torch.testing.assert_close(col("first", key), col("plain", key), rtol=1e-6, atol=0, msg=key)
    max_e = max(col("plain", k).max().item() for k in errors)
    atol = 0.5 * kw["beta"] * 4 * 8 * torch.finfo(torch.float32).eps * max_e
    for key in ("u", "loss"):
        torch.testing.assert_close(col("first", key), col("plain", key), rtol=0, atol=atol, msg=key)
    evals = {name: _rows(os.path.join(c.output_dir, "logs", "eval.csv")) for name, c in
             (("plain", plain), ("second", second))}
    assert evals["plain"][-1]["heldout_accuracy"] == evals["second"][-1]["heldout_accuracy"]


def _fingerprints(model, data, rows=range(6), seed=SEED, dtype=torch.float32):
    lat = latents_fingerprint(model, data, rows, seed)
    return lat, reference_fingerprint(model, lat, seed, dtype)


def _perturb(module):
    with torch.no_grad():
        next(p for n, p in module.named_parameters() if "lora_" not in n).add_(1e-3)


CHANGES = {  # what changes → (latents fields, reference fields) that must differ
    "seed": (lambda m, d: _fingerprints(m, d, seed=SEED + 1), {"seed"}, {"seed", "latents"}),
    "dataset": (lambda m, d: _fingerprints(m, SyntheticPreferences(6, 16, seed=SEED + 1)), {"dataset"}, {"latents"}),
    "resolution": (lambda m, d: _fingerprints(m, SyntheticPreferences(6, 8, seed=SEED)), {"resolution"}, {"latents"}),
    "rows": (lambda m, d: _fingerprints(m, d, rows=range(5)), {"rows"}, {"latents"}),
    "image transform": (lambda m, d: _fingerprints(m, SyntheticPreferences(6, 16, seed=SEED, random_flip=True)),
                        {"image_transform"}, {"latents"}),
    "vae": (lambda m, d: (_perturb(m.vae), _fingerprints(m, d))[1], {"vae"}, {"latents"}),
    "text encoder": (lambda m, d: (_perturb(m.text_encoders[0]), _fingerprints(m, d))[1], {"text"}, {"latents"}),
    "tokenizer": (lambda m, d: (setattr(m.tokenizers[0], "model_max_length", 8), _fingerprints(m, d))[1], {"text"},
                  {"latents"}),
    "reference weights": (lambda m, d: (_perturb(m.denoiser), _fingerprints(m, d))[1], set(), {"model"}),
    "scheduler": (lambda m, d: (m.scheduler.register_to_config(beta_schedule="linear"), _fingerprints(m, d))[1], set(),
                  {"scheduler"}),
    "precision": (lambda m, d: _fingerprints(m, d, dtype=torch.bfloat16), set(), {"model", "precision"}),
    "adapter weights": (lambda m, d: (_perturb_lora(m), _fingerprints(m, d))[1], set(), set()),
}


def _perturb_lora(model):  # training the LoRA adapter does not change the reference
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)


@pytest.mark.parametrize("change", CHANGES)
def test_fingerprints_change_with_what_the_numbers_depend_on(tmp_path, tiny, change):
    model = tiny(vae=True, lora=4)
    data = SyntheticPreferences(6, 16, seed=SEED)
    lat, ref = _fingerprints(model, data)
    fn, lat_fields, ref_fields = CHANGES[change]
    lat2, ref2 = fn(model, data)
    assert {k for k in lat if lat[k] != lat2[k]} == lat_fields
    assert {k for k in ref if ref[k] != ref2[k]} == ref_fields
    if lat_fields:  # a cache built for the first is refused by the second, naming the field
        _, _ = precompute(tiny(vae=True), data, range(2), seed=SEED, device="cpu", latents_path=tmp_path / "l",
                          progress=False)
        with pytest.raises(ValueError, match="latent cache for a different"):
            LatentCache.load(tmp_path / "l", {**lat, **{k: lat2[k] for k in lat_fields}})


def test_flow_models_fingerprint_their_timestep_density(tiny):
    model, data = tiny("fastpref:tiny-sd3"), SyntheticPreferences(4, 8)
    _, a = _fingerprints(model, data, rows=range(4))
    model.weighting_scheme = "none"
    _, b = _fingerprints(model, data, rows=range(4))
    assert {k for k in a if a[k] != b[k]} == {"timestep_sampling"}


def test_ref_cache_lookup_and_coverage():
    cache = RefErrorCache(torch.arange(12.0).reshape(2, 3, 2), torch.tensor([0, 5, 9]), {"format": "x"})
    torch.testing.assert_close(cache.lookup([9, 0], 1), torch.tensor([10.0, 6.0, 11.0, 7.0]))
    with pytest.raises(ValueError, match="epoch 2"):
        cache.lookup([0], 2)
    with pytest.raises(ValueError, match=r"rows \[4\] are not in the reference-error cache"):
        cache.lookup([4, 5], 0)
    cache.check_covers([0, 5, 9], 2)
    with pytest.raises(ValueError, match="--epochs 5"):
        cache.check_covers([0, 5, 9], 5)
    with pytest.raises(ValueError, match="needs 2 rows"):
        cache.check_covers([0, 4], 1)


def test_files_fingerprint_changes_with_the_files(tmp_path):
    f = tmp_path / "train.parquet"
    f.write_bytes(b"abc")
    a = files_fingerprint([f])
    assert a == files_fingerprint([f])
    f.write_bytes(b"abcd")
    assert a != files_fingerprint([f])


def test_precompute_command_writes_the_caches_a_run_reads(tmp_path, monkeypatch, capsys):
    from fastpref.train.cache import main

    toml = tmp_path / "run.toml"
    toml.write_text(f'synthetic_size = 12\neval_pairs = 2\ntrain_batch_size = 2\nmax_train_steps = 3\nseed = 3\n'
                    f'loss = "dmpo"\nlora_rank = 4\nreport_to = "csv"\nnum_inference_steps = 2\n'
                    f'validation_prompts = ["a red disc"]\noutput_dir = "{tmp_path / "out"}"\n')
    flags = ["--config", str(toml), "--cache_latents", "--latent_cache_dir", str(tmp_path / "latents"),
             "--reference_mode", "cache", "--ref_cache", str(tmp_path / "ref.safetensors")]
    assert main([*flags, "--device", "cpu"]) == 0
    assert "reference errors of 12 pairs × 1 epochs" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "latents")) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the run recomputed a cache fastpref-precompute had written")

    monkeypatch.setattr(cache_module, "precompute", refuse)
    steps = []
    result = train(parse_args(flags), on_step=lambda step, out: steps.append(out))
    assert result.global_step == 3 and all(set(out.ref) == {"ref_err"} for out in steps)

    assert main(["--config", str(toml)]) == 2
    assert "nothing to precompute" in capsys.readouterr().err


def test_cache_latents_flag_and_toml_key(tmp_path):
    assert parse_args([]).cache_latents is False
    assert parse_args(["--cache_latents"]).cache_latents is True
    toml = tmp_path / "run.toml"
    toml.write_text('cache_latents = true\nlatent_cache_dir = "caches/latents"\n')
    cfg = parse_args(["--config", str(toml)])
    assert (cfg.cache_latents, cfg.latent_cache_dir) == (True, "caches/latents")
    assert parse_args(["--config", str(toml), "--no-cache_latents"]).cache_latents is False
    toml.write_text('cache_latents = "yes"\n')
    with pytest.raises(ValueError, match="--cache_latents must be true or false"):
        parse_args(["--config", str(toml)])
    toml.write_text("latent_cache_dir = 3\n")
    with pytest.raises(ValueError, match="--latent_cache_dir must be a folder path"):
        parse_args(["--config", str(toml)])


def test_precompute_command_refuses_what_it_cannot_write(tmp_path, capsys):
    from fastpref.train.cache import main

    ref = ["--reference_mode", "cache", "--ref_cache", str(tmp_path / "ref.safetensors")]
    for argv, message in ([[], "nothing to precompute"], [["--reference_mode", "cache"], "needs --ref_cache PATH"],
                          [[*ref, "--sft_steps", "10"], "OUTPUT_DIR/sft_model"], [[*ref, "--epochs", "-1"], "--epochs"],
                          [["--cache_latents", "--loss", "nope"], "--loss must be one of"]):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
