"""The diffusers pipeline of each model family, built around the trainer's parts: ``StableDiffusionPipeline``
for ``"unet"`` (SD1.5-style), ``StableDiffusionXLPipeline`` for ``"sdxl"``, ``StableDiffusion3Pipeline`` for
``"sd3"`` (SD3, SD3.5), ``FluxPipeline`` for ``"flux"``.

Evaluation samples come from the family's own pipeline (its scheduler loop, and for the UNet families its
prompt encoding and ``time_ids``), so what the trainer shows is what a user of the saved weights gets; and
the LoRA file is written by that pipeline class's ``save_lora_weights``, so ``pipe.load_lora_weights(output_dir)``
reads it.

The transformer families (``sd3``, ``flux``) get the prompts as the embeddings the training step uses
(:meth:`~fastpref.train.models.DiffusionModel.encode_prompts`; for a real SD3 the pipeline's own T5 length
could differ from the training one); the starting noise of image k is ``randn`` from a CPU generator seeded
``seeds[k]`` in the unpacked latent shape (what the pipelines draw from a list of generators); Flux's
distilled guidance embedding gets ``--guidance_scale``. Without a VAE (the pixel-space embedded models)
their ``vae_scale_factor`` is set to 1: the "latents" are the pixels.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["UNET_FAMILIES", "TRANSFORMER_FAMILIES", "pipeline_class", "build_pipeline", "sample",
           "save_lora_weights"]

UNET_FAMILIES = ("unet", "sdxl")
TRANSFORMER_FAMILIES = ("sd3", "flux")


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    classes = {"unet": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline,
               "flux": FluxPipeline}
    if family not in classes:
        raise ValueError(f"family must be one of {', '.join(classes)}, got {family!r}")
    return classes[family]


def build_pipeline(model, denoiser=None, scheduler=None):
    """The family's pipeline over ``model``'s parts (no copies): ``denoiser`` (default ``model.denoiser``: the
    policy, adapters and all) as its ``unet`` / ``transformer``; ``scheduler`` (default ``model.scheduler``).
    No safety checker, no watermark; ``vae`` may be ``None`` (the pixel-space tiny models)."""
    denoiser = model.denoiser if denoiser is None else denoiser
    scheduler = model.scheduler if scheduler is None else scheduler
    cls = pipeline_class(model.family)
    if model.family in TRANSFORMER_FAMILIES:
        parts = {"transformer": denoiser, "vae": model.vae, "scheduler": scheduler}
        suffixes = ["", "_2", "_3"] if model.family == "sd3" else ["", "_2"]
        for i, s in enumerate(suffixes):  # SD3 without CLIP-2 / T5: None, as the pipeline allows
            parts[f"tokenizer{s}"] = model.tokenizers[i] if i < len(model.tokenizers) else None
            parts[f"text_encoder{s}"] = model.text_encoders[i] if i < len(model.text_encoders) else None
        pipe = cls(**parts)
        if model.vae is None:
            pipe.vae_scale_factor = 1  # pixel space: the "latents" are the image
    elif model.family == "sdxl":
        pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
                   tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=denoiser, scheduler=scheduler,
                   add_watermarker=False)
    else:
        # StableDiffusionPipeline rewrites a legacy scheduler config (steps_offset → 1, clip_sample → False) —
        # what a user of the pipeline gets — with a FutureWarning per build: noise at every evaluation
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*(steps_offset|clip_sample)", category=FutureWarning)
            pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=denoiser,
                       scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(model, denoiser, prompts: list[str], seeds: list[int], num_inference_steps: int, device) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [−1, 1] for ``prompts`` through the family's pipeline: image k starts from
    the CPU generator seeded ``seeds[k]``, no classifier-free guidance (``guidance_scale=1``: the tiny models
    never see an empty prompt; Flux: ``--guidance_scale`` in its guidance embedding, no CFG). The UNet
    families use a DDIM scheduler (from the training scheduler's config), the transformer families a fresh
    copy of their flow-matching scheduler (sampling's ``set_timesteps`` must not reach training). The
    pipeline returns its latents (``output_type="latent"``; Flux's unpacked) and
    :meth:`~fastpref.train.models.DiffusionModel.decode_latents` decodes them — the inverse of the training
    encode, ``shift_factor`` included (the SD/SDXL pipelines' own decode ignores it) — or, without a VAE,
    clamps them: they are the pixels."""
    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt expected, got {len(prompts)} prompts and {len(seeds)} seeds")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if model.family in TRANSFORMER_FAMILIES:
        pipe = build_pipeline(model, denoiser, type(model.scheduler).from_config(model.scheduler.config))
        cond = model.encode_prompts(list(prompts), device)
        size = model.resolution
        guidance = float(model.guidance_scale) if model.family == "flux" else 1.0  # SD3: ≤ 1 turns CFG off
        out = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                   height=size, width=size, num_inference_steps=num_inference_steps, guidance_scale=guidance,
                   generator=generators, output_type="latent", return_dict=False)[0]
        if model.family == "flux":
            out = pipe._unpack_latents(out, size, size, pipe.vae_scale_factor)
        return model.decode_latents(out).float()
    from diffusers import DDIMScheduler

    pipe = build_pipeline(model, denoiser, DDIMScheduler.from_config(model.scheduler.config))
    # the pipeline's latent size is height // its vae_scale_factor (8 when there is no VAE): ask for the
    # size that gives the denoiser's own sample_size
    size = denoiser.config.sample_size * pipe.vae_scale_factor
    pixels = model.resolution
    kwargs = {"original_size": (pixels, pixels), "target_size": (pixels, pixels)} if model.family == "sdxl" else {}
    out = pipe(prompt=list(prompts), height=size, width=size, num_inference_steps=num_inference_steps,
               guidance_scale=1.0, generator=generators, output_type="latent", return_dict=False, **kwargs)[0]
    return model.decode_latents(out).float()


def save_lora_weights(model, denoiser, folder: str) -> None:
    """``folder/pytorch_lora_weights.safetensors`` through the family pipeline's ``save_lora_weights``, with
    the adapter's LoRA config (rank, alpha) as metadata so that ``pipe.load_lora_weights(folder)`` scales it
    as trained. UNets: the diffusers names (``convert_state_dict_to_diffusers``, as the UNet scripts);
    SD3/Flux: peft's ``lora_A``/``lora_B`` names, as diffusers' SD3 and Flux LoRA scripts write them (the
    conversion would rename the attention projections only, and the SD3 loader then skips them)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(denoiser)
    metadata = denoiser.peft_config["default"].to_dict() if "default" in getattr(denoiser, "peft_config", {}) else None
    cls = pipeline_class(model.family)
    if model.family in TRANSFORMER_FAMILIES:
        cls.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    else:
        cls.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                              unet_lora_adapter_metadata=metadata)
