"""CLIP embeddings of (image, prompt) samples for Diffusion-RPO's weight matrix (Gu et al., 2024,
arXiv:2406.06382, §2.1).

Diffusion-RPO compares winner i with loser j through ``f(image, prompt)``, a CLIP embedding of the
image and its prompt. This module computes it with any open_clip model (``pretrained=None`` builds
offline; real weights load from a local path or the hub when the user has them):

>>> model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")
>>> win_emb, lose_emb = fastpref.clip.rpo_embeddings(model, win_pixels, lose_pixels, prompts)
>>> loss = fastpref.rpo_loss(model_pred, ref_pred, target, win_emb=win_emb, lose_emb=lose_emb)

Embeddings are computed under ``torch.no_grad()`` (the RPO weights carry no gradient), in fp32, and
L2-normalised.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["COMBINERS", "pair_embeddings", "rpo_embeddings"]

Combiner = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
#: named ways of combining the normalised image and text embeddings
COMBINERS = ("mean", "image", "text")


def _combine(img: torch.Tensor, txt: torch.Tensor, combiner: Combiner) -> torch.Tensor:
    if callable(combiner):
        out = combiner(img, txt)
        if not isinstance(out, torch.Tensor) or out.shape[0] != img.shape[0]:
            raise ValueError(f"combiner must return a ({img.shape[0]}, K) tensor, got {getattr(out, 'shape', out)}")
    elif combiner == "mean":  # the normalised mean of the normalised embeddings (the default)
        out = img + txt
    elif combiner == "image":
        out = img
    elif combiner == "text":
        out = txt
    else:
        raise ValueError(f"combiner must be one of {', '.join(map(repr, COMBINERS))} or a callable, got {combiner!r}")
    return F.normalize(out.float(), dim=-1)


def _tokens(model, prompts, tokenizer, device) -> torch.Tensor:
    if isinstance(prompts, torch.Tensor):
        return prompts.to(device)
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings or a tensor of token ids")
    if tokenizer is None:
        import open_clip

        return open_clip.tokenize(list(prompts), context_length=model.context_length).to(device)
    return tokenizer(list(prompts)).to(device)


@torch.no_grad()
def pair_embeddings(
    model,
    images: torch.Tensor,
    prompts: Sequence[str] | torch.Tensor,
    *,
    tokenizer=None,
    combiner: Combiner = "mean",
) -> torch.Tensor:
    """``f(image_k, prompt_k)`` for a batch: ``(M, K)`` fp32, unit rows.

    Args:
        model: an open_clip model (``encode_image``/``encode_text``).
        images: ``(M, 3, H, W)`` pixels already preprocessed for ``model`` (its ``preprocess``).
        prompts: M strings (tokenised with ``tokenizer``, default open_clip's tokenizer at the model's
            context length) or ``(M, L)`` token ids.
        combiner: ``"mean"`` (default: the normalised mean of the normalised image and text
            embeddings), ``"image"``, ``"text"``, or a callable ``(img, txt) → (M, K)`` applied to
            the normalised embeddings; the result is normalised.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError(f"images must be a (M, 3, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    device = next(model.parameters()).device
    tokens = _tokens(model, prompts, tokenizer, device)
    if tokens.shape[0] != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {tokens.shape[0]} prompts")
    img = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
    txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return _combine(img, txt, combiner)


@torch.no_grad()
def rpo_embeddings(
    model,
    win_images: torch.Tensor,
    lose_images: torch.Tensor,
    prompts: Sequence[str] | torch.Tensor,
    *,
    tokenizer=None,
    combiner: Combiner = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(win_emb, lose_emb)`` for :func:`fastpref.rpo_loss`: each pair's winner and loser image with
    the pair's prompt (encoded once), combined as in :func:`pair_embeddings`."""
    if not isinstance(win_images, torch.Tensor) or not isinstance(lose_images, torch.Tensor):
        raise TypeError("win_images and lose_images must be (M, 3, H, W) tensors")
    if win_images.shape != lose_images.shape or win_images.dim() != 4:
        raise ValueError(f"win_images and lose_images must have the same (M, 3, H, W) shape, got "
                         f"{tuple(win_images.shape)} and {tuple(lose_images.shape)}")  # fmt: skip
    device = next(model.parameters()).device
    tokens = _tokens(model, prompts, tokenizer, device)
    m = win_images.shape[0]
    if tokens.shape[0] != m:
        raise ValueError(f"got {m} pairs but {tokens.shape[0]} prompts")
    txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
    img = F.normalize(model.encode_image(torch.cat([win_images, lose_images]).to(device)).float(), dim=-1)
    return _combine(img[:m], txt, combiner), _combine(img[m:], txt, combiner)
