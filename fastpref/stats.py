"""Per-pair statistics that preference trainers log, returned by ``return_stats=True``.

Everything here is a detached tensor on the loss's device: building the stats never synchronises
with the device. Call ``.item()`` (or :meth:`PreferenceStats.scalars`) in the logging code, outside
the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["PreferenceStats", "preference_stats", "implicit_accuracy", "KTOStats"]


def implicit_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``1[u > 0]``, ties (``u == 0``) counted ½ — the public trainers count ties
    as wrong, which biases the accuracy of an untrained model (u = 0 everywhere) to 0 instead of ½."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


@dataclass(frozen=True)
class PreferenceStats:
    """Detached per-pair statistics of one loss call (B pairs).

    ``margin`` is the implicit reward margin u_i = reward_win_i − reward_lose_i with
    ``reward = −½·β·(e_θ − e_ref)``; ``*_err_*`` are the mean squared errors of the model and the
    reference on the winner and the loser of each pair.
    """

    margin: torch.Tensor
    implicit_accuracy: torch.Tensor
    model_err_win: torch.Tensor
    model_err_lose: torch.Tensor
    ref_err_win: torch.Tensor
    ref_err_lose: torch.Tensor
    reward_win: torch.Tensor
    reward_lose: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """Batch means as Python floats, for a logger (this one does synchronise)."""
        return {f.name: getattr(self, f.name).float().mean().item() for f in fields(self)}


def preference_stats(
    margin: torch.Tensor, model_err: torch.Tensor, ref_err: torch.Tensor, beta: float
) -> PreferenceStats:
    """Build :class:`PreferenceStats` from the margin ``(B,)`` and the ``(2B,)`` errors."""
    margin, model_err, ref_err = margin.detach(), model_err.detach(), ref_err.detach()
    mw, ml = model_err.chunk(2)
    rw, rl = ref_err.chunk(2)
    return PreferenceStats(
        margin=margin,
        implicit_accuracy=implicit_accuracy(margin),
        model_err_win=mw,
        model_err_lose=ml,
        ref_err_win=rw,
        ref_err_lose=rl,
        reward_win=-0.5 * beta * (mw - rw),
        reward_lose=-0.5 * beta * (ml - rl),
    )


@dataclass(frozen=True)
class KTOStats:
    """Detached per-sample statistics of :func:`fastpref.kto_loss` (N unpaired samples).

    ``implicit_reward`` is β·(g − z) with g = e_ref − e_θ (positive: the model denoises the sample
    better than the reference, beyond the batch reference point ``reference_point`` = z).
    """

    implicit_reward: torch.Tensor
    reference_point: torch.Tensor
    model_err: torch.Tensor
    ref_err: torch.Tensor
    desirable: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """Means for a logger, split by label (this one does synchronise); NaN for an absent label."""
        d = self.desirable
        r = self.implicit_reward.float()
        nan = torch.tensor(float("nan"), device=r.device)

        def masked_mean(mask):
            return torch.where(mask.any(), (r * mask).sum() / mask.sum().clamp(min=1), nan).item()

        return {
            "reward_desirable": masked_mean(d),
            "reward_undesirable": masked_mean(~d),
            "reference_point": self.reference_point.float().item(),
            "model_err": self.model_err.float().mean().item(),
            "ref_err": self.ref_err.float().mean().item(),
        }
