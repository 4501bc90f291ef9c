"""``--loss rpo`` / ``--loss orrpo``: Diffusion-RPO (Gu et al., 2024, arXiv:2406.06382) in the trainer,
with CLIP embeddings of each pair from a small randomly initialised open_clip model (nothing downloaded)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import fastpref
from fastpref.train import TrainConfig, compute_loss, train
from fastpref.train.cache import collate_cached
from fastpref.train.clip_embed import RPO_TAU, TINY_CLIP, build_clip_embedder, default_tau
from fastpref.train.config import build_parser, parse_args
from fastpref.train.data import SyntheticPreferences, collate_pairs
from fastpref.train.objectives import get_objective
from fastpref.train.reference import make_reference

pytest.importorskip("open_clip")
pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("loss,cache_latents", [("rpo", False), ("orrpo", True)])
def test_a_few_steps_train(run_config, loss, cache_latents):
    cfg = run_config(loss=loss, max_train_steps=2, train_batch_size=3, cache_latents=cache_latents)
    steps = []
    result = train(cfg, on_step=lambda step, out: steps.append(out.loss.detach()))
    assert len(steps) == 2 and all(torch.isfinite(s) for s in steps)
    assert result.global_step == 2
    train_rows = _rows(os.path.join(cfg.output_dir, "logs", "train.csv"))
    assert all(float(r["loss"]) == float(r["loss"]) for r in train_rows)  # logged and not NaN
    lora = load_file(os.path.join(cfg.output_dir, "pytorch_lora_weights.safetensors"))
    b_mats = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert b_mats and any(v.abs().max() > 0 for v in b_mats)  # B starts at zero: the adapters moved


def _pair_batch(n, seed=5):
    data = SyntheticPreferences(16, 8, seed=seed)
    return data, collate_pairs([data[i] for i in range(n)])


def test_embeddings_have_no_gradient_and_match_fastpref_clip(run_config):
    from fastpref.clip import rpo_embeddings

    embedder = build_clip_embedder(run_config(loss="rpo"), "cpu")
    embedder.model.requires_grad_(True)  # even a model that would record a graph gives constants
    data, batch = _pair_batch(3)
    win, lose = embedder(batch, "cpu")
    assert win.shape == lose.shape == (3, 32) and win.dtype == torch.float32
    assert not win.requires_grad and not lose.requires_grad and win.grad_fn is None and lose.grad_fn is None
    px = batch["pixel_values"]
    want = rpo_embeddings(embedder.model, embedder.preprocess(px[:, 0]), embedder.preprocess(px[:, 1]),
                          batch["caption"])
    torch.testing.assert_close(win, want[0], rtol=0, atol=0)
    torch.testing.assert_close(lose, want[1], rtol=0, atol=0)
    assert not torch.allclose(win, lose)  # the winner and loser images differ

    # the table (--cache_latents) gives the per-step numbers
    embedder.fill(data, range(5), batch_size=2)
    cached = collate_cached([{"latents": torch.zeros(2, 3, 8, 8), "cond": {}, "index": i} for i in (2, 0, 1)])
    tw, tl = embedder(cached, "cpu")
    torch.testing.assert_close(tw, win[[2, 0, 1]], rtol=0, atol=0)
    torch.testing.assert_close(tl, lose[[2, 0, 1]], rtol=0, atol=0)


def test_preprocess_matches_open_clip_normalisation(run_config):
    embedder = build_clip_embedder(run_config(loss="rpo"), "cpu")
    px = torch.rand(2, 3, 16, 16) * 2 - 1  # already at the tiny CLIP's 16×16 input: no resize
    mean = torch.tensor(embedder.model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(embedder.model.visual.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(embedder.preprocess(px), ((px + 1) / 2 - mean) / std)
    assert embedder.preprocess(torch.zeros(1, 3, 8, 8)).shape == (1, 3, 16, 16)


def _step(tiny, run_config, cpu_accelerator, loss, batch, **kw):
    model = tiny(lora=4, lora_b=0.1)
    cfg = run_config(loss=loss, beta=kw.pop("beta", None))
    objective = get_objective(loss)
    clip = build_clip_embedder(cfg, "cpu")
    reference = make_reference("adapter_off" if objective.needs_reference else "none", model)
    out = compute_loss(model, model.denoiser, reference, objective, batch, cfg, cpu_accelerator, clip=clip, **kw)
    lora = [p for p in model.denoiser.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, lora)


def test_one_pair_rpo_is_dpo(tiny, run_config, cpu_accelerator):
    _, batch = _pair_batch(1)
    rpo, g_rpo = _step(tiny, run_config, cpu_accelerator, "rpo", batch, tau=0.01, beta=200.0)
    dpo, g_dpo = _step(tiny, run_config, cpu_accelerator, "dpo", batch, beta=200.0)
    assert abs(dpo.loss.item() - 0.6931) > 1e-4  # u ≠ 0: a real comparison
    torch.testing.assert_close(rpo.loss, dpo.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_rpo, g_dpo):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("loss", ["rpo", "orrpo"])
def test_the_step_is_the_library_loss_with_tau(tiny, run_config, cpu_accelerator, loss):
    _, batch = _pair_batch(3)
    losses = {}
    for tau in (0.05, 2.0):
        out, _ = _step(tiny, run_config, cpu_accelerator, loss, batch, tau=tau, beta=200.0)
        embedder = build_clip_embedder(run_config(loss=loss), "cpu")
        win, lose = embedder(batch, "cpu")
        pred = out.model_pred.float()
        if loss == "rpo":
            want = fastpref.rpo_loss(pred, out.ref["ref_pred"], out.target, win_emb=win, lose_emb=lose, tau=tau,
                                     beta=200.0)
        else:
            want = fastpref.orpo_loss(pred, torch.cat([out.target] * 2), win_emb=win, lose_emb=lose, tau=tau,
                                      beta=200.0)
        torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=1e-6)
        losses[tau] = out.loss.item()
    assert abs(losses[0.05] - losses[2.0]) > 1e-5  # τ reaches the loss


def test_compute_loss_refuses_rpo_without_embeddings(tiny, run_config, cpu_accelerator):
    model = tiny(lora=4)
    _, batch = _pair_batch(2)
    with pytest.raises(ValueError, match="CLIP embeddings"):
        compute_loss(model, model.denoiser, make_reference("adapter_off", model), get_objective("rpo"), batch,
                     run_config(loss="rpo"), cpu_accelerator)


def test_tau_defaults_per_model_family(tiny):
    assert default_tau(tiny()) == RPO_TAU["sd15"] == 0.01
    assert default_tau(tiny("fastpref:tiny-sd3")) == 0.01
    assert default_tau(tiny("fastpref:tiny-sdxl")) == RPO_TAU["sdxl"] == 0.5


@pytest.mark.parametrize("argv,match", [
    (["--loss", "rpo", "--clip_model", "ViT-Nope-0"], "--clip_model must be an open_clip model name"),
    (["--loss", "orrpo", "--clip_model", "ViT-B-32", "--clip_pretrained", "no_such_tag"], "--clip_pretrained must be"),
    (["--loss", "rpo", "--clip_model", TINY_CLIP, "--clip_pretrained", "openai"], "randomly initialised"),
    (["--loss", "rpo", "--clip_combiner", "max"], "--clip_combiner must be one of mean, image, text"),
    (["--loss", "rpo", "--rpo_tau", "0"], "--rpo_tau must be a finite number > 0"),
    (["--loss", "rpo", "--pretrained_model_name_or_path", "some/hub-model"], "--loss rpo/orrpo needs --clip_model"),
    (["--loss", "dro", "--reference_mode", "cache", "--ref_cache", __file__], "cannot use --reference_mode cache"),
])
def test_bad_flags_are_refused_before_the_model_loads(monkeypatch, argv, match):
    import fastpref.train.loop as loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=match):
        train(parse_args(argv + ["--output_dir", "unused"]))


def test_help_and_the_loss_error_list_rpo_and_orrpo():
    text = build_parser().format_help()
    assert "rpo (Diffusion-RPO" in text and "orrpo (Diffusion-ORRPO" in text
    with pytest.raises(ValueError, match=r"--loss must be one of .*orrpo.*rpo"):
        TrainConfig(loss="nope").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU-less launch path: gloo processes on the CPU")
def test_rpo_two_processes_train_on_the_global_batch(tmp_path):
    """2 processes × 2 pairs take the step of 1 process × 4 pairs: same logged loss and gradient norm and
    the same weights — the weight matrix spans both processes' pairs, and the update is the global loss's."""
    from _runs import torchrun_two, worker_module

    _rpo_launch_worker = worker_module("_rpo_launch_worker")
    torchrun_two("_rpo_launch_worker", tmp_path / "two", tmp_path / "rec2", 2)
    _rpo_launch_worker.run(str(tmp_path / "one"), str(tmp_path / "rec1"), 4)

    two, one = (_rows(tmp_path / d / "logs" / "train.csv")[0] for d in ("two", "one"))
    for key in ("loss", "grad_norm", "u", "implicit_accuracy"):
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-4, abs=1e-6), key
    ranks = [json.loads((tmp_path / "rec2" / f"rank-{r}.json").read_text())["losses"]["1"] for r in (0, 1)]
    assert sum(ranks) / 2 == pytest.approx(float(one["loss"]), rel=1e-5)  # each rank: world × its share
    w2 = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    w1 = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
