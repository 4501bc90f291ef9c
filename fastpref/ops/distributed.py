"""The global batch of a cross-pair loss (Diffusion-RPO): every rank's losers, gathered. Plain
``torch.distributed``, no kernel, so it runs on every backend."""

from __future__ import annotations

import torch

__all__ = ["gather_constant", "gather_losers"]


def gather_constant(x: torch.Tensor, group) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0 (rank order); no gradient."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts)


def gather_losers(model_err_lose: torch.Tensor, ref_err_lose: torch.Tensor, group):
    """The losers' errors of every rank, ``(world·M,)`` each. e_θ goes through the autograd-aware
    ``torch.distributed.nn.functional.all_gather``: its backward sums every rank's gradient for this
    rank's slice (reduce-scatter; all-to-all on gloo), so the gradient that reaches this rank's
    ``model_pred`` is that of the sum of all ranks' losses."""
    import torch.distributed.nn.functional as dist_nn

    ml_all = torch.cat(dist_nn.all_gather(model_err_lose, group=group))
    return ml_all, gather_constant(ref_err_lose, group)
