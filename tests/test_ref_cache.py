"""Reference-error cache and latent cache: same numbers as computing them in the step, deterministic
per (pair, epoch), and refused when the model, data, seed or scheduler differ."""

from __future__ import annotations

import pytest
import torch
from _tiny_diffusers import LATENT_SHAPE, TEXT_DIM, TEXT_LEN, add_lora, random_pairs, scheduler_for, tiny_sd3, tiny_unet

import fastpref
from fastpref.reference import pair_errors
from fastpref.train.latent_cache import (
    LatentCache,
    build_latent_cache,
    derive_seed,
    files_fingerprint,
    latent_cache_fingerprint,
    stack_pairs,
)
from fastpref.train.ref_cache import (
    RefErrorCache,
    main,
    noisy_latents_and_target,
    precompute_reference_errors,
    reference_fingerprint,
    sample_noise_and_timesteps,
)
from fastpref.train.reference_modes import adapters_disabled, call_model, model_inputs

SEED = 11


def _precompute(model, pairs, path=None, seed=SEED, epochs=2):
    return precompute_reference_errors(
        model, pairs, scheduler=scheduler_for(model), seed=seed, epochs=epochs, dataset_fingerprint="pairs-v1",
        path=path, batch_size=2, progress=False,
    )


@pytest.mark.parametrize("builder", [tiny_unet, tiny_sd3], ids=["unet", "sd3"])
def test_cached_ref_err_gives_the_loss_of_ref_pred(builder, tmp_path):
    model = add_lora(builder()).train()
    pairs = random_pairs(model, 3)
    path = tmp_path / "ref.safetensors"
    _precompute(model, pairs, path)
    scheduler = scheduler_for(model)
    cache = RefErrorCache.load(
        path, reference_fingerprint(model, scheduler=scheduler, seed=SEED, dataset_fingerprint="pairs-v1")
    )

    # The training step: a batch of other composition than the precompute's, at epoch 1.
    batch, epoch = [2, 1], 1
    x0, cond = stack_pairs([pairs[i] for i in batch])
    noise, t_index = sample_noise_and_timesteps(scheduler, x0.shape[1:], batch, epoch, SEED)
    x_t, timesteps, target = noisy_latents_and_target(scheduler, x0, noise, t_index)
    inputs = model_inputs(model, x_t, timesteps, cond)
    model_pred = call_model(model, inputs)
    with torch.no_grad(), adapters_disabled(model):
        ref_pred = call_model(model, inputs)

    ref_err = cache.lookup(torch.tensor(batch), epoch)
    want = pair_errors(ref_pred, target)
    torch.testing.assert_close(ref_err, want)  # fp32 tolerance: the batches differ, so does summation order
    assert not torch.allclose(ref_err, cache.lookup(torch.tensor(batch), 0))  # epochs draw other noise

    e_m = pair_errors(model_pred.detach(), target)
    d = ((e_m[:2] - e_m[2:]) - (want[:2] - want[2:])).abs().max().item()
    beta = 2.0 / d  # |u| = O(1)
    loss_cached = fastpref.dpo_loss(model_pred, target=target, ref_err=ref_err, beta=beta)
    loss_pred = fastpref.dpo_loss(model_pred, ref_pred, target, beta=beta)
    # |ℓ'(u)| ≤ 1 and u moves by ½β·|δΔref| ≤ β·max|δe_ref|: the loss gap is bounded by the gap
    # between the cached errors and the ones the loss computes from ref_pred — which include the
    # fused kernel's own fp32 accumulation, |δe| ≤ 2·eps32·|e| (tests/_pairs.py)
    eps32 = torch.finfo(torch.float32).eps
    bound = beta * ((ref_err - want).abs().max().item() + 2 * eps32 * want.abs().max().item())
    assert (loss_cached - loss_pred).abs().item() <= bound


def test_cache_refuses_another_model_dataset_seed_or_scheduler(tmp_path):
    from diffusers import DDPMScheduler

    model = add_lora(tiny_unet())
    path = tmp_path / "ref.safetensors"
    _precompute(model, random_pairs(model, 2), path, epochs=1)
    scheduler = scheduler_for(model)

    def expected(m=model, s=scheduler, seed=SEED, data="pairs-v1"):
        return reference_fingerprint(m, scheduler=s, seed=seed, dataset_fingerprint=data)

    RefErrorCache.load(path, expected())  # the right one loads
    with pytest.raises(ValueError, match="different seed"):
        RefErrorCache.load(path, expected(seed=SEED + 1))
    with pytest.raises(ValueError, match="different dataset"):
        RefErrorCache.load(path, expected(data="pairs-v2"))
    with pytest.raises(ValueError, match="different scheduler"):
        RefErrorCache.load(path, expected(s=DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")))
    other = tiny_unet(seed=3)
    with pytest.raises(ValueError, match="different model"):
        RefErrorCache.load(path, expected(m=other))
    # Training the LoRA adapter does not change the reference (the base model): still valid.
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    RefErrorCache.load(path, expected())
    # ... but a changed base weight does.
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_" not in n).add_(1e-3)
    with pytest.raises(ValueError, match="different model"):
        RefErrorCache.load(path, expected())
    with pytest.raises(ValueError, match="does not exist"):
        RefErrorCache.load(tmp_path / "missing.safetensors", expected())


def test_cache_lookup_and_coverage_are_checked():
    cache = RefErrorCache(torch.arange(12.0).reshape(2, 3, 2), {"format": "x"})
    torch.testing.assert_close(cache.lookup([2, 0], 1), torch.tensor([10.0, 6.0, 11.0, 7.0]))
    with pytest.raises(ValueError, match="epoch 2"):
        cache.lookup([0], 2)
    with pytest.raises(ValueError, match="pair indices"):
        cache.lookup([3], 0)
    cache.check_covers(3, 2)
    with pytest.raises(ValueError, match="--epochs 5"):
        cache.check_covers(3, 5)


def test_noise_and_timesteps_are_per_pair_and_epoch():
    scheduler = scheduler_for(tiny_unet())
    n1, t1 = sample_noise_and_timesteps(scheduler, LATENT_SHAPE, [5], 0, SEED)
    n2, t2 = sample_noise_and_timesteps(scheduler, LATENT_SHAPE, [0, 5], 0, SEED)
    assert torch.equal(n1[0], n2[1]) and torch.equal(t1[0], t2[1])  # independent of the batch
    n3, _ = sample_noise_and_timesteps(scheduler, LATENT_SHAPE, [5], 1, SEED)
    n4, _ = sample_noise_and_timesteps(scheduler, LATENT_SHAPE, [5], 0, SEED + 1)
    assert not torch.equal(n1, n3) and not torch.equal(n1, n4)
    assert derive_seed(1, 2) != derive_seed(2, 1)

    flow = scheduler_for(tiny_sd3())
    _, t_logit = sample_noise_and_timesteps(flow, LATENT_SHAPE, range(200), 0, SEED)
    _, t_uniform = sample_noise_and_timesteps(flow, LATENT_SHAPE, range(200), 0, SEED, weighting_scheme="none")
    # logit-normal puts ~68% of u in (σ(−1), σ(1)) = (0.27, 0.73); uniform ~46%
    middle = lambda t: ((t >= 269) & (t < 731)).float().mean().item()  # noqa: E731
    assert middle(t_logit) > 0.58 and middle(t_uniform) < 0.58
    with pytest.raises(ValueError, match="weighting_scheme"):
        sample_noise_and_timesteps(flow, LATENT_SHAPE, [0], 0, SEED, weighting_scheme="cosine")
    sd3 = tiny_sd3()
    fp = {w: reference_fingerprint(sd3, scheduler=flow, seed=SEED, dataset_fingerprint="d", weighting_scheme=w)
          for w in ("none", "logit_normal")}
    assert fp["none"]["timestep_sampling"] != fp["logit_normal"]["timestep_sampling"]


def test_noising_matches_the_diffusers_schedulers():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *LATENT_SHAPE, generator=g)
    noise = torch.randn(2, *LATENT_SHAPE, generator=g)
    t_index = torch.tensor([10, 900])
    eps, idx = torch.cat([noise, noise]), torch.cat([t_index, t_index])

    ddpm = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x_t, t, target = noisy_latents_and_target(ddpm, x0, noise, t_index)
    torch.testing.assert_close(x_t, ddpm.add_noise(x0, eps, idx))
    torch.testing.assert_close(target, ddpm.get_velocity(x0, eps, idx))
    assert torch.equal(t, idx)

    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    x_t, t, target = noisy_latents_and_target(flow, x0, noise, t_index)
    torch.testing.assert_close(t, flow.timesteps[idx])
    torch.testing.assert_close(x_t, flow.scale_noise(x0, t, eps))  # diffusers' σ·ε + (1 − σ)·x0
    torch.testing.assert_close(target, eps - x0)


# ----------------------------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------------------------


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=LATENT_SHAPE[0],
        norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1,
    ).eval()


def _tiny_text_encoder():
    """A tiny random CLIP text model and a byte-level stand-in for its tokenizer (no vocab files offline)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=260, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
    )).eval()

    def encode_prompt(captions):
        ids = torch.tensor([(list(c.encode())[: TEXT_LEN] + [0] * TEXT_LEN)[:TEXT_LEN] for c in captions])
        return {"encoder_hidden_states": encoder(ids)[0]}

    return encoder, encode_prompt


def _image_pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, "caption": f"a red square {i}"}
            for i in range(n)]


def test_latent_cache_stores_what_the_encoders_give_and_refuses_changes(tmp_path):
    vae, (encoder, encode_prompt) = _tiny_vae(), _tiny_text_encoder()
    data = _image_pairs(3)
    kw = dict(vae=vae, encode_prompt=encode_prompt, text_encoders=[encoder], dataset_fingerprint="rows-v1", seed=SEED,
              progress=False)
    build_latent_cache(tmp_path / "a.safetensors", dataset=data, batch_size=2, **kw)
    # the diffusers DPO layout (6, H, W) and another batch size give the same rows
    flat = [{"pixel_values": d["pixel_values"].flatten(0, 1), "caption": d["caption"]} for d in data]
    build_latent_cache(tmp_path / "b.safetensors", dataset=flat, batch_size=1, **kw)

    expected = latent_cache_fingerprint(vae=vae, text_encoders=[encoder], dataset_fingerprint="rows-v1", seed=SEED)
    a = LatentCache.load(tmp_path / "a.safetensors", expected)
    b = LatentCache.load(tmp_path / "b.safetensors", expected)
    assert len(a) == 3
    for i in range(3):
        g = [torch.Generator().manual_seed(derive_seed(SEED, i, j)) for j in (0, 1)]
        with torch.no_grad():
            dist = vae.encode(data[i]["pixel_values"]).latent_dist
            want = (dist.sample(generator=g) - 0.1) * 0.5
            want_cond = encode_prompt([data[i]["caption"]])["encoder_hidden_states"][0]
        torch.testing.assert_close(a[i]["latents"], want)
        torch.testing.assert_close(b[i]["latents"], want)
        torch.testing.assert_close(a[i]["cond"]["encoder_hidden_states"], want_cond)
    assert (a[0]["latents"] - (vae.encode(data[0]["pixel_values"]).latent_dist.mean - 0.1) * 0.5).abs().max() > 1e-4

    with pytest.raises(ValueError, match="different dataset"):
        LatentCache.load(tmp_path / "a.safetensors", {**expected, "dataset": "rows-v2"})
    with pytest.raises(ValueError, match="different seed"):
        LatentCache.load(tmp_path / "a.safetensors", {**expected, "seed": "12"})
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    changed = latent_cache_fingerprint(vae=vae, text_encoders=[encoder], dataset_fingerprint="rows-v1", seed=SEED)
    with pytest.raises(ValueError, match="different vae"):
        LatentCache.load(tmp_path / "a.safetensors", changed)
    with pytest.raises(ValueError, match="caption must be a string"):
        build_latent_cache(tmp_path / "c.safetensors", dataset=[{"pixel_values": data[0]["pixel_values"]}], **kw)
    with pytest.raises(ValueError, match="not a reference-error cache"):
        RefErrorCache.load(tmp_path / "a.safetensors", {})


def test_files_fingerprint_changes_with_the_files_and_settings(tmp_path):
    f = tmp_path / "train.parquet"
    f.write_bytes(b"abc")
    a = files_fingerprint([f], resolution=512)
    assert a == files_fingerprint([f], resolution=512)
    assert a != files_fingerprint([f], resolution=1024)
    f.write_bytes(b"abcd")
    assert a != files_fingerprint([f], resolution=512)


def test_precompute_cli_on_a_latent_cache(tmp_path):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    vae, (encoder, encode_prompt) = _tiny_vae(), _tiny_text_encoder()
    latents = build_latent_cache(
        tmp_path / "latents.safetensors", vae=vae, encode_prompt=encode_prompt, dataset=_image_pairs(3),
        dataset_fingerprint="rows-v1", seed=SEED, progress=False,
    )
    tiny_unet().save_pretrained(tmp_path / "pipe" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "pipe" / "scheduler")
    out = tmp_path / "ref.safetensors"
    assert main([
        "--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--latent_cache", str(latents.path),
        "--output", str(out), "--seed", str(SEED), "--epochs", "2", "--batch_size", "2", "--device", "cpu",
    ]) == 0

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    cache = RefErrorCache.load(
        out,
        reference_fingerprint(unet, scheduler=scheduler, seed=SEED, dataset_fingerprint=latents.dataset_fingerprint),
    )
    assert cache.ref_err.shape == (2, 3, 2)
    want = precompute_reference_errors(
        unet, latents, scheduler=scheduler, seed=SEED, epochs=2, dataset_fingerprint=latents.dataset_fingerprint,
        batch_size=3, progress=False,
    )
    torch.testing.assert_close(cache.ref_err, want.ref_err)
