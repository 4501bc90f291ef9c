"""The Flux family (``FluxPipeline`` folders): what differs from SD3 in a training step.

Follows diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` and ``FluxPipeline``:

* **text**: the pooled output of the CLIP text encoder (``pooled_projections``) and the last hidden
  state of the T5 encoder (``encoder_hidden_states``, at most 512 tokens); ``txt_ids`` are zeros.
* **latents**: the VAE latent ``(C, h, w)`` (``(mean + std·z − shift_factor)·scaling_factor``) is cut
  into 2×2 patches, ``FluxPipeline._pack_latents`` → ``(h/2·w/2, 4C)``, with ``img_ids`` = (0, row, col)
  of each patch; the prediction is unpacked back (``_unpack_latents``). The trainer keeps latents,
  noise, targets and caches in the unpacked ``(C, h, w)`` shape and packs only around the transformer
  call (:func:`predict`): packing is a permutation, so per-sample errors are unchanged and the noise of
  a pair — drawn in the unpacked shape, per (pair, epoch) — is what an unpacked draw would be.
* **timestep**: the transformer takes ``t/1000`` (it multiplies by 1000 inside), as the script passes.
* **guidance**: a guidance-distilled checkpoint (``config.guidance_embeds``, FLUX.1-dev) gets
  ``guidance = guidance_scale`` per sample (``--guidance_scale``, the script's default 3.5); the same
  value is used when sampling. Checkpoints without the embedding (FLUX.1-schnell) get ``None``.
* **noise**: flow matching as SD3, ``x_t = (1 − σ)·x0 + σ·ε``, target ``ε − x0``; the timestep density
  default is the Flux script's ``weighting_scheme="none"`` (uniform). The script indexes a copy of the
  checkpoint's scheduler, whose sigmas carry no shift when ``use_dynamic_shifting`` is set (FLUX.1's
  scheduler config: the resolution-dependent shift is applied only at sampling) — so training, here as
  there, samples unshifted σ, and a scheduler with a static ``shift`` (SD3) shifts them.
"""

from __future__ import annotations

import torch

__all__ = ["LORA_TARGET_MODULES", "T5_MAX_TOKENS", "DEFAULT_SAMPLE_SIZE", "encode_prompts", "predict",
           "build_tiny_flux"]

# train_dreambooth_lora_flux.py's default --lora_layers ("attn." also matches the single blocks' attention)
LORA_TARGET_MODULES = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2"]
T5_MAX_TOKENS = 512  # FluxPipeline refuses a longer max_sequence_length
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latents 128² → 1024² pixels with FLUX.1's VAE


def _ids(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_prompts(model, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """``{"encoder_hidden_states": T5 states (N, L, joint), "pooled_projections": CLIP pooled (N, P)}``,
    as ``FluxPipeline.encode_prompt`` computes them (max_sequence_length = the T5 tokenizer's
    ``model_max_length``, at most 512)."""
    (clip_tok, t5_tok), (clip, t5) = model.tokenizers, model.text_encoders
    pooled = clip(_ids(clip_tok, prompts, clip_tok.model_max_length, device), output_hidden_states=False).pooler_output
    t5_ids = _ids(t5_tok, prompts, min(t5_tok.model_max_length, T5_MAX_TOKENS), device)
    states = t5(t5_ids, output_hidden_states=False)[0]
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def predict(model, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    """One transformer call on unpacked ``noisy`` (N, C, h, w): pack, ids, guidance, ``t/1000``; the
    prediction unpacked to (N, C, h, w)."""
    from diffusers import FluxPipeline

    n, c, h, w = noisy.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2×2 latent patches: the latent size must be even, got {h}×{w} "
                         f"(choose --resolution a multiple of {2 * model.vae_scale_factor})")
    packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
    text = cond["encoder_hidden_states"]
    txt_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = None
    if model.denoiser.config.guidance_embeds:  # the config of the (unwrapped) policy; the reference's is the same
        guidance = torch.full((n,), float(model.guidance_scale), device=noisy.device, dtype=torch.float32)
    out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, encoder_hidden_states=text,
                   pooled_projections=cond["pooled_projections"], txt_ids=txt_ids, img_ids=img_ids,
                   return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, 1)


def build_tiny_flux(sample_size: int, tokenizer, max_length: int):
    """``fastpref:tiny-flux``'s parts (call under a fixed seed): a 1 + 1 block ``FluxTransformer2DModel``
    with the guidance embedding, on pixels (3 channels → 12 after packing); a tiny ``CLIPTextModel``
    (pooled, 16 wide) and a tiny ``T5EncoderModel`` (32 wide). Both encoders read the CLIP tokenizer's ids
    (the T5 encoder's vocabulary is sized for it): no T5 vocabulary needs to be downloaded, and
    ``FluxPipeline`` only calls ``tokenizer_2`` as a callable tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=16))
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return transformer, scheduler, [clip, t5]
