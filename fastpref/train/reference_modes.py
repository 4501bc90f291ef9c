"""Reference modes: how a training step gets the frozen reference's prediction.

Every preference loss compares the policy's per-sample error with a frozen reference's on the
same noisy latents. The public trainers run the reference as a second model call every step. This
module offers five ways, behind one call::

    mode = make_reference_mode("batched")                     # or "adapter_off", "copy", "cache", "none"
    out = mode(model, inputs)                                 # inputs: the model's keyword arguments
    loss = fastpref.dpo_loss(out.model_pred, out.ref_pred, target, ref_err=out.ref_err)

``inputs`` holds the model's keyword arguments for the stacked ``(2B, …)`` batch (winners first,
then losers), e.g. ``{"sample": x_t, "timestep": t, "encoder_hidden_states": c}`` for a
``UNet2DConditionModel`` or ``{"hidden_states": …, "timestep": …, "encoder_hidden_states": …,
"pooled_projections": …}`` for an ``SD3Transformer2DModel`` (:func:`model_inputs` builds them).

=============== ========================================================================================
``copy``        a frozen deep copy (``no_grad``, eval mode): full fine-tuning; 2× the weights in memory.
``adapter_off`` LoRA: a second call of the same model with every peft adapter disabled (``no_grad``) —
                what diffusers' ``train_diffusion_dpo.py`` does.
``batched``     LoRA: ONE forward over ``cat([x, x])`` with a per-sample adapter mask: rows ``[0, n)``
                use the adapter, rows ``[n, 2n)`` peft's ``"__base__"`` (adapter off). See
                :func:`batched_policy_and_reference` for what it saves and what it does not.
``cache``       reference errors read from a file written by ``fastpref-precompute-ref``
                (:mod:`fastpref.train.ref_cache`); no reference model in memory.
``none``        no reference (MaPO, ORPO).
=============== ========================================================================================
"""

from __future__ import annotations

import contextlib
import copy as _copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "REFERENCE_MODES",
    "Predictions",
    "ReferenceMode",
    "NoReference",
    "AdapterOffReference",
    "CopyReference",
    "BatchedReference",
    "CachedReference",
    "make_reference_mode",
    "call_model",
    "model_inputs",
    "adapters_disabled",
    "batched_policy_and_reference",
    "tuner_layers",
]

REFERENCE_MODES = ("batched", "adapter_off", "copy", "cache", "none")

ForwardFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def call_model(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The prediction of a diffusers model (``UNet2DConditionModel``, ``SD3Transformer2DModel``,
    ``FluxTransformer2DModel``): ``model(**inputs, return_dict=False)[0]``."""
    return model(**inputs, return_dict=False)[0]


def model_inputs(model: nn.Module, noisy_latents, timesteps, cond: Mapping[str, Any]) -> dict:
    """Keyword arguments for ``model``: UNets name the latents ``sample``, transformers
    ``hidden_states``. ``cond`` holds the conditioning (``encoder_hidden_states``,
    ``pooled_projections``, ``added_cond_kwargs`` …) stacked like the latents."""
    base = model
    while hasattr(base, "module") and isinstance(base.module, nn.Module):  # DDP / accelerate wrappers
        base = base.module
    params = inspect.signature(base.forward).parameters
    key = "sample" if "sample" in params else "hidden_states"
    return {key: noisy_latents, "timestep": timesteps, **cond}


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft tuner layer (LoRA, …) injected in ``model`` (by ``add_adapter`` or ``get_peft_model``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model: every peft adapter off, each layer's previous state restored
    on exit (unlike ``disable_adapters()``/``enable_adapters()``, which forget it)."""
    layers = tuner_layers(model)
    if not layers:
        raise TypeError(
            "adapters_disabled needs a model with peft adapters (model.add_adapter(LoraConfig(...)) or "
            "peft.get_peft_model); for a full fine-tune use the 'copy' reference mode"
        )
    before = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, was_disabled in zip(layers, before):
            layer.enable_adapters(not was_disabled)


# ----------------------------------------------------------------------------------------------
# Batched: policy and reference rows in one forward
# ----------------------------------------------------------------------------------------------


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    raise ValueError("inputs must contain the noisy latents as a tensor with a leading batch dimension")


def _repeat_rows(value, n: int):
    """``cat([v, v])`` for every per-sample tensor (leading dim n), recursively through dicts
    (SDXL's ``added_cond_kwargs``); scalars and shared tensors pass through."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, Mapping):
        return {k: _repeat_rows(v, n) for k, v in value.items()}
    return value


def _active_adapter(layers) -> str:
    names = {name for layer in layers for name in layer.active_adapters}
    if len(names) != 1:
        raise ValueError(
            f"the 'batched' reference mode needs exactly one active adapter, found {sorted(names)}; "
            "call model.set_adapter(name) first"
        )
    return names.pop()


def batched_policy_and_reference(
    model: nn.Module, inputs: Mapping[str, Any], *, forward: ForwardFn = call_model
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference prediction of a LoRA model in ONE forward: ``(model_pred, ref_pred)``.

    The batch is stacked twice, ``cat([x, x])``, and every peft tuner layer receives
    ``adapter_names = [adapter]·n + ["__base__"]·n`` (peft's mixed-adapter batch,
    ``LoraLayer._mixed_batch_forward``): the base layer runs on all 2n rows, the LoRA branch only on
    the first n. Rows ``[n, 2n)`` are therefore exactly the adapter-disabled output (equal to
    ``adapter_off`` up to fp32 summation order; tested). ``ref_pred`` is returned detached.

    peft documents mixed batches as an inference feature and ``PeftModel.forward`` refuses
    ``adapter_names`` in training mode; the layer-level path used here (a forward pre-hook on each
    tuner layer, as peft's own ``_enable_peft_forward_hooks`` does) is differentiable — LoRA
    dropout is applied to the adapter rows only, which is what the reference wants — and the tests
    check the LoRA gradients against the two-call path. With ``lora_dropout > 0`` in training mode
    the dropout masks differ from a two-call run's (different RNG draws), as between any two runs.

    What it saves: one model launch sequence (kernel launches, weight reads) per step; at small
    batch a GPU runs 2n rows nearly as fast as n. What it does not: the base layers' backward
    still runs over all 2n rows (the reference rows carry zero gradient, but autograd cannot skip
    rows of one matmul) and activations of all 2n rows are kept for it, so at large batch it can be
    slower and use more memory than ``adapter_off`` (whose reference call runs under ``no_grad``).
    Gradient checkpointing is refused: the recompute in backward would run without the mask.
    """
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError(
            "the 'batched' reference mode cannot be used with gradient checkpointing (the recomputed "
            "forward would not see the per-sample adapter mask); use reference mode 'adapter_off'"
        )
    layers = tuner_layers(model)
    if not layers:
        raise TypeError(
            "the 'batched' reference mode needs a LoRA (peft) model; for a full fine-tune use 'copy'"
        )
    n = _batch_size(inputs)
    adapter_names = [_active_adapter(layers)] * n + ["__base__"] * n

    def set_adapter_names(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [layer.register_forward_pre_hook(set_adapter_names, with_kwargs=True) for layer in layers]
    try:
        out = forward(model, _repeat_rows(dict(inputs), n))
    finally:
        for handle in handles:
            handle.remove()
    return out[:n], out[n:].detach()


# ----------------------------------------------------------------------------------------------
# The modes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """What a step needs for the loss: the policy's ``(2B, *S)`` prediction and exactly one of the
    reference prediction (detached) or the reference errors ``(2B,)`` — or neither (``none``)."""

    model_pred: torch.Tensor
    ref_pred: torch.Tensor | None = None
    ref_err: torch.Tensor | None = None


class ReferenceMode:
    """One way of getting the reference. ``mode(model, inputs, pair_indices=…, epoch=…)`` runs the
    policy on ``inputs`` (with gradient) and returns :class:`Predictions`; ``pair_indices`` and
    ``epoch`` are used by ``cache`` only."""

    name: str = ""
    needs_reference: bool = True

    def __init__(self, *, forward: ForwardFn = call_model):
        self.forward = forward

    def __call__(self, model, inputs, *, pair_indices=None, epoch=None) -> Predictions:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoReference(ReferenceMode):
    """MaPO, ORPO: no reference at all."""

    name = "none"
    needs_reference = False

    def __call__(self, model, inputs, *, pair_indices=None, epoch=None) -> Predictions:
        return Predictions(self.forward(model, inputs))


class AdapterOffReference(ReferenceMode):
    """LoRA: the policy call, then a second call with the adapters disabled under ``no_grad``."""

    name = "adapter_off"

    def __call__(self, model, inputs, *, pair_indices=None, epoch=None) -> Predictions:
        model_pred = self.forward(model, inputs)
        with torch.no_grad(), adapters_disabled(model):
            ref_pred = self.forward(model, inputs)
        return Predictions(model_pred, ref_pred=ref_pred)


class BatchedReference(ReferenceMode):
    """LoRA: policy and reference rows in one forward (:func:`batched_policy_and_reference`)."""

    name = "batched"

    def __call__(self, model, inputs, *, pair_indices=None, epoch=None) -> Predictions:
        model_pred, ref_pred = batched_policy_and_reference(model, inputs, forward=self.forward)
        return Predictions(model_pred, ref_pred=ref_pred)


class CopyReference(ReferenceMode):
    """A frozen copy of the model taken at the start of training (``no_grad``, eval mode). Build it
    with :meth:`from_model` before the first optimiser step. If the model carries peft adapters the
    copy has them disabled, so it is the base model."""

    name = "copy"

    def __init__(self, reference: nn.Module, *, forward: ForwardFn = call_model):
        super().__init__(forward=forward)
        if not isinstance(reference, nn.Module):
            raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}")
        self.reference = reference

    @classmethod
    def from_model(cls, model: nn.Module, *, forward: ForwardFn = call_model) -> "CopyReference":
        reference = _copy.deepcopy(model)
        reference.requires_grad_(False)
        reference.eval()
        for layer in tuner_layers(reference):
            layer.enable_adapters(False)
        return cls(reference, forward=forward)

    def __call__(self, model, inputs, *, pair_indices=None, epoch=None) -> Predictions:
        model_pred = self.forward(model, inputs)
        with torch.no_grad():
            ref_pred = self.forward(self.reference, inputs)
        return Predictions(model_pred, ref_pred=ref_pred)


class CachedReference(ReferenceMode):
    """Reference errors from a :class:`~fastpref.train.ref_cache.RefErrorCache`. The step's noise and
    timesteps must be the cache's (``ref_cache.sample_noise_and_timesteps`` with the same seed,
    pair indices and epoch), or the errors belong to other noisy latents."""

    name = "cache"

    def __init__(self, cache, *, forward: ForwardFn = call_model):
        super().__init__(forward=forward)
        self.cache = cache

    def __call__(self, model, inputs, *, pair_indices=None, epoch=None) -> Predictions:
        if pair_indices is None or epoch is None:
            raise TypeError("the 'cache' reference mode needs pair_indices= and epoch= for each batch")
        model_pred = self.forward(model, inputs)
        ref_err = self.cache.lookup(pair_indices, epoch).to(model_pred.device)
        return Predictions(model_pred, ref_err=ref_err)


def make_reference_mode(
    mode: str, model: nn.Module | None = None, *, cache=None, forward: ForwardFn = call_model
) -> ReferenceMode:
    """The reference mode named ``mode``; ``copy`` needs ``model`` (copied now), ``cache`` a loaded
    :class:`~fastpref.train.ref_cache.RefErrorCache`. Refuses, before training starts, a LoRA mode
    on a model without adapters."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {', '.join(map(repr, REFERENCE_MODES))}, got {mode!r}")
    if mode in ("batched", "adapter_off") and (model is None or not tuner_layers(model)):
        raise ValueError(
            f"reference mode {mode!r} needs a LoRA model (peft adapters, --lora_rank > 0); "
            "for a full fine-tune use 'copy' or 'cache'"
        )
    if mode == "none":
        return NoReference(forward=forward)
    if mode == "adapter_off":
        return AdapterOffReference(forward=forward)
    if mode == "batched":
        return BatchedReference(forward=forward)
    if mode == "copy":
        if model is None:
            raise TypeError("reference mode 'copy' needs the model to copy")
        return CopyReference.from_model(model, forward=forward)
    if cache is None:
        raise TypeError("reference mode 'cache' needs cache= (RefErrorCache.load(path, expected=...))")
    return CachedReference(cache, forward=forward)
