"""The trainer's randomness: every draw is a function of (seed, pair, epoch), never of the batch.

A training step needs, per preference pair i, one VAE posterior sample per image and one noise tensor
and one timestep shared by winner and loser. Each comes from its own CPU generator:

=========================  ================================  ===========================================
draw                       generator seeded by               so that
=========================  ================================  ===========================================
VAE sample of image j      ``(seed, i, j, −2)``, j = 0 / 1   a cached latent equals the one the step
                                                             would encode (it does not change per epoch)
noise ε and timestep t     ``(seed, i, epoch)``              the reference error of pair i at an epoch can
                                                             be computed before training (``cache`` mode)
=========================  ================================  ===========================================

A pair therefore gets the same draws whatever batch it lands in, the batch size, the number of
processes or the device; a resumed run repeats an uninterrupted one. :func:`derive_seed` hashes the
tuple (sha256), so nearby tuples give unrelated streams (``seed + i`` would make pair i of seed s
pair i − 1 of seed s + 1).

Noising (each pair shares ε and t; rows stacked ``[w_0 … w_{B−1}, l_0 … l_{B−1}]``):

* DDPM (``UNet2DConditionModel``): ``x_t = scheduler.add_noise(x0, ε, t)``, ``t`` uniform in
  ``[0, num_train_timesteps)`` as in diffusers' ``train_diffusion_dpo.py``; target ``ε`` (given once
  per pair, ``(B, *S)``: the fused loss reads it once) or ``scheduler.get_velocity(x0, ε, t)``.
* Flow matching (``FlowMatchEulerDiscreteScheduler``, SD3): ``x_t = (1 − σ)·x0 + σ·ε``, target ``ε − x0``,
  ``σ = sigmas[k]``, ``t = timesteps[k]``, ``k = ⌊u·N⌋`` with ``u`` from diffusers'
  ``compute_density_for_timestep_sampling(weighting_scheme, logit_mean, logit_std, mode_scale)`` (by
  default the SD3 scripts' ``logit_normal``, mean 0, std 1; the Flux scripts' ``none``, uniform). ``σ``
  and ``t`` come from a fresh copy of the checkpoint's scheduler, as the scripts' ``noise_scheduler_copy``:
  a static ``shift`` (SD3) is in its sigmas, a dynamic one (FLUX.1, ``use_dynamic_shifting``) is not.
  Flux packs 2×2 latent patches only around the transformer call: the noise is drawn here in the
  unpacked ``(C, h, w)`` shape (:mod:`fastpref.train.flux`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["WEIGHTING_SCHEMES", "NoisedPairs", "derive_seed", "vae_generators", "draw_noise", "add_noise",
           "noise_pairs"]

# The timestep densities of diffusers' compute_density_for_timestep_sampling (any other name would
# silently sample uniformly, like "none").
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none")


@dataclass
class NoisedPairs:
    """One noised batch: ``noisy`` (2B, *S) fp32; ``timesteps`` (2B,); ``target`` (B, *S) when the pair
    shares it (ε-prediction), else (2B, *S)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


_VAE_STREAM = -2  # the VAE posterior draws (the pair transform's stream is −1)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, pair, …), through sha256."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _pairs(pair_indices) -> list[int]:
    return torch.as_tensor(pair_indices).reshape(-1).tolist()


def vae_generators(seed: int, pair_indices, images: int = 2) -> list[torch.Generator]:
    """One CPU generator per image of the stacked batch (winners, then losers; ``images=1``: the rows of
    an unpaired batch): ``(seed, pair, j, −2)`` — a stream of its own: ``(seed, pair, epoch)`` seeds the
    training noise, and at epoch j the two would otherwise be one generator."""
    pairs = _pairs(pair_indices)
    return [torch.Generator().manual_seed(derive_seed(seed, i, j, _VAE_STREAM)) for j in range(images) for i in pairs]


def draw_noise(scheduler, latent_shape: Sequence[int], pair_indices, epoch: int, seed: int,
               weighting_scheme: str = "logit_normal", *, logit_mean: float = 0.0, logit_std: float = 1.0,
               mode_scale: float = 1.29) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``(B, *latent_shape)`` (fp32, CPU) and timestep indices ``(B,)`` of the pairs at ``epoch``:
    one generator per pair seeded with ``(seed, pair, epoch)``, timestep first, then noise."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    flow = _is_flow(scheduler)
    if flow and weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {weighting_scheme!r}")
    n_train = int(scheduler.config.num_train_timesteps)
    noise, t_index = [], []
    for i in _pairs(pair_indices):
        g = torch.Generator().manual_seed(derive_seed(seed, i, epoch))
        if flow:
            u = compute_density_for_timestep_sampling(weighting_scheme, 1, logit_mean=logit_mean, logit_std=logit_std,
                                                      mode_scale=mode_scale, generator=g)
            t_index.append((u * n_train).long().clamp(0, n_train - 1))
        else:
            t_index.append(torch.randint(0, n_train, (1,), generator=g))
        noise.append(torch.randn(tuple(latent_shape), generator=g))
    return torch.stack(noise), torch.cat(t_index)


def _is_flow(scheduler) -> bool:
    return not hasattr(scheduler, "alphas_cumprod")


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t_index: torch.Tensor) -> NoisedPairs:
    """Noise the stacked batch ``x0`` (2B, *S) with the pair noise ``(B, *S)`` and timestep indices ``(B,)``
    (shared by winner and loser), in fp32 (fp64 for fp64 latents); the target of the scheduler's
    prediction type. An unpaired batch, ``x0`` (B, *S), gets one noise and timestep per row."""
    b = noise.shape[0]
    if x0.shape[0] not in (b, 2 * b) or x0.shape[1:] != noise.shape[1:]:
        raise ValueError(f"x0 must be (2·{b}, {tuple(noise.shape[1:])}) (pairs) or ({b}, {tuple(noise.shape[1:])}) "
                         f"(unpaired), got {tuple(x0.shape)}")
    images = x0.shape[0] // b
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x0 = x0.to(work)
    noise = noise.to(x0.device, work)
    eps = torch.cat([noise] * images)
    idx = torch.cat([t_index] * images).to(x0.device)
    if _is_flow(scheduler):
        fresh = type(scheduler).from_config(scheduler.config)  # sampling may have called set_timesteps on the live one
        sigma = fresh.sigmas.to(x0.device, work)[idx].reshape(-1, *([1] * (x0.dim() - 1)))
        return NoisedPairs((1.0 - sigma) * x0 + sigma * eps, fresh.timesteps.to(x0.device)[idx], eps - x0)
    prediction_type = scheduler.config.prediction_type
    noisy = scheduler.add_noise(x0, eps, idx)
    if prediction_type == "epsilon":
        return NoisedPairs(noisy, idx, noise)
    if prediction_type == "v_prediction":
        return NoisedPairs(noisy, idx, scheduler.get_velocity(x0, eps, idx))
    raise ValueError(f"scheduler prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def noise_pairs(model, latents: torch.Tensor, pair_indices, epoch: int, seed: int) -> NoisedPairs:
    """The step's noising: :func:`draw_noise` for the pairs at ``epoch``, then :func:`add_noise`.
    ``model`` is a :class:`~fastpref.train.models.DiffusionModel` (scheduler, weighting scheme)."""
    noise, t_index = draw_noise(model.scheduler, latents.shape[1:], pair_indices, epoch, seed,
                                model.weighting_scheme, logit_mean=model.logit_mean, logit_std=model.logit_std,
                                mode_scale=model.mode_scale)  # one per row: a pair's, or an unpaired image's
    return add_noise(model.scheduler, latents, noise, t_index)
