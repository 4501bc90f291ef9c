"""The transformer families beyond SD3: SD3.5 (dual attention, RMS qk-norm) and Flux (packed latents,
image/text ids, guidance embedding), on their embedded tiny models; sampling through each family's
diffusers pipeline; the LoRA file that pipeline loads. (The reference modes of every family:
tests/train/test_reference.py.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastpref.train import compute_loss, train
from fastpref.train.cache import collate_cached, latents_fingerprint, precompute, reference_fingerprint
from fastpref.train.data import SyntheticPreferences, collate_pairs
from fastpref.train.models import build_tiny_model, load_model, save_model
from fastpref.train.noise import draw_noise, noise_pairs
from fastpref.train.objectives import get_objective
from fastpref.train.pipelines import build_pipeline, pipeline_class
from fastpref.train.reference import make_reference, tuner_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 5


def _lora_names(model) -> list[str]:
    layers = set(tuner_layers(model.denoiser))
    return [n for n, m in model.denoiser.named_modules() if m in layers]


def test_tiny_sd35_has_dual_attention_and_qk_norm_and_lora_adapts_both_attentions(tiny):
    model = tiny("fastpref:tiny-sd35", lora=4)
    config = model.denoiser.config
    assert tuple(config.dual_attention_layers) == (0,) and config.qk_norm == "rms_norm"
    block = model.denoiser.transformer_blocks[0]
    assert block.attn2 is not None and type(block.attn.norm_q).__name__ == "RMSNorm"
    names = _lora_names(model)
    for part in ("attn.to_q", "attn.to_out.0", "attn.add_k_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_v",
                 "attn2.to_out.0"):
        assert f"transformer_blocks.0.{part}" in names, part
    # the second attention changes the output: a LoRA on it is a LoRA on something the model uses
    assert model.family == "sd3" and model.weighting_scheme == "logit_normal"


def test_tiny_flux_lora_covers_double_and_single_blocks(tiny):
    model = tiny("fastpref:tiny-flux", lora=4)
    names = _lora_names(model)
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                 "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2",
                 "transformer_blocks.0.ff_context.net.0.proj", "single_transformer_blocks.0.attn.to_k"):
        assert name in names, name
    assert model.family == "flux" and model.prediction_type == "flow_matching"
    assert model.latent_channels == 3 and model.resolution == 8  # packed 12 channels; pixel space
    assert model.denoiser.config.guidance_embeds


def test_flux_guidance_and_timestep_reach_the_transformer(tiny):
    model = tiny("fastpref:tiny-flux")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(SEED))
    t = torch.tensor([250.0, 750.0])
    cond = model.encode_prompts(["a red disc", "a blue square"], "cpu")
    with torch.no_grad():
        base = model.predict(model.denoiser, x, t, cond)
        model.guidance_scale = 1.0
        other_guidance = model.predict(model.denoiser, x, t, cond)
        model.guidance_scale = 3.5
        other_t = model.predict(model.denoiser, x, t.flip(0), cond)
        # row k depends on row k only (packing, ids and guidance are per sample)
        alone = model.predict(model.denoiser, x[1:], t[1:], {k: v[1:] for k, v in cond.items()})
    assert base.shape == x.shape
    assert (base - other_guidance).abs().max() > 1e-4 and (base - other_t).abs().max() > 1e-4
    torch.testing.assert_close(alone, base[1:])
    with pytest.raises(ValueError, match="latent size must be even"):
        model.predict(model.denoiser, torch.zeros(1, 3, 7, 7), t[:1], {k: v[:1] for k, v in cond.items()})


@pytest.mark.parametrize("name,vae", [("fastpref:tiny-sd3", False), ("fastpref:tiny-sd35", True),
                                      ("fastpref:tiny-flux", False), ("fastpref:tiny-flux", True)])
def test_pipeline_sampling_is_euler_through_the_training_prediction(tiny, name, vae):
    """The family's pipeline, given the policy, integrates the same transformer call the training step
    makes (for Flux: packing, ids, t/1000, guidance): an Euler loop through ``model.predict`` from the
    same seeds, on the pipeline's sigma schedule, decoded by the model, gives the same images. With a
    VAE (16×16 images, 3×8×8 latents, scaling and shift) the pipeline's latent size is the model's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny(name, vae=vae, lora=4, lora_b=0.1)  # a LoRA policy, as the trainer evaluates it
    prompts, seeds, steps = ["a red disc", "a blue square", "a red disc"], [3, 4, 9], 3
    images = model.sample(model.denoiser, prompts, seeds, steps, "cpu")
    assert images.shape == (3, 3, model.resolution, model.resolution) and images.abs().max() <= 1

    sched = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    if model.family == "flux":  # FluxPipeline's schedule
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    else:
        sched.set_timesteps(steps)
    x = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond = model.encode_prompts(prompts, "cpu")
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.predict(model.denoiser, x, t.expand(3), cond), t, x).prev_sample
        want = model.decode_latents(x)
    torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)
    # image k depends on its own prompt and seed only
    torch.testing.assert_close(model.sample(model.denoiser, prompts[1:2], seeds[1:2], steps, "cpu"), images[1:2])
    # the pipeline ran the policy, adapters included
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert (model.sample(model.denoiser, prompts, seeds, steps, "cpu") - images).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["fastpref:tiny-sd35", "fastpref:tiny-flux"])
def test_lora_file_loads_into_a_fresh_family_pipeline(tmp_path, run_config, name):
    """Train, then ``Pipeline.from_pretrained(base).load_lora_weights(output_dir)``: its transformer predicts
    what the trained policy predicts, and not what the base model does."""
    policy = build_tiny_model(name)
    cfg = run_config(pretrained_model_name_or_path=name, max_train_steps=2, learning_rate=5e-2)
    train(cfg, model=policy)
    assert os.path.isfile(os.path.join(cfg.output_dir, "pytorch_lora_weights.safetensors"))

    base = build_tiny_model(name)  # the same seeded weights the run started from
    save_model(base, str(tmp_path / "base"))
    absent = {"vae": None} | ({"text_encoder_3": None, "tokenizer_3": None} if base.family == "sd3" else {})
    pipe = pipeline_class(base.family).from_pretrained(str(tmp_path / "base"), **absent)  # pixel space, no T5
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(SEED))
    t = torch.tensor([300.0, 800.0])
    cond = base.encode_prompts(["a red disc", "a blue square"], "cpu")
    with torch.no_grad():
        before = base.predict(pipe.transformer, x, t, cond)
        pipe.load_lora_weights(cfg.output_dir)
        after = base.predict(pipe.transformer, x, t, cond)
        want = policy.predict(policy.denoiser.eval(), x, t, cond)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fastpref:tiny-sd35", "fastpref:tiny-flux"])
def test_cache_latents_gives_the_steps_numbers(tmp_path, tiny, run_config, cpu_accelerator, name):
    """With a VAE (latents 3×8×8, scaling and shift): the latent cache's batch gives the loss the encoded
    batch gives, in every reference mode that reads the policy (Flux packs the cached latents as it
    packs encoded ones)."""
    model = tiny(name, vae=True, lora=4, lora_b=0.1)
    data = SyntheticPreferences(6, 16, seed=SEED)
    cache, _ = precompute(model, data, range(6), seed=SEED, device="cpu", latents_path=tmp_path / "l.safetensors",
                          batch_size=4, progress=False)
    rows = [4, 0, 3]
    plain = collate_pairs([data[i] for i in rows])
    cached = collate_cached([cache[i] for i in rows])
    cfg = run_config(seed=SEED, beta=200.0)
    for mode in ("adapter_off", "batched"):
        reference = make_reference(mode, model)
        a = compute_loss(model, model.denoiser, reference, get_objective("dpo"), plain, cfg, cpu_accelerator)
        b = compute_loss(model, model.denoiser, reference, get_objective("dpo"), cached, cfg, cpu_accelerator)
        assert a.model_pred.shape == (6, 3, 8, 8)
        torch.testing.assert_close(b.model_pred, a.model_pred, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    assert (a.model_pred - a.ref["ref_pred"]).abs().max() > 1e-3  # policy ≠ reference: a real comparison


def test_timestep_density_follows_each_familys_script_and_the_flags(tiny):
    """Flux's script samples t uniformly ("none"), SD3's logit-normal; --logit_mean/--logit_std/--mode_scale
    reach the draws; the reference-error fingerprint holds them and Flux's guidance value."""
    assert load_model("fastpref:tiny-flux").weighting_scheme == "none"
    assert load_model("fastpref:tiny-sd3").weighting_scheme == "logit_normal"
    assert load_model("fastpref:tiny-flux", weighting_scheme="mode").weighting_scheme == "mode"
    model = load_model("fastpref:tiny-sd35", logit_mean=2.0, logit_std=0.5)
    assert (model.logit_mean, model.logit_std) == (2.0, 0.5)
    x0 = torch.zeros(2 * 64, 3, 8, 8)
    late = noise_pairs(model, x0, range(64), 0, SEED).timesteps
    model.logit_mean = 0.0
    centred = noise_pairs(model, x0, range(64), 0, SEED).timesteps
    # u = sigmoid(2 + 0.5 z) ≈ 0.88 vs ≈ 0.5 → index u·1000 into the descending timesteps: t ≈ 120 vs ≈ 500
    assert late.float().mean() < centred.float().mean() - 200
    _, a = draw_noise(model.scheduler, (1,), range(64), 0, SEED, "mode", mode_scale=1.29)
    _, b = draw_noise(model.scheduler, (1,), range(64), 0, SEED, "mode", mode_scale=0.0)
    assert not torch.equal(a, b)

    # FLUX.1's scheduler (shift 3, dynamic shifting): training σ unshifted, t = 1000 − index, as the Flux
    # script's copy of it gives; a static shift 3 (SD3's scheduler) shifts them
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux = load_model("fastpref:tiny-flux")
    _, index = draw_noise(flux.scheduler, (1,), range(64), 0, SEED, "none")
    for dynamic in (True, False):
        flux.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
        t = noise_pairs(flux, torch.zeros(2 * 64, 3, 8, 8), range(64), 0, SEED).timesteps[:64]
        assert torch.allclose(t, 1000.0 - index.float(), rtol=0, atol=1e-3) == dynamic

    flux, data = tiny("fastpref:tiny-flux"), SyntheticPreferences(4, 8)
    lat = latents_fingerprint(flux, data, range(4), SEED)
    first = reference_fingerprint(flux, lat, SEED, torch.float32)
    flux.guidance_scale = 1.0
    second = reference_fingerprint(flux, lat, SEED, torch.float32)
    assert {k for k in first if first[k] != second[k]} == {"timestep_sampling"}
    assert "guidance=3.5" in first["timestep_sampling"] and first["timestep_sampling"].startswith("none")


def test_flux_pipeline_built_from_the_model_samples_its_parts(tiny):
    model = tiny("fastpref:tiny-flux")
    pipe = build_pipeline(model, model.denoiser)
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer is model.denoiser
    assert pipe.text_encoder_2 is model.text_encoders[1] and pipe.vae is None and pipe.vae_scale_factor == 1
    model.sample(model.denoiser, ["a red disc"], [0], 2, "cpu")
    assert len(model.scheduler.timesteps) == 1000  # sampling's set_timesteps did not reach the training scheduler
    with pytest.raises(ValueError, match="family must be one of"):
        pipeline_class("kandinsky")
