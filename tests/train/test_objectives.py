"""The trainer's ``--loss`` registry (fastpref/train/objectives.py): each objective calls its public loss
with the flags the user gave, the target shape the loss needs, and (kto) winners labelled desirable."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _pairs import make_pairs

import fastpref
from fastpref.train.objectives import OBJECTIVES, get_objective

CFG = SimpleNamespace(beta=7.0, alpha=0.2, dro_margin=0.3)  # non-default values: a flag that is not forwarded shows
EXPECTED = {
    "dpo": lambda m, r, t: fastpref.dpo_loss(m, r, t, beta=7.0),
    "dpo_hinge": lambda m, r, t: fastpref.dpo_loss(m, r, t, beta=7.0, kind="hinge"),
    "ipo": lambda m, r, t: fastpref.dpo_loss(m, r, t, beta=7.0, kind="ipo"),
    "dmpo": lambda m, r, t: fastpref.dmpo_loss(m, r, t, beta=7.0, alpha=0.2),
    "mapo": lambda m, r, t: fastpref.mapo_loss(m, torch.cat([t, t]), beta=7.0),
    "orpo": lambda m, r, t: fastpref.orpo_loss(m, torch.cat([t, t]), beta=7.0),
    "kto": lambda m, r, t: fastpref.kto_loss(m, r, torch.cat([t, t]), torch.tensor([1, 1, 1, 0, 0, 0]), beta=7.0),
    "dro": lambda m, r, t: fastpref.dro_loss(m, r, t, margin=0.3),
}
# the CLIP-weighted losses also take the pair embeddings and τ (the trainer computes them per batch)
CLIP_EXPECTED = {
    "rpo": lambda m, r, t, w, l: fastpref.rpo_loss(m, r, t, win_emb=w, lose_emb=l, tau=0.3, beta=7.0),
    "orrpo": lambda m, r, t, w, l: fastpref.orpo_loss(m, torch.cat([t, t]), win_emb=w, lose_emb=l, tau=0.3, beta=7.0),
}


def test_every_registered_objective_is_checked():
    assert set(OBJECTIVES) <= set(EXPECTED) | set(CLIP_EXPECTED), set(OBJECTIVES) - set(EXPECTED) - set(CLIP_EXPECTED)


@pytest.mark.parametrize("name", sorted(CLIP_EXPECTED))
def test_clip_weighted_objective_calls_its_loss_with_the_flags(name):
    model_pred, ref_pred, target, _ = make_pairs(3, (4, 5), torch.float32, "cpu", shared=True)
    g = torch.Generator().manual_seed(5)
    win_emb, lose_emb = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    objective = get_objective(name)
    ref = {"ref_pred": ref_pred} if objective.needs_reference else {}
    loss, _ = objective.call(model_pred, ref, target, CFG, win_emb=win_emb, lose_emb=lose_emb, tau=0.3)
    expected = CLIP_EXPECTED[name](model_pred, ref_pred, target, win_emb, lose_emb)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_objective_calls_its_loss_with_the_flags(name):
    if name not in OBJECTIVES:
        pytest.skip(f"{name} is not registered in this build")
    model_pred, ref_pred, target, _ = make_pairs(3, (4, 5), torch.float32, "cpu", shared=True)
    objective = get_objective(name)
    ref = {"ref_pred": ref_pred} if objective.needs_reference else {}
    loss, stats = objective.call(model_pred, ref, target, CFG)
    torch.testing.assert_close(loss, EXPECTED[name](model_pred, ref_pred, target), rtol=1e-6, atol=1e-7)
    assert stats is not None
    if objective.needs_reference:  # the reference errors may come precomputed (cache mode)
        ref_err = fastpref.reference.pair_errors(ref_pred, target)
        loss_err, _ = objective.call(model_pred, {"ref_err": ref_err}, target, CFG)
        torch.testing.assert_close(loss_err, loss, rtol=1e-5, atol=1e-6)


def test_unknown_objective_names_the_choices():
    with pytest.raises(ValueError, match="--loss must be one of"):
        get_objective("nope")
