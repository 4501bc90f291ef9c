"""The reference side of a training step, behind one small interface.

A :class:`ReferenceMode` turns one noised batch into the policy's prediction (with grad) and what the
loss needs from the frozen reference: ``{"ref_pred": …}``, ``{"ref_err": …}`` or ``{}``. The loop calls
only :meth:`ReferenceMode.predict`, so a mode that fuses the two forwards (``batched``) or reads
precomputed errors (``cache``) plugs in by registering a factory in :data:`REFERENCE_MODES`.

Modes here (DESIGN §5): ``copy`` — a frozen copy of the starting model (full fine-tune; with LoRA, a
copy of the base); ``adapter_off`` — LoRA only: the same module with its adapters disabled, one extra
no-grad forward, no second copy in memory; ``none`` — reference-free losses (MaPO, ORPO).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["ReferenceMode", "CopyReference", "AdapterOffReference", "NoReference", "REFERENCE_MODES",
           "register_reference_mode", "resolve_reference_mode"]


class ReferenceMode:
    """Base: the policy forward; subclasses add the reference."""

    name = "base"

    def __init__(self, model, accelerator):
        self.model = model  # fastpref.train.models.DiffusionModel
        self.accelerator = accelerator

    def predict(self, policy: nn.Module, noised, cond: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """``(model_pred, ref_kwargs)`` for one batch: ``model_pred`` (2B, *S) carries the graph."""
        model_pred = self.model.predict(policy, noised.noisy, noised.timesteps, cond)
        return model_pred, self.reference(policy, noised, cond, batch)

    def reference(self, policy: nn.Module, noised, cond: dict, batch: dict) -> dict:
        raise NotImplementedError


class NoReference(ReferenceMode):
    name = "none"

    def reference(self, policy, noised, cond, batch) -> dict:
        return {}


class CopyReference(ReferenceMode):
    """A frozen copy of the starting weights (made before training; kept in the mixed-precision dtype)."""

    name = "copy"

    def __init__(self, model, accelerator, ref_module: nn.Module):
        super().__init__(model, accelerator)
        self.ref_module = ref_module

    @torch.no_grad()
    def reference(self, policy, noised, cond, batch) -> dict:
        with self.accelerator.autocast():
            return {"ref_pred": self.model.predict(self.ref_module, noised.noisy, noised.timesteps, cond)}


class AdapterOffReference(ReferenceMode):
    """LoRA: the reference is the policy with its adapters disabled (peft), one no-grad forward."""

    name = "adapter_off"

    @torch.no_grad()
    def reference(self, policy, noised, cond, batch) -> dict:
        module = self.accelerator.unwrap_model(policy)
        module.disable_adapters()
        try:
            with self.accelerator.autocast():
                ref_pred = self.model.predict(module, noised.noisy, noised.timesteps, cond)
        finally:
            module.enable_adapters()
        return {"ref_pred": ref_pred}


class BatchedReference(ReferenceMode):
    """LoRA: policy and reference rows in ONE forward with a per-sample adapter mask (peft's mixed-adapter
    batch; :func:`fastpref.train.reference_modes.batched_policy_and_reference`)."""

    name = "batched"

    def predict(self, policy, noised, cond, batch):
        from fastpref.train.reference_modes import batched_policy_and_reference

        inputs = {"noisy": noised.noisy, "timesteps": noised.timesteps, "cond": cond}
        model_pred, ref_pred = batched_policy_and_reference(
            policy, inputs, forward=lambda m, x: self.model.predict(m, x["noisy"], x["timesteps"], x["cond"])
        )
        return model_pred, {"ref_pred": ref_pred}


# name → factory(cfg, model, accelerator, frozen_copy_or_None) -> ReferenceMode
REFERENCE_MODES: dict[str, Callable] = {
    "copy": lambda cfg, model, acc, ref_module: CopyReference(model, acc, ref_module),
    "adapter_off": lambda cfg, model, acc, ref_module: AdapterOffReference(model, acc),
    "none": lambda cfg, model, acc, ref_module: NoReference(model, acc),
    "batched": lambda cfg, model, acc, ref_module: BatchedReference(model, acc),
}
NEEDS_FROZEN_COPY = {"copy"}


def register_reference_mode(name: str, factory: Callable, *, needs_frozen_copy: bool = False) -> None:
    """Add a mode (``factory(cfg, model, accelerator, frozen_copy_or_None) -> ReferenceMode``)."""
    REFERENCE_MODES[name] = factory
    if needs_frozen_copy:
        NEEDS_FROZEN_COPY.add(name)


def resolve_reference_mode(cfg, objective) -> str:
    """``auto`` → ``none`` for reference-free losses, ``adapter_off`` with LoRA, ``copy`` for full
    fine-tuning; an impossible combination is refused with what to change."""
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
