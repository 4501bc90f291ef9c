"""SDXL's conditioning, as diffusers' ``StableDiffusionXLPipeline`` and its DPO training script build it.

* **text**: the prompt through both CLIP encoders; their penultimate hidden states side by side
  (768 + 1280 = 2048 = the UNet's ``cross_attention_dim`` for SDXL base) are ``encoder_hidden_states``;
  ``text_encoder_2``'s pooled projection is ``text_embeds``;
* **micro-conditioning** (Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution
  Image Synthesis", 2023, arXiv:2307.01952): ``time_ids = original size (h, w) + crop top-left (y, x) +
  target size (h, w)`` per example — the size of the pair's first image before resizing, where the
  crop started, and the training resolution (``compute_time_ids`` of diffusers'
  ``train_diffusion_dpo_sdxl.py``; :mod:`fastpref.train.transforms` records the first two).

Both go to the UNet as ``added_cond_kwargs={"text_embeds", "time_ids"}``
(:meth:`fastpref.train.models.DiffusionModel.predict`). A pair's two images share one ``time_ids`` row.
"""

from __future__ import annotations

import torch

__all__ = ["encode_prompts", "time_ids", "batch_time_ids"]


def encode_prompts(tokenizers, text_encoders, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """``{"encoder_hidden_states": (N, L, D1 + D2), "text_embeds": (N, P)}`` of ``prompts``."""
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's (text_encoder_2's) projection, as the SDXL scripts take it
    if pooled is None or pooled.dim() != 2:
        raise ValueError("SDXL's second text encoder must return a pooled projection (CLIPTextModelWithProjection), "
                         f"got an output of shape {None if pooled is None else tuple(pooled.shape)}")
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


def time_ids(original_sizes, crop_top_lefts, target_size) -> torch.Tensor:
    """``(N, 6)`` float32 rows ``[orig_h, orig_w, crop_y, crop_x, target_h, target_w]``."""
    original = torch.as_tensor(original_sizes, dtype=torch.float32).reshape(-1, 2)
    crop = torch.as_tensor(crop_top_lefts, dtype=torch.float32).reshape(-1, 2)
    if original.shape != crop.shape:
        raise ValueError(f"one crop top-left per original size expected, got {original.shape[0]} sizes and "
                         f"{crop.shape[0]} crops")
    target = torch.tensor([float(target_size[0]), float(target_size[1])]).expand(original.shape[0], 2)
    return torch.cat([original, crop, target], dim=1)


def batch_time_ids(batch: dict) -> torch.Tensor:
    """The ``(B, 6)`` time ids of a batch of pairs (:func:`fastpref.train.data.collate_pairs`): the target size
    is the images' size; a batch without ``original_size`` / ``crop_top_left`` (a dataset that does not
    record them) is taken as uncropped images of that size — what the pipeline assumes when sampling."""
    pixels = batch["pixel_values"]  # (B, 2, C, H, W)
    b, size = pixels.shape[0], tuple(pixels.shape[-2:])
    original = batch.get("original_size")
    crop = batch.get("crop_top_left")
    return time_ids(original if original is not None else [size] * b,
                    crop if crop is not None else [(0, 0)] * b, size)
