"""The ``--loss`` registry: each name maps to a public ``fastpref.*_loss`` and how the loop calls it.

A loss is registered only when this fastpref provides it (``hasattr(fastpref, ...)``), so the CLI's
choices are exactly the losses that can run. Reference-free losses (MaPO, ORPO) set
``needs_reference=False``: the loop then builds no reference model at all.

Every objective takes ``group=``, the process group of the training step, which the loop passes
(``None`` on one process and in the held-out evaluation): KTO's reference point z and RPO's weight
matrix span the global batch over it; the per-pair losses ignore it (DDP averages their gradients).
``rpo`` and ``orrpo`` (``needs_clip=True``) also take each pair's CLIP embeddings (``win_emb``,
``lose_emb``, :mod:`fastpref.train.clip_embed`) and τ. ``kto`` (``unpaired=True``) also takes
``labels=`` (``(N,)``, 1 = desirable) for a batch of unpaired samples (:mod:`fastpref.train.unpaired`).

``dro`` ranks an expert half above an online half that the loop builds with
:class:`fastpref.train.dro.DROSampler` (the lagged policy's sampling trajectories); its target is
``(2B, *S)``: fresh-noise targets for the experts, the lagged policy's predictions for the online states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import fastpref

__all__ = ["Objective", "OBJECTIVES", "UNAVAILABLE", "get_objective", "loss_choices_error"]


@dataclass(frozen=True)
class Objective:
    """How the loop calls one loss: ``call(model_pred, ref, target, cfg, group=None) -> (loss, stats)``.

    ``ref`` is the reference mode's keyword dict (``{"ref_pred": …}``, ``{"ref_err": …}`` or ``{}``).
    ``target`` may be ``(B, *S)`` (shared by each pair) or ``(2B, *S)``.
    """

    name: str
    call: Callable
    needs_reference: bool = True
    doc: str = ""
    needs_clip: bool = False  # call(..., win_emb=, lose_emb=, tau=)
    unpaired: bool = False  # call(..., labels=): trains on unpaired samples (KTO)


def _beta(cfg) -> dict:
    return {} if cfg.beta is None else {"beta": cfg.beta}


#: --loss ipo's β when --beta is not given. IPO's β is its τ: ℓ = (h − 1/(2β))² pulls the margin h
#: towards 1/(2β), so DPO's β = 5000 gives a ~1e-8 loss and no gradient to speak of. 0.1 is the IPO
#: default of TRL (DPOConfig.beta, loss_type="ipo").
IPO_DEFAULT_BETA = 0.1


def _dpo(kind: str):
    default = {"beta": IPO_DEFAULT_BETA} if kind == "ipo" else {}

    def call(model_pred, ref, target, cfg, group=None):
        return fastpref.dpo_loss(model_pred, target=target, kind=kind, return_stats=True, **ref,
                                 **{**default, **_beta(cfg)})  # fmt: skip

    return call


def _dmpo(model_pred, ref, target, cfg, group=None):
    return fastpref.dmpo_loss(model_pred, target=target, alpha=cfg.alpha, return_stats=True, **ref, **_beta(cfg))


def _full_target(model_pred, target):
    # mapo_loss, orpo_loss and kto_loss take target (2B, *S); a pair-shared (B, *S) target is repeated for them.
    return target if target.shape[0] == model_pred.shape[0] else torch.cat([target, target])


def _mapo(model_pred, ref, target, cfg, group=None):
    return fastpref.mapo_loss(model_pred, _full_target(model_pred, target), return_stats=True, **_beta(cfg))


def _orpo(model_pred, ref, target, cfg, group=None):
    return fastpref.orpo_loss(model_pred, _full_target(model_pred, target), return_stats=True, **_beta(cfg))


def _kto(model_pred, ref, target, cfg, group=None, labels=None):
    # Unpaired samples with their labels (1 desirable, 0 undesirable), or paired data read as unpaired:
    # winners desirable, losers undesirable. With group=, the reference point z is the mean over every
    # process's samples, as in the diffusion-kto training script.
    if labels is None:
        b = model_pred.shape[0] // 2
        labels = torch.cat([torch.ones(b), torch.zeros(b)])
    return fastpref.kto_loss(model_pred, ref.get("ref_pred"), _full_target(model_pred, target),
                             labels.to(model_pred.device), ref_err=ref.get("ref_err"), group=group,
                             return_stats=True, **_beta(cfg))


def _dro(model_pred, ref, target, cfg, group=None):
    # rows [0, B): the experts (the pairs' preferred images), rows [B, 2B): the online trajectory states
    return fastpref.dro_loss(model_pred, target=target, margin=cfg.dro_margin, return_stats=True, **ref)


def _build() -> dict[str, Objective]:
    table = [
        ("dpo", "dpo_loss", _dpo("sigmoid"), True, "Diffusion-DPO, −log σ(u)"),
        ("dpo_hinge", "dpo_loss", _dpo("hinge"), True, "hinge relu(1 − u)"),
        ("ipo", "dpo_loss", _dpo("ipo"), True, "IPO on error differences (β plays τ; default 0.1)"),
        ("dmpo", "dmpo_loss", _dmpo, True, "DMPO, KL(Bern σ(u) ‖ Bern(1 − α))"),
        ("mapo", "mapo_loss", _mapo, False, "MaPO, reference-free"),
        ("orpo", "orpo_loss", _orpo, False, "ORPO, reference-free"),
        ("kto", "kto_loss", _kto, True, "Diffusion-KTO: unpaired labelled samples, or pairs read as two"),
        ("dro", "dro_loss", _dro, True, "Diffusion-DRO, online negatives"),
    ]
    return {name: Objective(name, call, ref, doc, unpaired=name == "kto") for name, fn, call, ref, doc in table
            if hasattr(fastpref, fn)}


OBJECTIVES: dict[str, Objective] = _build()


def _global_share(loss, group):
    # With group=, the loss is this rank's share of the global-batch loss; DDP averages gradients over
    # ranks, so the share is scaled by the world size: the update is the global loss's, and the ranks'
    # mean of the logged value is the global loss.
    if group is None:
        return loss
    import torch.distributed as dist

    return loss * dist.get_world_size(group)


def _rpo(model_pred, ref, target, cfg, group=None, *, win_emb, lose_emb, tau):
    loss, stats = fastpref.rpo_loss(model_pred, target=target, win_emb=win_emb, lose_emb=lose_emb, tau=tau,
                                    group=group, return_stats=True, **ref, **_beta(cfg))  # fmt: skip
    return _global_share(loss, group), stats


def _orrpo(model_pred, ref, target, cfg, group=None, *, win_emb, lose_emb, tau):
    loss, stats = fastpref.orpo_loss(model_pred, _full_target(model_pred, target), win_emb=win_emb, lose_emb=lose_emb,
                                     tau=tau, group=group, return_stats=True, **_beta(cfg))  # fmt: skip
    return _global_share(loss, group), stats


OBJECTIVES["rpo"] = Objective("rpo", _rpo, True, "Diffusion-RPO, CLIP-weighted over the global batch", True)
OBJECTIVES["orrpo"] = Objective("orrpo", _orrpo, False, "Diffusion-ORRPO, reference-free, CLIP-weighted", True)

#: losses of fastpref the trainer does not run yet, and why
UNAVAILABLE: dict[str, str] = {}


def loss_choices_error(name) -> str:
    if name in UNAVAILABLE:
        return f"{UNAVAILABLE[name]} (available: {', '.join(sorted(OBJECTIVES))})"
    return f"--loss must be one of {', '.join(sorted(OBJECTIVES))} (the losses this fastpref provides), got {name!r}"


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(loss_choices_error(name))
    return OBJECTIVES[name]
