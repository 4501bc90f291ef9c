"""The reference modes: how a training step gets the frozen reference model's side of the loss.

Every preference loss except MaPO/ORPO compares the policy's per-sample error with a frozen reference
model's on the same noisy latents. A mode is one small callable::

    model_pred, ref = mode(policy, noised, cond, batch)   # ref: {"ref_pred": …}, {"ref_err": …} or {}
    loss = fastpref.dpo_loss(model_pred, target=noised.target, **ref)

``model_pred`` is the policy's ``(2B, *S)`` prediction (with gradient); ``ref`` holds the keyword the
losses take. Built by :func:`make_reference` from a :class:`~fastpref.train.models.DiffusionModel`.

=============== ========================================================================================
``copy``        a frozen deep copy (``no_grad``, eval mode): full fine-tuning; 2× the weights in memory.
``adapter_off`` LoRA: a second call of the same model with every peft adapter disabled (``no_grad``) —
                what diffusers' ``train_diffusion_dpo.py`` does.
``batched``     LoRA: ONE forward over ``cat([x, x])`` with a per-sample adapter mask: rows ``[0, n)``
                use the adapter, rows ``[n, 2n)`` peft's ``"__base__"`` (adapter off). See
                :func:`batched_policy_and_reference` for what it saves and what it does not.
``cache``       reference errors read from a file :func:`fastpref.train.cache.precompute` wrote; no
                reference model in memory. Exact because every draw is per (pair, epoch)
                (:mod:`fastpref.train.noise`).
``none``        no reference (MaPO, ORPO).
=============== ========================================================================================
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

__all__ = ["REFERENCE_MODES", "make_reference", "resolve_reference_mode", "reference_prediction",
           "adapters_disabled", "batched_policy_and_reference", "mixed_adapter_batch", "active_mixed_batch",
           "tuner_layers"]

REFERENCE_MODES = ("copy", "adapter_off", "batched", "cache", "none")


def tuner_layers(module: nn.Module) -> list[nn.Module]:
    """Every peft tuner layer (LoRA, …) injected in ``module`` (by ``add_adapter`` or ``get_peft_model``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` as its base model: every peft adapter off, each layer's previous state restored
    on exit (unlike ``disable_adapters()``/``enable_adapters()``, which forget it). No adapters: no-op."""
    layers = tuner_layers(module)
    before = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield module
    finally:
        for layer, was_disabled in zip(layers, before):
            layer.enable_adapters(not was_disabled)


@torch.no_grad()
def reference_prediction(model, module: nn.Module, noised, cond: dict) -> torch.Tensor:
    """The frozen reference's prediction: ``module`` with its adapters off, no gradient. The ``copy`` and
    ``adapter_off`` modes and the reference-error precompute all call this."""
    with adapters_disabled(module):
        return model.predict(module, noised.noisy, noised.timesteps, cond)


def _repeat_rows(value, n: int):
    """``cat([v, v])`` for every per-sample tensor (leading dim n), recursively through dicts."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _repeat_rows(v, n) for k, v in value.items()}
    return value


def batched_policy_and_reference(model, policy: nn.Module, noised, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference prediction of a LoRA model in ONE forward: ``(model_pred, ref_pred)``.

    The batch is stacked twice, ``cat([x, x])``, and every peft tuner layer receives
    ``adapter_names = [adapter]·n + ["__base__"]·n`` (peft's mixed-adapter batch,
    ``LoraLayer._mixed_batch_forward``): the base layer runs on all 2n rows, the LoRA branch only on
    the first n. Rows ``[n, 2n)`` are therefore exactly the adapter-disabled output (equal to
    ``adapter_off`` up to fp32 summation order; tested). ``ref_pred`` is returned detached.

    peft documents mixed batches as an inference feature and ``PeftModel.forward`` refuses
    ``adapter_names`` in training mode; the layer-level path used here (a forward pre-hook on each
    tuner layer, as peft's own ``_enable_peft_forward_hooks`` does) is differentiable — LoRA dropout
    is applied to the adapter rows only, which is what the reference wants.

    What it saves: one model launch sequence (kernel launches, weight reads) per step; at small batch
    a GPU runs 2n rows nearly as fast as n. What it does not: the base layers' backward still runs over
    all 2n rows and their activations are kept for it, so at large batch (and on a CPU) it can be slower
    and use more memory than ``adapter_off``. With gradient checkpointing the mask is applied again
    while a block is recomputed in backward (:func:`fastpref.train.memory.checkpoint`).
    """
    from fastpref.train.memory import checkpoint

    if any(getattr(m, "gradient_checkpointing", False) and getattr(m, "_gradient_checkpointing_func", None)
           is not checkpoint for m in policy.modules()):
        raise ValueError("the 'batched' reference mode needs gradient checkpointing enabled through "
                         "fastpref.train.memory.enable_gradient_checkpointing (--gradient_checkpointing), whose "
                         "recompute re-applies the per-sample adapter mask; another checkpoint function would not")
    layers = tuner_layers(policy)
    active = {name for layer in layers for name in layer.active_adapters}
    if len(active) != 1:
        raise ValueError(f"the 'batched' reference mode needs exactly one active adapter, found {sorted(active)}")
    n = noised.noisy.shape[0]
    adapter_names = [active.pop()] * n + ["__base__"] * n
    with mixed_adapter_batch(layers, adapter_names):
        out = model.predict(policy, _repeat_rows(noised.noisy, n), _repeat_rows(noised.timesteps, n),
                            _repeat_rows(cond, n))
    return out[:n], out[n:].detach()


_MIXED_BATCHES: list[tuple[list, list]] = []  # the mixed adapter batches being run, innermost last


@contextlib.contextmanager
def mixed_adapter_batch(layers: list[nn.Module], adapter_names: list[str]) -> Iterator[None]:
    """Every call of the tuner ``layers`` inside gets ``adapter_names`` (one per row) — peft's mixed batch,
    through a forward pre-hook on each layer."""

    def set_adapter_names(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [layer.register_forward_pre_hook(set_adapter_names, with_kwargs=True) for layer in layers]
    _MIXED_BATCHES.append((layers, adapter_names))
    try:
        yield
    finally:
        _MIXED_BATCHES.pop()
        for handle in handles:
            handle.remove()


def active_mixed_batch() -> tuple[list, list] | None:
    """``(layers, adapter_names)`` of the innermost :func:`mixed_adapter_batch` running now, or None (what a
    gradient-checkpointed block must re-apply when it is recomputed)."""
    return _MIXED_BATCHES[-1] if _MIXED_BATCHES else None


# ----------------------------------------------------------------------------------------------
# The modes: mode(policy, noised, cond, batch) -> (model_pred, ref)
# ----------------------------------------------------------------------------------------------


class _Mode:
    name = ""

    def __init__(self, model):
        self.model = model  # the DiffusionModel: its predict() knows the denoiser's keyword names

    def policy(self, policy, noised, cond) -> torch.Tensor:
        return self.model.predict(policy, noised.noisy, noised.timesteps, cond)

    def __repr__(self) -> str:
        return f"<reference mode {self.name!r}>"


class NoReference(_Mode):
    """MaPO, ORPO: the policy only."""

    name = "none"

    def __call__(self, policy, noised, cond, batch):
        return self.policy(policy, noised, cond), {}


class AdapterOffReference(_Mode):
    """LoRA: the same module with its adapters off under ``no_grad``, then the policy call. The reference
    runs first, as in ``copy``: its activations are freed before the policy's are kept for backward, so the
    two never add up in the step's peak."""

    name = "adapter_off"

    def __call__(self, policy, noised, cond, batch):
        ref_pred = reference_prediction(self.model, policy, noised, cond)
        return self.policy(policy, noised, cond), {"ref_pred": ref_pred}


class BatchedReference(_Mode):
    """LoRA: policy and reference rows in one forward (:func:`batched_policy_and_reference`)."""

    name = "batched"

    def __call__(self, policy, noised, cond, batch):
        model_pred, ref_pred = batched_policy_and_reference(self.model, policy, noised, cond)
        return model_pred, {"ref_pred": ref_pred}


class CopyReference(_Mode):
    """A frozen copy of the denoiser taken when the mode is built (before the first optimiser step), in
    ``dtype``; peft adapters, if any, disabled in the copy."""

    name = "copy"

    def __init__(self, model, dtype: torch.dtype | None = None):
        super().__init__(model)
        frozen = copy.deepcopy(model.denoiser).requires_grad_(False).eval()
        for layer in tuner_layers(frozen):
            layer.enable_adapters(False)
        if getattr(frozen, "is_gradient_checkpointing", False):  # it runs under no_grad: nothing to recompute
            frozen.disable_gradient_checkpointing()
        if dtype is not None and dtype != next(frozen.parameters()).dtype:
            frozen.to(dtype)
        self.frozen = frozen

    def __call__(self, policy, noised, cond, batch):
        ref_pred = reference_prediction(self.model, self.frozen, noised, cond)
        return self.policy(policy, noised, cond), {"ref_pred": ref_pred}


class CachedReference(_Mode):
    """Reference errors of the batch's pairs at ``batch["epoch"]`` from a
    :class:`~fastpref.train.cache.RefErrorCache`."""

    name = "cache"

    def __init__(self, model, cache):
        super().__init__(model)
        self.cache = cache

    def __call__(self, policy, noised, cond, batch):
        model_pred = self.policy(policy, noised, cond)
        ref_err = self.cache.lookup(batch["index"], batch.get("epoch", 0)).to(model_pred.device)
        return model_pred, {"ref_err": ref_err}


def make_reference(name: str, model, *, dtype: torch.dtype | None = None, cache=None):
    """The mode ``name`` for ``model`` (a DiffusionModel whose denoiser is the policy). ``copy`` copies the
    denoiser now (in ``dtype``); ``cache`` needs the loaded :class:`~fastpref.train.cache.RefErrorCache`.
    A LoRA mode on a denoiser without adapters is refused."""
    if name not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {', '.join(REFERENCE_MODES)}, got {name!r}")
    if name in ("adapter_off", "batched") and not tuner_layers(model.denoiser):
        raise ValueError(f"reference mode {name!r} needs a LoRA model (peft adapters, --lora_rank > 0); "
                         "for a full fine-tune use 'copy' or 'cache'")
    if name == "cache":
        if cache is None:
            raise TypeError("reference mode 'cache' needs cache= (a RefErrorCache)")
        return CachedReference(model, cache)
    if name == "copy":
        return CopyReference(model, dtype)
    return {"adapter_off": AdapterOffReference, "batched": BatchedReference, "none": NoReference}[name](model)


def resolve_reference_mode(cfg, objective) -> str:
    """``auto`` → ``none`` for reference-free losses, ``adapter_off`` with LoRA, ``copy`` for a full
    fine-tune; an impossible combination is refused with what to change."""
    mode = cfg.reference_mode
    if mode == "auto":
        if not objective.needs_reference:
            return "none"
        return "adapter_off" if cfg.is_lora else "copy"
    if mode == "none" and objective.needs_reference:
        raise ValueError(f"--reference_mode none: --loss {objective.name} needs a reference model; use "
                         "--reference_mode auto (or a reference-free loss)")
    if mode != "none" and not objective.needs_reference:
        raise ValueError(f"--loss {objective.name} is reference-free; use --reference_mode none or auto")
    if mode in ("adapter_off", "batched") and not cfg.is_lora:
        raise ValueError(f"--reference_mode {mode} needs LoRA (--lora_rank > 0); for a full fine-tune "
                         "(--lora_rank 0) use --reference_mode copy or auto")
    return mode
