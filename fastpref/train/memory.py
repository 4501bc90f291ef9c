"""Memory and speed switches of the trainer, with the meaning of diffusers' SDXL DPO script
(``examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py``).

``--gradient_checkpointing``  ``denoiser.enable_gradient_checkpointing()``: each block keeps only its input
                              and recomputes its activations in backward (one more forward per step).
                              The checkpoint function here is torch's non-reentrant one (diffusers'
                              default) plus one thing: the ``batched`` reference mode's per-sample adapter
                              mask is re-applied while a block is recomputed (:func:`checkpoint`).
``--use_8bit_adam``           ``bitsandbytes.optim.AdamW8bit`` (Dettmers et al. 2022, "8-bit Optimizers via
                              Block-wise Quantization", arXiv:2110.02861): Adam's two moments in 8 bits.
``--allow_tf32``              ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
                              (fp32 matmuls and convolutions in TF32 on Ampere and later GPUs).

The VAE flags (``--pretrained_vae_model_name_or_path``, ``--vae_encode_batch_size``) and ``--variant`` live in
:mod:`fastpref.train.models`, where the components are loaded and encoded.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["BITSANDBYTES_MISSING", "adamw_class", "build_optimizer", "checkpoint", "enable_gradient_checkpointing",
           "apply_allow_tf32"]

BITSANDBYTES_MISSING = ("--use_8bit_adam needs the bitsandbytes package, which is not installed: "
                        "pip install bitsandbytes (or drop --use_8bit_adam)")


def adamw_class(use_8bit_adam: bool):
    """``torch.optim.AdamW``, or ``bitsandbytes.optim.AdamW8bit``; a missing bitsandbytes is one ValueError
    that names the package and the pip command (the loop asks before it loads any model)."""
    if not use_8bit_adam:
        return torch.optim.AdamW
    try:
        bitsandbytes = _import_bitsandbytes()
    except ImportError:
        raise ValueError(BITSANDBYTES_MISSING) from None
    return bitsandbytes.optim.AdamW8bit


def _import_bitsandbytes():
    import bitsandbytes

    return bitsandbytes


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """The run's AdamW (or 8-bit AdamW) over ``params`` with the config's learning rate, betas, weight decay, ε."""
    return adamw_class(cfg.use_8bit_adam)(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                          weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def apply_allow_tf32(allow_tf32: bool) -> None:
    """``--allow_tf32``: TF32 for fp32 matmuls and cuDNN convolutions (process-wide, as in diffusers).
    False leaves PyTorch's settings as they are."""
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------


def _recompute_contexts():
    """``context_fn`` of torch's non-reentrant checkpoint, called when a block runs forward: the mixed
    adapter batch active now (the ``batched`` reference mode), if any, is active again while the block is
    recomputed in backward — otherwise the recomputed activations would be those of a plain LoRA forward
    and the gradients wrong."""
    from fastpref.train.reference import active_mixed_batch, mixed_adapter_batch

    active = active_mixed_batch()
    if active is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    layers, adapter_names = active
    return contextlib.nullcontext(), mixed_adapter_batch(layers, adapter_names)


def checkpoint(function, *args, **kwargs):
    """diffusers' ``gradient_checkpointing_func``: ``torch.utils.checkpoint.checkpoint(function, *args)``
    non-reentrant (diffusers' default; gradients reach LoRA weights even though the block's inputs need
    none), with :func:`_recompute_contexts`."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=_recompute_contexts,
                                             **kwargs)


def enable_gradient_checkpointing(denoiser: nn.Module) -> None:
    """``--gradient_checkpointing`` on the trained denoiser (LoRA or full). A frozen reference (``copy``)
    needs none: it runs under ``no_grad`` and keeps no activations."""
    if not getattr(denoiser, "_supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient_checkpointing: {type(denoiser).__name__} does not support gradient "
                         "checkpointing; drop the flag")
    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
