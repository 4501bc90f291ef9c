"""The trainer's side of the reference modes: a thin adapter over :mod:`fastpref.train.reference_modes`.

Each mode is implemented once, in :mod:`fastpref.train.reference_modes` (``mode(model, inputs,
pair_indices=, epoch=) -> Predictions``). The loop speaks in noised batches, so
:class:`ReferenceMode` wraps one of those modes and gives the loop what it needs:
:meth:`ReferenceMode.predict` → ``(model_pred, ref_kwargs)`` with ``ref_kwargs`` one of
``{"ref_pred": …}``, ``{"ref_err": …}`` or ``{}`` (the losses' keyword arguments), plus
:meth:`ReferenceMode.encode_images` and :meth:`ReferenceMode.noise_pairs`.

``cache`` (``--reference_mode cache --ref_cache PATH``) reads precomputed reference errors and holds no
reference model. For the cached errors to belong to the step's noisy latents, that mode draws each
pair's VAE sample, noise and timestep from generators seeded by (seed, pair[, image], epoch) — the
draws :func:`precompute_for_training` (``python -m fastpref.train.ref``) used — instead of the loop's
per-batch generator. The other modes keep the loop's generator (``per_pair_noise=True`` switches it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from typing import Callable, Sequence

import torch
from torch import nn

from fastpref.train import reference_modes as rm

__all__ = ["ReferenceMode", "REFERENCE_MODES", "NEEDS_FROZEN_COPY", "register_reference_mode",
           "resolve_reference_mode", "encode_pairs_per_row", "noise_pairs_per_pair",
           "training_ref_fingerprint", "precompute_for_training", "main"]


def encode_pairs_per_row(model, pixels: torch.Tensor, pair_indices, seed: int) -> torch.Tensor:
    """Latents of the stacked pixels ``(2B, C, H, W)`` (winners, then losers) with the VAE posterior
    sample of row i, image j drawn from ``derive_seed(seed, i, j)`` — the latent cache's convention
    (:func:`fastpref.train.latent_cache.build_latent_cache`), independent of batch and step."""
    from fastpref.train.latent_cache import derive_seed, encode_latents

    if model.vae is None:  # pixel-space models (the tiny ones): nothing is sampled
        return pixels.float()
    rows = torch.as_tensor(pair_indices).reshape(-1).tolist()
    gens = [torch.Generator().manual_seed(derive_seed(seed, i, j)) for j in (0, 1) for i in rows]
    return encode_latents(model.vae, pixels.to(model.vae.dtype), gens)


def noise_pairs_per_pair(model, latents: torch.Tensor, pair_indices, epoch: int, seed: int):
    """:meth:`DiffusionModel.noise_pairs` with each pair's noise and timestep drawn from
    (seed, pair, epoch) by :func:`fastpref.train.ref_cache.sample_noise_and_timesteps` — the draw
    ``precompute_reference_errors`` makes."""
    from fastpref.train.models import NoisedPairs
    from fastpref.train.ref_cache import noisy_latents_and_target, sample_noise_and_timesteps

    b = latents.shape[0] // 2
    noise, t_index = sample_noise_and_timesteps(model.scheduler, latents.shape[1:], pair_indices, epoch, seed,
                                                weighting_scheme=model.weighting_scheme)
    noisy, timesteps, target = noisy_latents_and_target(model.scheduler, latents.float(), noise, t_index)
    if model.prediction_type == "epsilon":
        target = target[:b]  # shared by the pair, as noise_pairs returns it
    return NoisedPairs(noisy, timesteps, target)


class ReferenceMode:
    """One :mod:`~fastpref.train.reference_modes` mode, called the loop's way."""

    def __init__(self, model, accelerator, make_mode: Callable[..., rm.ReferenceMode], *, seed: int = 0,
                 per_pair_noise: bool = False):
        """``make_mode(forward)`` builds the :mod:`~fastpref.train.reference_modes` mode around
        :meth:`forward` (one denoiser call on the loop's batch)."""
        self.model = model  # fastpref.train.models.DiffusionModel
        self.accelerator = accelerator
        self.mode = make_mode(self.forward)
        self.name = self.mode.name
        self.seed = seed
        self.per_pair_noise = per_pair_noise or self.name == "cache"

    def forward(self, module: nn.Module, inputs: dict) -> torch.Tensor:
        """The ``forward`` the wrapped mode calls: one denoiser call on the loop's batch."""
        return self.model.predict(module, inputs["noisy"], inputs["timesteps"], inputs["cond"])

    def encode_images(self, pixels: torch.Tensor, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if self.per_pair_noise:
            return encode_pairs_per_row(self.model, pixels, batch["index"], self.seed)
        return self.model.encode_images(pixels, generator)

    def noise_pairs(self, latents: torch.Tensor, batch: dict, generator: torch.Generator):
        if self.per_pair_noise:
            return noise_pairs_per_pair(self.model, latents, batch["index"], batch.get("epoch", 0), self.seed)
        return self.model.noise_pairs(latents, generator)

    def predict(self, policy: nn.Module, noised, cond: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """``(model_pred, ref_kwargs)`` for one batch: ``model_pred`` (2B, *S) carries the graph.
        ``batch["epoch"]`` (set by the loop; 0 in evaluation) picks the cache's epoch."""
        inputs = {"noisy": noised.noisy, "timesteps": noised.timesteps, "cond": cond}
        out = self.mode(policy, inputs, pair_indices=batch.get("index"), epoch=batch.get("epoch", 0))
        ref = {}
        if out.ref_pred is not None:
            ref["ref_pred"] = out.ref_pred
        if out.ref_err is not None:
            ref["ref_err"] = out.ref_err
        return out.model_pred, ref

    def check_covers(self, num_pairs: int, num_epochs: int) -> None:
        """Refuse, before training, a run the reference-error cache does not cover (other modes: no-op)."""
        if self.name == "cache":
            self.mode.cache.check_covers(num_pairs, num_epochs)


def _wrap(make):
    """A loop factory from ``make(cfg, model, frozen_copy_or_None, forward) -> reference_modes mode``."""

    def factory(cfg, model, acc, ref_module):
        return ReferenceMode(model, acc, lambda fwd: make(cfg, model, ref_module, fwd), seed=cfg.seed)

    return factory


def _load_cache(cfg, model):
    from fastpref.train.ref_cache import RefErrorCache

    return RefErrorCache.load(cfg.ref_cache, training_ref_fingerprint(cfg, model))


# name → factory(cfg, model, accelerator, frozen_copy_or_None) -> ReferenceMode
REFERENCE_MODES: dict[str, Callable] = {
    "copy": _wrap(lambda cfg, model, ref_module, fwd: rm.CopyReference(ref_module, forward=fwd)),
    "adapter_off": _wrap(lambda cfg, model, ref_module, fwd: rm.AdapterOffReference(forward=fwd)),
    "batched": _wrap(lambda cfg, model, ref_module, fwd: rm.BatchedReference(forward=fwd)),
    "cache": _wrap(lambda cfg, model, ref_module, fwd: rm.CachedReference(_load_cache(cfg, model), forward=fwd)),
    "none": _wrap(lambda cfg, model, ref_module, fwd: rm.NoReference(forward=fwd)),
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
    if mode == "cache" and not getattr(cfg, "ref_cache", None):
        raise ValueError("--reference_mode cache needs --ref_cache PATH (written by python -m fastpref.train.ref "
                         "--config … --output PATH --epochs E)")
    return mode


# ----------------------------------------------------------------------------------------------
# The cache for a training run
# ----------------------------------------------------------------------------------------------


def _dataset_fingerprint(cfg, model) -> str:
    """What the rows the loop feeds the reference depend on: the dataset (files' names, sizes, times,
    or the synthetic set's size and seed), resolution, the VAE and text encoders, the seed."""
    from fastpref.train.latent_cache import files_fingerprint, module_fingerprint

    spec = cfg.dataset
    if os.path.isdir(spec):
        files = [os.path.join(r, f) for r, _, fs in os.walk(spec) for f in fs]
        source = files_fingerprint(files)
    elif os.path.isfile(spec):
        source = files_fingerprint([spec])
    else:
        source = {"spec": spec, "synthetic_size": cfg.synthetic_size}
    doc = {"dataset": source, "resolution": cfg.resolution or model.resolution, "seed": cfg.seed,
           "vae": module_fingerprint(model.vae) if model.vae is not None else None,
           "text_encoders": [module_fingerprint(m) for m in model.text_encoders]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def training_ref_fingerprint(cfg, model) -> dict[str, str]:
    """The fingerprint a reference-error cache must carry to be used by this run (model weights
    without adapters, scheduler, timestep sampling, dataset, seed)."""
    from fastpref.train.ref_cache import reference_fingerprint

    return reference_fingerprint(model.denoiser, scheduler=model.scheduler, seed=cfg.seed,
                                 dataset_fingerprint=_dataset_fingerprint(cfg, model),
                                 weighting_scheme=model.weighting_scheme)


class _TrainingPairs(Sequence):
    """Row i of the training dataset as the loop encodes it: ``{"latents": (2, C, h, w), "cond": …}``.
    Unreadable rows (never in a training batch) get zeros."""

    def __init__(self, model, dataset, seed: int, device):
        self.model, self.dataset, self.seed, self.device = model, dataset, seed, device

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[int(i)]
        readable = isinstance(item, dict)  # an unreadable row comes back as data.CorruptPair
        caption = item["caption"] if readable else ""
        cond = {k: v[0].cpu() for k, v in self.model.encode_prompts([caption], self.device).items()}
        if not readable:
            r = self.dataset.resolution // self.model.vae_scale_factor
            return {"latents": torch.zeros(2, self.model.latent_channels, r, r), "cond": cond}
        px = item["pixel_values"].to(self.device)  # (2, C, H, W): winner, loser
        with torch.no_grad():
            lat = encode_pairs_per_row(self.model, px, [int(i)], self.seed)
        return {"latents": lat.float().cpu(), "cond": cond}


def precompute_for_training(cfg, path, epochs: int | None = None, *, model=None, dataset=None, device="cpu", batch_size: int = 8):
    """Reference errors of every dataset row for ``epochs`` epochs of the run ``cfg`` describes, with
    the latents and per-(pair, epoch) noise the loop's ``cache`` mode uses; written to ``path``.
    The reference is ``cfg``'s model (the LoRA base, or the full model's starting weights) in the
    dtype training keeps it in (LoRA: the mixed-precision dtype; full fine-tune: fp32)."""
    from fastpref.train.data import build_dataset
    from fastpref.train.models import load_model
    from fastpref.train.ref_cache import precompute_reference_errors

    if model is None:
        model = load_model(cfg.pretrained_model_name_or_path, revision=cfg.revision, weighting_scheme=cfg.weighting_scheme)
    if dataset is None:
        dataset = build_dataset(cfg.dataset, resolution=cfg.resolution or 0, synthetic_size=cfg.synthetic_size, seed=cfg.seed)
    dataset.resolution = cfg.resolution or model.resolution
    if epochs is None:  # the loop's split: the last eval pairs are held out
        n_train = len(dataset) - min(cfg.eval_pairs, len(dataset) // 4)
        epochs = epochs_needed(cfg, min(n_train, cfg.max_train_pairs or n_train))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32) if cfg.is_lora else torch.float32
    for m in model.frozen_modules():
        m.requires_grad_(False).eval().to(device)
    model.denoiser.to(device, dtype)
    return precompute_reference_errors(
        model.denoiser, _TrainingPairs(model, dataset, cfg.seed, device), scheduler=model.scheduler, seed=cfg.seed,
        epochs=epochs, dataset_fingerprint=_dataset_fingerprint(cfg, model), path=path, batch_size=batch_size,
        device=device, dtype=dtype, weighting_scheme=model.weighting_scheme, progress=False,
    )


def epochs_needed(cfg, num_train_pairs: int, world: int = 1) -> int:
    """Epochs a run of ``cfg.max_train_steps`` optimiser steps reads (drop_last batches)."""
    batches = max(1, num_train_pairs // (cfg.train_batch_size * world))
    return math.ceil(cfg.max_train_steps / math.ceil(batches / cfg.gradient_accumulation_steps))


def main(argv: list[str] | None = None) -> int:
    """``python -m fastpref.train.ref --config run.toml --output ref.safetensors [--epochs E]``: the
    reference-error cache for a ``fastpref-train --reference_mode cache`` run with the same config."""
    from fastpref.train.config import config_from_dict, load_toml

    p = argparse.ArgumentParser(prog="python -m fastpref.train.ref", description=main.__doc__)
    p.add_argument("--config", required=True, help="the training run's TOML config")
    p.add_argument("--output", required=True, help="safetensors file to write (the run's --ref_cache)")
    p.add_argument("--epochs", type=int, default=None, help="default: what max_train_steps needs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    cfg = config_from_dict({**load_toml(args.config), "reference_mode": "auto", "ref_cache": None}).validate()
    cache = precompute_for_training(cfg, args.output, args.epochs, device=args.device)
    print(f"wrote {args.output}: reference errors for {cache.num_pairs} pairs × {cache.num_epochs} epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
