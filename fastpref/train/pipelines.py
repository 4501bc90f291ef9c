"""The diffusers pipeline of each UNet family, built around the trainer's parts: ``StableDiffusionPipeline``
for ``"unet"`` (SD1.5-style), ``StableDiffusionXLPipeline`` for ``"sdxl"``.

Evaluation samples come from the family's own pipeline (its prompt encoding, ``time_ids``, scheduler loop
and VAE decode), so what the trainer shows is what a user of the saved weights gets; and the LoRA file is
written by that pipeline class's ``save_lora_weights``, so ``pipe.load_lora_weights(output_dir)`` reads it.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["UNET_FAMILIES", "pipeline_class", "build_pipeline", "sample", "save_lora_weights"]

UNET_FAMILIES = ("unet", "sdxl")


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in UNET_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(UNET_FAMILIES)}, got {family!r}")
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def build_pipeline(model, denoiser=None, scheduler=None):
    """The family's pipeline over ``model``'s parts (no copies): ``denoiser`` (default ``model.denoiser``: the
    policy, adapters and all) as its ``unet``; ``scheduler`` (default ``model.scheduler``). No safety checker,
    no watermark; ``vae`` may be ``None`` (the pixel-space tiny models)."""
    denoiser = model.denoiser if denoiser is None else denoiser
    scheduler = model.scheduler if scheduler is None else scheduler
    cls = pipeline_class(model.family)
    if model.family == "sdxl":
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
    """Images ``(N, 3, H, W)`` in [−1, 1] for ``prompts`` through the family's pipeline with a DDIM scheduler
    (from the training scheduler's config): image k starts from the CPU generator seeded ``seeds[k]``, no
    classifier-free guidance (``guidance_scale=1``: the tiny models never see an empty prompt). The pipeline
    returns its latents (``output_type="latent"``) and :meth:`~fastpref.train.models.DiffusionModel.decode_latents`
    decodes them — the inverse of the training encode, ``shift_factor`` included (the SD/SDXL pipelines'
    own decode ignores it) — or, without a VAE, clamps them: they are the pixels."""
    from diffusers import DDIMScheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt expected, got {len(prompts)} prompts and {len(seeds)} seeds")
    pipe = build_pipeline(model, denoiser, DDIMScheduler.from_config(model.scheduler.config))
    # the pipeline's latent size is height // its vae_scale_factor (8 when there is no VAE): ask for the
    # size that gives the denoiser's own sample_size
    size = denoiser.config.sample_size * pipe.vae_scale_factor
    pixels = model.resolution
    kwargs = {"original_size": (pixels, pixels), "target_size": (pixels, pixels)} if model.family == "sdxl" else {}
    out = pipe(prompt=list(prompts), height=size, width=size, num_inference_steps=num_inference_steps,
               guidance_scale=1.0, generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
               output_type="latent", return_dict=False, **kwargs)[0]
    return model.decode_latents(out).float()


def save_lora_weights(model, denoiser, folder: str) -> None:
    """``folder/pytorch_lora_weights.safetensors`` in the diffusers format, with the adapter's LoRA config
    (rank, alpha) as metadata so that ``pipe.load_lora_weights(folder)`` scales it as trained."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    metadata = denoiser.peft_config["default"].to_dict() if "default" in getattr(denoiser, "peft_config", {}) else None
    pipeline_class(model.family).save_lora_weights(folder, unet_lora_layers=layers,
                                                   unet_lora_adapter_metadata=metadata)
