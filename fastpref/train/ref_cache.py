"""Reference-error cache: run the frozen reference once, before training (``fastpref-precompute-ref``).

The reference model is frozen, so its error on a given pair depends only on the noise and timestep
drawn for that pair. Draw them deterministically — one generator per (seed, pair, epoch), see
:func:`sample_noise_and_timesteps` — and the reference errors of a whole training run can be
computed ahead of time: ``ref_err[epoch, pair] = (e_ref[winner], e_ref[loser])``, stored in a
safetensors file with a fingerprint (model config and weights, dataset, seed, scheduler config).
During training the loss takes ``ref_err=`` instead of ``ref_pred`` and no reference model is in
memory. The trainer must draw its noise with the same function for the cached errors to be the
errors of its noisy latents.

Noising (each pair shares noise and timestep):

* DDPM (``UNet2DConditionModel``): ``x_t = scheduler.add_noise(x0, ε, t)``, target ``ε``
  (``epsilon``) or ``scheduler.get_velocity(x0, ε, t)`` (``v_prediction``); ``t`` uniform in
  ``[0, num_train_timesteps)``, as the diffusers DPO example.
* Flow matching (``FlowMatchEulerDiscreteScheduler``, SD3/Flux): ``x_t = (1 − σ)·x0 + σ·ε``,
  target ``ε − x0``, with ``σ = sigmas[i]``, ``t = timesteps[i]``, ``i = ⌊u·N⌋`` and ``u`` drawn as
  the SD3 example does (``weighting_scheme``, default ``logit_normal``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fastpref.reference import pair_errors
from fastpref.train.latent_cache import (
    _META_FINGERPRINT,
    _META_KIND,
    _read_metadata,
    check_fingerprint,
    config_fingerprint,
    derive_seed,
    module_fingerprint,
    stack_pairs,
)
from fastpref.train.reference_modes import adapters_disabled, call_model, model_inputs, tuner_layers

__all__ = [
    "REF_CACHE_FORMAT",
    "sample_noise_and_timesteps",
    "noisy_latents_and_target",
    "reference_fingerprint",
    "precompute_reference_errors",
    "RefErrorCache",
    "main",
]

REF_CACHE_FORMAT = "fastpref-ref-err-v1"


def _is_flow(scheduler) -> bool:
    return not hasattr(scheduler, "alphas_cumprod")


WEIGHTING_SCHEMES = ("logit_normal", "mode", "none")


def _timestep_sampling(scheduler, weighting_scheme: str) -> str:
    if _is_flow(scheduler):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
        return weighting_scheme
    return "uniform"


def sample_noise_and_timesteps(
    scheduler,
    latent_shape: Sequence[int],
    pair_indices,
    epoch: int,
    seed: int,
    *,
    weighting_scheme: str = "logit_normal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic noise ``(B, *latent_shape)`` (fp32, CPU) and timestep indices ``(B,)`` for the
    pairs ``pair_indices`` at ``epoch``: one generator per pair, seeded from (seed, pair, epoch),
    so a pair gets the same draw whatever the batch it lands in, the batch size or the device.

    DDPM: index uniform in ``[0, num_train_timesteps)``. Flow matching: ``u`` from diffusers'
    ``compute_density_for_timestep_sampling(weighting_scheme)`` (the SD3 script's default
    ``logit_normal``, mean 0, std 1), index ``⌊u·N⌋``.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = _timestep_sampling(scheduler, weighting_scheme)
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    noise, t_index = [], []
    for p in torch.as_tensor(pair_indices).reshape(-1).tolist():
        g = torch.Generator().manual_seed(derive_seed(seed, p, epoch))
        if scheme == "uniform":
            idx = torch.randint(0, num_train_timesteps, (1,), generator=g)
        else:
            u = compute_density_for_timestep_sampling(
                scheme, 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=g
            )
            idx = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
        t_index.append(idx)
        noise.append(torch.randn(tuple(latent_shape), generator=g))
    return torch.stack(noise), torch.cat(t_index)


def noisy_latents_and_target(
    scheduler, x0: torch.Tensor, noise: torch.Tensor, t_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, timesteps, target)`` for the stacked batch ``x0 = (2B, …)`` (winners, then losers), with
    the pair noise ``(B, …)`` and timestep indices ``(B,)`` shared by winner and loser."""
    b = noise.shape[0]
    if x0.shape[0] != 2 * b or x0.shape[1:] != noise.shape[1:]:
        raise ValueError(f"x0 must be (2·{b}, {tuple(noise.shape[1:])}), got {tuple(x0.shape)}")
    eps = torch.cat([noise, noise]).to(x0.device, x0.dtype)
    idx = torch.cat([t_index, t_index]).to(x0.device)
    if _is_flow(scheduler):
        fresh = type(scheduler).from_config(scheduler.config)  # set_timesteps() may have changed the live one
        sigma = fresh.sigmas.to(x0.device, x0.dtype)[idx].reshape(-1, *([1] * (x0.dim() - 1)))
        timesteps = fresh.timesteps.to(x0.device)[idx]
        return (1.0 - sigma) * x0 + sigma * eps, timesteps, eps - x0
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, eps, idx)
    else:
        raise ValueError(f"scheduler prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return scheduler.add_noise(x0, eps, idx), idx, target


def reference_fingerprint(
    model: nn.Module, *, scheduler, seed: int, dataset_fingerprint: str, weighting_scheme: str = "logit_normal"
) -> dict[str, str]:
    """What cached reference errors depend on: the reference (base) model's config and weights —
    peft adapters excluded —, the scheduler config and timestep sampling, the dataset and the seed."""
    if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
        raise TypeError("dataset_fingerprint must be a non-empty string")
    return {
        "format": REF_CACHE_FORMAT,
        "model": module_fingerprint(model),
        "scheduler": config_fingerprint(scheduler.config),
        "timestep_sampling": _timestep_sampling(scheduler, weighting_scheme),
        "dataset": dataset_fingerprint,
        "seed": str(int(seed)),
    }


@torch.no_grad()
def precompute_reference_errors(
    model: nn.Module,
    pairs: Sequence[Mapping[str, Any]],
    *,
    scheduler,
    seed: int,
    epochs: int,
    dataset_fingerprint: str,
    path: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    weighting_scheme: str = "logit_normal",
    progress: bool = True,
) -> "RefErrorCache":
    """Run the frozen reference over every pair for ``epochs`` epochs and cache its errors.

    Args:
        model: the reference: a diffusers UNet/transformer; if it carries peft adapters they are
            disabled (the reference of a LoRA run is the base model).
        pairs: ``pairs[i] = {"latents": (2, C, h, w), "cond": {name: tensor}}`` — a
            :class:`~fastpref.train.latent_cache.LatentCache` is one.
        scheduler: the training noise scheduler (DDPM or FlowMatchEuler).
        seed, epochs: noise and timesteps of pair i at epoch e come from ``(seed, i, e)``.
        dataset_fingerprint: identifies ``pairs`` (``LatentCache.dataset_fingerprint``).
        path: where to write the safetensors file (not written if None).
        device, dtype: where and in which dtype to run the model (default: the model's).
        weighting_scheme: timestep sampling of flow-matching models (:func:`sample_noise_and_timesteps`).

    Returns:
        the :class:`RefErrorCache`, ``ref_err`` of shape ``(epochs, N, 2)`` in fp32 (fp64 for an
        fp64 model).
    """
    from tqdm.auto import tqdm

    n = len(pairs)
    if n == 0:
        raise ValueError("pairs is empty: nothing to precompute")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    fingerprint = reference_fingerprint(
        model,
        scheduler=scheduler,
        seed=seed,
        dataset_fingerprint=dataset_fingerprint,
        weighting_scheme=weighting_scheme,
    )
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    was_training = model.training
    model.eval()
    ctx = adapters_disabled(model) if tuner_layers(model) else contextlib.nullcontext()
    # noising and errors in fp32 (fp64 for an fp64 model), as pair_errors upcasts
    work = torch.float64 if dtype == torch.float64 else torch.float32
    ref_err = torch.empty(epochs, n, 2, dtype=work)
    try:
        with ctx:
            steps = [(e, s) for e in range(epochs) for s in range(0, n, batch_size)]
            for epoch, start in tqdm(steps, desc="reference errors", disable=not progress):
                rows = torch.arange(start, min(start + batch_size, n))
                x0, cond = stack_pairs([pairs[int(i)] for i in rows])
                noise, t_index = sample_noise_and_timesteps(
                    scheduler, x0.shape[1:], rows, epoch, seed, weighting_scheme=weighting_scheme
                )
                x_t, timesteps, target = noisy_latents_and_target(scheduler, x0.to(device, work), noise, t_index)
                cond = {k: v.to(device, dtype) for k, v in cond.items()}
                pred = call_model(model, model_inputs(model, x_t.to(dtype), timesteps, cond))
                err = pair_errors(pred.to(work), target).to("cpu", work)
                b = rows.numel()
                ref_err[epoch, rows, 0] = err[:b]
                ref_err[epoch, rows, 1] = err[b:]
    finally:
        model.train(was_training)
    cache = RefErrorCache(ref_err, fingerprint)
    if path is not None:
        cache.save(path)
    return cache


class RefErrorCache:
    """Precomputed reference errors ``(epochs, N, 2)``; :meth:`lookup` gives the ``(2B,)`` ``ref_err``
    of a batch (winners first, then losers) for the losses' ``ref_err=``."""

    def __init__(self, ref_err: torch.Tensor, fingerprint: Mapping[str, str]):
        if ref_err.dim() != 3 or ref_err.shape[2] != 2:
            raise ValueError(f"ref_err must be (epochs, pairs, 2), got {tuple(ref_err.shape)}")
        self.ref_err = ref_err
        self.fingerprint = dict(fingerprint)

    @property
    def num_epochs(self) -> int:
        return self.ref_err.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.ref_err.shape[1]

    def save(self, path) -> None:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        meta = {_META_KIND: REF_CACHE_FORMAT, _META_FINGERPRINT: json.dumps(self.fingerprint, sort_keys=True)}
        save_file({"ref_err": self.ref_err.contiguous()}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path, expected: Mapping[str, str]) -> "RefErrorCache":
        """Read ``path``; ValueError if it was computed for another model, scheduler, dataset or seed
        (``expected``: :func:`reference_fingerprint` of the current run)."""
        from safetensors.torch import load_file

        stored = _read_metadata(path, REF_CACHE_FORMAT, "reference-error cache")
        check_fingerprint(stored, expected, path, "reference-error cache")
        return cls(load_file(os.fspath(path))["ref_err"], stored)

    def check_covers(self, num_pairs: int, num_epochs: int) -> None:
        """Refuse, before training starts, a run the cache does not cover."""
        if num_pairs != self.num_pairs or num_epochs > self.num_epochs:
            raise ValueError(
                f"the reference-error cache holds {self.num_pairs} pairs × {self.num_epochs} epochs; this run "
                f"needs {num_pairs} pairs × {num_epochs} epochs: rerun fastpref-precompute-ref with "
                f"--epochs {num_epochs}"
            )

    def lookup(self, pair_indices, epoch: int) -> torch.Tensor:
        """``(2B,)`` reference errors of the pairs ``pair_indices`` at ``epoch``: winners, then losers."""
        idx = torch.as_tensor(pair_indices).reshape(-1).to("cpu", torch.long)
        if not 0 <= int(epoch) < self.num_epochs:
            raise ValueError(f"epoch {epoch} is not in the reference-error cache (epochs 0…{self.num_epochs - 1})")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_pairs):
            raise ValueError(f"pair indices must lie in [0, {self.num_pairs}), got {idx.tolist()}")
        rows = self.ref_err[int(epoch)][idx]  # (B, 2)
        return torch.cat([rows[:, 0], rows[:, 1]])


# ----------------------------------------------------------------------------------------------
# fastpref-precompute-ref
# ----------------------------------------------------------------------------------------------


def _load_model_and_scheduler(path: str, subfolder: str | None):
    """The denoiser of a diffusers pipeline folder or hub id and the scheduler its training script
    uses: DDPM for UNets, FlowMatchEuler for transformers (as diffusers' training examples)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel

    if subfolder is None:
        subfolder = "unet" if os.path.isdir(os.path.join(path, "unet")) or not os.path.isdir(path) else "transformer"
    if subfolder == "unet":
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet"), DDPMScheduler.from_pretrained(
            path, subfolder="scheduler"
        )
    if subfolder == "transformer":
        return SD3Transformer2DModel.from_pretrained(
            path, subfolder="transformer"
        ), FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    raise ValueError(f"--subfolder must be 'unet' or 'transformer', got {subfolder!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``fastpref-precompute-ref``: reference errors for every pair of a latent cache."""
    from fastpref.train.latent_cache import LatentCache, _read_metadata as read_meta, LATENT_CACHE_FORMAT

    parser = argparse.ArgumentParser(prog="fastpref-precompute-ref", description=main.__doc__)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers pipeline folder or hub id")
    parser.add_argument("--subfolder", choices=("unet", "transformer"), default=None, help="default: detected")
    parser.add_argument("--latent_cache", required=True, help="safetensors file written by build_latent_cache")
    parser.add_argument("--output", required=True, help="safetensors file to write")
    parser.add_argument("--seed", type=int, required=True, help="the training run's --seed")
    parser.add_argument("--epochs", type=int, required=True, help="epochs the training run will see")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="logit_normal",
                        help="timestep sampling of flow-matching models (the training run's)")
    args = parser.parse_args(argv)

    # The latent cache's own fingerprint was checked when it was built; here it identifies the data.
    latents = LatentCache(args.latent_cache, read_meta(args.latent_cache, LATENT_CACHE_FORMAT, "latent cache"))
    model, scheduler = _load_model_and_scheduler(args.pretrained_model_name_or_path, args.subfolder)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    model.to(args.device, dtype)
    cache = precompute_reference_errors(
        model,
        latents,
        scheduler=scheduler,
        seed=args.seed,
        epochs=args.epochs,
        dataset_fingerprint=latents.dataset_fingerprint,
        path=args.output,
        batch_size=args.batch_size,
        weighting_scheme=args.weighting_scheme,
    )
    print(f"wrote {args.output}: reference errors for {cache.num_pairs} pairs × {cache.num_epochs} epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
