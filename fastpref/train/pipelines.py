"""The transformer families' own diffusers pipelines: evaluation sampling and the LoRA file.

* :func:`sample` runs ``StableDiffusion3Pipeline`` (``sd3``) or ``FluxPipeline`` (``flux``) with the
  training policy as its transformer. The prompts enter as the embeddings the training step uses
  (:meth:`~fastpref.train.models.DiffusionModel.encode_prompts`), the starting noise of image k is
  ``randn`` from a CPU generator seeded ``seeds[k]`` in the unpacked latent shape (what the pipelines
  draw from a list of generators), no classifier-free guidance (the tiny models are trained without
  an empty prompt; Flux's distilled guidance embedding gets ``--guidance_scale``). Without a VAE
  (the embedded pixel-space models) the pipeline returns latents (``output_type="latent"``, its
  ``vae_scale_factor`` set to 1), which are the pixels.
* :func:`save_lora_weights` writes ``pytorch_lora_weights.safetensors`` with the family pipeline's
  ``save_lora_weights``, so ``Pipeline.load_lora_weights(output_dir)`` of that family loads it.
"""

from __future__ import annotations

import torch

__all__ = ["pipeline_class", "build_pipeline", "sample", "save_lora_weights"]


def pipeline_class(family: str):
    """The diffusers pipeline class of a transformer family."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    classes = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
    if family not in classes:
        raise ValueError(f"family must be one of {', '.join(classes)}, got {family!r}")
    return classes[family]


def build_pipeline(model, transformer):
    """The family's pipeline around ``transformer`` (the policy, adapters included) and ``model``'s other
    parts, with a fresh scheduler (sampling calls ``set_timesteps``; training must not see it)."""
    cls = pipeline_class(model.family)
    parts = {"transformer": transformer, "vae": model.vae,
             "scheduler": type(model.scheduler).from_config(model.scheduler.config)}
    suffixes = ["", "_2", "_3"] if model.family == "sd3" else ["", "_2"]
    for i, s in enumerate(suffixes):
        parts[f"tokenizer{s}"] = model.tokenizers[i] if i < len(model.tokenizers) else None
        parts[f"text_encoder{s}"] = model.text_encoders[i] if i < len(model.text_encoders) else None
    pipe = cls(**parts)
    if model.vae is None:
        pipe.vae_scale_factor = 1  # pixel space: the "latents" are the image
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(model, transformer, prompts: list[str], seeds: list[int], num_inference_steps: int, device) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [−1, 1], image k from ``prompts[k]`` and ``seeds[k]``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    pipe = build_pipeline(model, transformer)
    cond = model.encode_prompts(prompts, device)
    size = model.resolution
    kw = {}
    if model.family == "flux":
        kw["guidance_scale"] = float(model.guidance_scale)  # the distilled guidance embedding (no CFG)
    else:
        kw["guidance_scale"] = 1.0  # SD3: guidance_scale ≤ 1 turns classifier-free guidance off
    latents = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                   height=size, width=size, num_inference_steps=num_inference_steps, output_type="latent",
                   generator=[torch.Generator().manual_seed(int(s)) for s in seeds], **kw)[0]
    if model.family == "flux":
        latents = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
    return model.decode_latents(latents).float()


def save_lora_weights(model, output_dir: str, transformer) -> None:
    """``output_dir/pytorch_lora_weights.safetensors``: the peft state dict of ``transformer``'s adapters
    through the family pipeline's ``save_lora_weights``, as diffusers' SD3 and Flux LoRA scripts write it
    (peft's ``lora_A``/``lora_B`` names; ``convert_state_dict_to_diffusers`` — the UNet scripts' step —
    would rename the attention projections only, and SD3's loader then skips them)."""
    from peft.utils import get_peft_model_state_dict

    pipeline_class(model.family).save_lora_weights(output_dir,
                                                   transformer_lora_layers=get_peft_model_state_dict(transformer))
