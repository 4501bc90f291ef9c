"""The image transform of a preference pair: one resize, flip and crop for both images, as diffusers'
``train_diffusion_dpo_sdxl.py`` applies them to the pair stacked on the channel axis, with what SDXL's
micro-conditioning needs recorded (:mod:`fastpref.train.sdxl`).

Per pair (images as tensors, the loser already resized to the first image's size by the dataset, as the
diffusers script does):

1. ``original_size = (h, w)`` of the first image (``image_0`` / ``jpg_0``), before anything else;
2. resize so that the shorter side is ``resolution`` (bilinear, antialiased);
3. ``--random_flip``: a horizontal flip with probability ½;
4. crop ``resolution × resolution``: centred (default, ``--center_crop``; top-left
   ``round((h − r)/2), round((w − r)/2)``) or at a uniformly drawn top-left (``--random_crop``);
   ``crop_top_left = (y, x)`` as in the diffusers script (after the flip).

The flip and crop draws come from a CPU generator seeded with ``(seed, pair)`` (:func:`pair_generator`),
like every other per-pair draw of the trainer (:mod:`fastpref.train.noise`): a pair keeps its flip and crop
across epochs, so cached latents (``--cache_latents``) and reference errors (``--reference_mode cache``)
are exactly those of an uncached run. (The diffusers scripts redraw them at every read, except when they
cache latents.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.train.noise import derive_seed

__all__ = ["PairTransform", "pair_generator", "check_transform_flags"]

_STREAM = -1  # the third part of the generator seed: never an epoch (≥ 0) or an image index (0, 1)


def pair_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of pair ``index``'s flip and crop: ``(seed, index, −1)``."""
    return torch.Generator().manual_seed(derive_seed(seed, index, _STREAM))


def check_transform_flags(resolution, center_crop, random_crop, random_flip) -> None:
    """One ValueError naming the flag, for values :class:`PairTransform` cannot use."""
    for name, value in (("center_crop", center_crop), ("random_crop", random_crop), ("random_flip", random_flip)):
        if not isinstance(value, bool):
            raise ValueError(f"--{name} must be true or false, got {value!r}")
    if center_crop and random_crop:
        raise ValueError("--center_crop and --random_crop exclude each other: give one (centred is the default)")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"--resolution must be an integer ≥ 1 (pixels of the square training images), got {resolution!r}")


@dataclass(frozen=True)
class PairTransform:
    """``transform(pair, index) → (pair', original_size, crop_top_left)`` for ``pair`` ``(2, C, H, W)``, or
    ``(1, C, H, W)`` (an unpaired image, transformed the same way)."""

    resolution: int
    random_crop: bool = False
    random_flip: bool = False
    seed: int = 0

    def __call__(self, pair: torch.Tensor, index: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        r = self.resolution
        if pair.dim() != 4 or pair.shape[0] not in (1, 2):  # a pair, or one unpaired labelled image
            raise ValueError(f"pair must be (2, C, H, W) (or (1, C, H, W): one image), got {tuple(pair.shape)}")
        original = (int(pair.shape[-2]), int(pair.shape[-1]))
        stacked = pair.flatten(0, 1)  # (2C, H, W): one resize, flip and crop for both images
        if min(original) != r:
            stacked = F.resize(stacked, r, interpolation=InterpolationMode.BILINEAR, antialias=True)
        g = pair_generator(self.seed, index) if (self.random_flip or self.random_crop) else None
        if self.random_flip and torch.rand(1, generator=g).item() < 0.5:
            stacked = stacked.flip(-1)
        h, w = stacked.shape[-2:]
        if self.random_crop:
            y = int(torch.randint(0, h - r + 1, (1,), generator=g))
            x = int(torch.randint(0, w - r + 1, (1,), generator=g))
        else:
            y, x = max(0, int(round((h - r) / 2.0))), max(0, int(round((w - r) / 2.0)))
        stacked = stacked[..., y: y + r, x: x + r]
        return stacked.reshape(pair.shape[0], -1, r, r), original, (y, x)
