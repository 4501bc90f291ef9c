"""``torch.library`` registrations of the C++/CUDA pair-loss ops, so the PyTorch compiler can use them.

The C++ library (``csrc/ops.cpp``) defines the schemas and the device kernels of
``fastpref::pair_loss_fwd`` and ``fastpref::pair_loss_bwd``; this module adds what the compiler
and autograd need, as the PyTorch custom-op tutorial prescribes:

* fake (meta) implementations — output shapes and dtypes without running a kernel, so
  ``torch.compile`` (also with dynamic shapes) traces through the op with no graph break;
* autograd for ``pair_loss_fwd``: the backward is ``pair_loss_bwd``, which re-reads
  ``model_pred`` and ``target``. Only the loss output is differentiable; margin, errors and
  ∂ℓ/∂e_θ are statistics (the front end detaches them), and ``ref_pred``/``target``/``ref_err``
  get no gradient (the front end refuses inputs that require one).

Autocast has no kernel for these ops, so under ``torch.autocast`` they receive their inputs
unchanged and still reduce in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import torch

__all__ = ["register", "accumulation_dtype"]

_registered = False


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's outputs: fp64 for fp64 input, fp32 for fp32/bf16/fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pair_loss_fwd_fake(model_pred, ref_pred, target, ref_err, loss, beta, c0, c1, reduction):
    n = model_pred.shape[0]
    b = n // 2
    dt = accumulation_dtype(model_pred.dtype)
    out = model_pred.new_empty((b,) if reduction == 0 else (), dtype=dt)
    return out, model_pred.new_empty((b,), dtype=dt), model_pred.new_empty((2, n), dtype=dt), \
        model_pred.new_empty((n,), dtype=dt)  # fmt: skip


def _pair_loss_bwd_fake(grad_out, model_pred, target, dl_de, reduction):
    return torch.empty_like(model_pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    model_pred, _ref_pred, target, _ref_err, _loss, _beta, _c0, _c1, reduction = inputs
    ctx.save_for_backward(model_pred, target, output[3])
    ctx.reduction = reduction


def _backward(ctx, grad_loss, _grad_margin, _grad_errors, _grad_dl_de):
    model_pred, target, dl_de = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fastpref.pair_loss_bwd(grad_loss, model_pred, target, dl_de, ctx.reduction)
    return grad, None, None, None, None, None, None, None, None


def register() -> None:
    """Add fake implementations and autograd to the ops (once, after the library is loaded)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("fastpref::pair_loss_fwd")(_pair_loss_fwd_fake)
    torch.library.register_fake("fastpref::pair_loss_bwd")(_pair_loss_bwd_fake)
    torch.library.register_autograd("fastpref::pair_loss_fwd", _backward, setup_context=_setup_context)
    _registered = True
