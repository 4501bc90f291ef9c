"""``torch.library`` registrations of the pair-loss ops, so the PyTorch compiler can use them.

**C++/CUDA ops.**
The C++ library defines the schemas (``csrc/ops.cpp``), the device kernels and the autograd of
``fastpref::pair_loss_fwd`` (``csrc/autograd.cpp``: its backward is ``pair_loss_bwd``, which re-reads
``model_pred`` and ``target``; only the loss output is differentiable — margin, errors and
∂ℓ/∂e_θ are statistics — and ``ref_pred``/``target``/``ref_err`` get no gradient, as the front end
refuses inputs that require one). Autograd is in C++ because the Python route
(``torch.library.register_autograd``) costs more per call than the kernels of a small batch. This
module adds what the compiler needs, as the PyTorch custom-op tutorial prescribes: fake (meta)
implementations — output shapes and dtypes without running a kernel, so ``torch.compile`` (also with
dynamic shapes) traces through the op with no graph break.

**Triton ops.** ``fastpref::triton_pair_loss_fwd`` / ``triton_pair_loss_bwd`` wrap the launchers
of :mod:`fastpref.ops.pair_loss` as ``torch.library.custom_op`` s with the same outputs, fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` keeps the Triton path in one graph
too (the kernels run as opaque ops; under ``TRITON_INTERPRET=1`` they run in the interpreter). This
module imports triton only when such an op first runs.

Autocast has no kernel for these ops, so under ``torch.autocast`` they receive their inputs
unchanged and still reduce in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import torch

from fastpref.ops.family import UNPAIRED_LOSSES

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


def register() -> None:
    """Add fake implementations to the ops (once, after the library is loaded)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("fastpref::pair_loss_fwd")(_pair_loss_fwd_fake)
    torch.library.register_fake("fastpref::pair_loss_bwd")(_pair_loss_bwd_fake)
    _registered = True


# ----------------------------------------------------------------------------------------------
# The Triton kernel family as custom ops (defined at import; triton itself is imported on first run)
# ----------------------------------------------------------------------------------------------


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
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastpref.ops.pair_loss import pair_loss_forward

    return pair_loss_forward(model_pred, ref_pred, target, ref_err, labels, loss, beta, c0, c1, reduction,
                             num_splits)  # fmt: skip


def _num_items(loss: str, n):
    """What ``"mean"`` averages over: rows for the unpaired loss (kto), pairs otherwise."""
    return n if loss in UNPAIRED_LOSSES else (n + 1) // 2


@_triton_fwd.register_fake
def _(model_pred, ref_pred, target, ref_err, labels, loss, beta, c0, c1, reduction, num_splits=None):
    n = model_pred.shape[0]
    items = _num_items(loss, n)
    new = lambda *shape: model_pred.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(items) if reduction == "none" else new(), new(items), new(2, n), new(n)


@torch.library.custom_op("fastpref::triton_pair_loss_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, model_pred: torch.Tensor, target: torch.Tensor, dl_de: torch.Tensor,
                loss: str, reduction: str, num_splits: int | None = None) -> torch.Tensor:  # fmt: skip
    from fastpref.ops.pair_loss import pair_loss_backward

    return pair_loss_backward(grad_out, model_pred, target, dl_de, loss, reduction, num_splits)


@_triton_bwd.register_fake
def _(grad_out, model_pred, target, dl_de, loss, reduction, num_splits=None):
    return torch.empty_like(model_pred, memory_format=torch.contiguous_format)


def _triton_setup_context(ctx, inputs, output):
    model_pred, _ref_pred, target, _ref_err, _labels, loss, _beta, _c0, _c1, reduction, *rest = inputs
    ctx.save_for_backward(model_pred, target, output[3])
    ctx.loss, ctx.reduction, ctx.num_splits = loss, reduction, (rest[0] if rest else None)


def _triton_backward(ctx, grad_loss, _grad_margin, _grad_errors, _grad_dl_de):
    model_pred, target, dl_de = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _triton_bwd(grad_loss, model_pred, target, dl_de, ctx.loss, ctx.reduction, ctx.num_splits)
    return (grad,) + (None,) * 10


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def triton_pair_loss(loss, model_pred, ref_pred, target, ref_err, *, beta, c0, c1, reduction, labels=None,
                     num_splits=None):  # fmt: skip
    """Run the Triton kernel family on validated inputs through its custom op (traceable by
    ``torch.compile``); returns ``(loss, margin, errors)``: the (reduced) loss, u ``(B,)`` (``(N,)``
    for kto) and the ``(2, N)`` errors e_θ, e_ref, all fp32. ``beta, c0, c1``: the loss's kernel
    scalars (:func:`fastpref.ops.family.kernel_scalars`); ``labels`` ``(N,)`` are kto's (1 =
    desirable). ``num_splits`` fixes the number of programs per sample (default: chosen per device;
    tests use it to cover the split path on the CPU)."""
    if labels is not None:
        labels = labels.to(device=model_pred.device, dtype=torch.float32).contiguous()
    if ref_err is not None:
        ref_err = ref_err.contiguous()
    out, margin, errors, _dl_de = _triton_fwd(model_pred, ref_pred, target, ref_err, labels, loss, float(beta),
                                              float(c0), float(c1), reduction, num_splits)  # fmt: skip
    return out, margin, errors
