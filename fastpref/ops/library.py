"""``torch.library`` registrations of the pair-loss ops, so the PyTorch compiler can use them.

**C++/CUDA ops.** 
The C++ library (``csrc/ops.cpp``) defines the schemas and the device kernels of
``fastpref::pair_loss_fwd`` and ``fastpref::pair_loss_bwd``; this module adds what the compiler
and autograd need, as the PyTorch custom-op tutorial prescribes:

* fake (meta) implementations — output shapes and dtypes without running a kernel, so
  ``torch.compile`` (also with dynamic shapes) traces through the op with no graph break;
* autograd for ``pair_loss_fwd``: the backward is ``pair_loss_bwd``, which re-reads
  ``model_pred`` and ``target``. Only the loss output is differentiable; margin, errors and
  ∂ℓ/∂e_θ are statistics (the front end detaches them), and ``ref_pred``/``target``/``ref_err``
  get no gradient (the front end refuses inputs that require one).

**Triton ops.** ``fastpref::triton_pair_loss_fwd`` / ``triton_pair_loss_bwd`` wrap the launchers
of :mod:`fastpref.ops.pair_loss` as ``torch.library.custom_op`` s with the same outputs, fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` keeps the Triton path in one graph
too (the kernels run as opaque ops; under ``TRITON_INTERPRET=1`` they run in the interpreter).

Autocast has no kernel for these ops, so under ``torch.autocast`` they receive their inputs
unchanged and still reduce in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import torch

__all__ = ["register", "accumulation_dtype", "triton_pair_loss"]

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


# ----------------------------------------------------------------------------------------------
# The Triton kernel family as custom ops (defined at import; triton itself is imported on first run)
# ----------------------------------------------------------------------------------------------


class _SavedTensors:
    """Stands in for autograd's ctx when FusedPairLoss.forward runs inside a custom op: it keeps
    what the forward saves, ``(model2d, target2d, dl_de)``."""

    saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


@torch.library.custom_op("fastpref::triton_pair_loss_fwd", mutates_args=())
def _triton_fwd(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None,
    target: torch.Tensor,
    ref_err: torch.Tensor | None,
    labels: torch.Tensor | None,
    loss: str,
    beta: float,
    c0: float,
    c1: float,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastpref.ops.pair_loss import FusedPairLoss

    ctx = _SavedTensors()
    out, margin, errors = FusedPairLoss.forward(ctx, model_pred, ref_pred, target, ref_err, labels, loss, beta, c0,
                                                c1, reduction, None)  # fmt: skip
    return out.clone() if out.dim() == 0 else out, margin, errors, ctx.saved_tensors[2]  # out: a view of a buffer


def _num_items(loss: str, n):
    """What ``"mean"`` averages over: rows for the unpaired loss (kto), pairs otherwise."""
    from fastpref.ops.pair_loss import UNPAIRED_LOSSES

    return n if loss in UNPAIRED_LOSSES else (n + 1) // 2


@_triton_fwd.register_fake
def _(model_pred, ref_pred, target, ref_err, labels, loss, beta, c0, c1, reduction):
    n = model_pred.shape[0]
    items = _num_items(loss, n)
    new = lambda *shape: model_pred.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(items) if reduction == "none" else new(), new(items), new(2, n), new(n)


@torch.library.custom_op("fastpref::triton_pair_loss_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, model_pred: torch.Tensor, target: torch.Tensor, dl_de: torch.Tensor,
                loss: str, reduction: str) -> torch.Tensor:  # fmt: skip
    from fastpref.ops.pair_loss import UNPAIRED_LOSSES, _rows, launch_config, pair_err_backward

    n = model_pred.shape[0]
    model2d, target2d = _rows(model_pred, n), _rows(target, target.shape[0])
    num_pairs, numel = (n + 1) // 2, model2d.shape[1]
    cfg = launch_config(num_pairs, numel, model2d.device)  # the forward's config: same arguments
    coef = 2.0 / numel / (_num_items(loss, n) if reduction == "mean" else 1)  # as FusedPairLoss
    grad = pair_err_backward(model2d, target2d, dl_de, grad_out, coef, num_pairs, cfg, loss in UNPAIRED_LOSSES)
    return grad.view(model_pred.shape)


@_triton_bwd.register_fake
def _(grad_out, model_pred, target, dl_de, loss, reduction):
    return torch.empty_like(model_pred, memory_format=torch.contiguous_format)


def _triton_setup_context(ctx, inputs, output):
    model_pred, _ref_pred, target, _ref_err, _labels, loss, _beta, _c0, _c1, reduction = inputs
    ctx.save_for_backward(model_pred, target, output[3])
    ctx.loss, ctx.reduction = loss, reduction


def _triton_backward(ctx, grad_loss, _grad_margin, _grad_errors, _grad_dl_de):
    model_pred, target, dl_de = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _triton_bwd(grad_loss, model_pred, target, dl_de, ctx.loss, ctx.reduction)
    return grad, None, None, None, None, None, None, None, None, None


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def triton_pair_loss(loss, model_pred, ref_pred, target, ref_err, *, beta, reduction, alpha=0.5, c0=None, c1=None,
                     labels=None):  # fmt: skip
    """The Triton kernel family through its custom op; returns ``(loss, margin, errors)`` like
    :func:`fastpref.ops.pair_loss.fused_pair_loss` (same ``c0``/``c1``/``labels`` overrides) and is
    traceable by ``torch.compile``."""
    from fastpref.ops.pair_loss import _loss_constants

    if c0 is None:
        c0, c1 = _loss_constants(loss, beta, alpha)
    if labels is not None:
        labels = labels.to(device=model_pred.device, dtype=torch.float32).contiguous()
    out, margin, errors, _dl_de = _triton_fwd(model_pred, ref_pred, target, ref_err, labels, loss, float(beta),
                                              float(c0), float(c1 or 0.0), reduction)  # fmt: skip
    return out, margin, errors
