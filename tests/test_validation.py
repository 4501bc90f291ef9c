"""Bad input gets one clear ValueError/TypeError naming the argument — before any kernel runs."""

import pytest
import torch

import fastpref


def _inputs(num_pairs=2, shape=(3, 4)):
    g = torch.Generator().manual_seed(0)
    n = 2 * num_pairs
    return (torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g),
            torch.randn(n, *shape, generator=g))  # fmt: skip


M, R, T = _inputs()
META = torch.device("meta")

BAD_CALLS = [
    # (description, kwargs for the call, exception, text the message must contain)
    ("odd batch", dict(model_pred=M[:3], ref_pred=R[:3], target=T[:3]), ValueError, "model_pred"),
    ("0-d model_pred", dict(model_pred=torch.tensor(1.0), ref_pred=R, target=T), ValueError, "model_pred"),
    ("empty samples", dict(model_pred=torch.empty(4, 0), ref_pred=torch.empty(4, 0), target=torch.empty(4, 0)),
     ValueError, "no elements"),
    ("not a tensor", dict(model_pred=M.tolist(), ref_pred=R, target=T), TypeError, "model_pred"),
    ("integer model_pred", dict(model_pred=M.long(), ref_pred=R, target=T), TypeError, "model_pred"),
    ("integer target", dict(model_pred=M, ref_pred=R, target=T.int()), TypeError, "target"),
    ("integer ref_pred", dict(model_pred=M, ref_pred=R.int(), target=T), TypeError, "ref_pred"),
    ("ref_pred shape", dict(model_pred=M, ref_pred=R[:, :2], target=T), ValueError, "ref_pred"),
    ("target shape", dict(model_pred=M, ref_pred=R, target=T[:, :2]), ValueError, "target"),
    ("target batch", dict(model_pred=M, ref_pred=R, target=T[:3]), ValueError, "target"),
    ("missing target", dict(model_pred=M, ref_pred=R, target=None), TypeError, "target"),
    ("neither ref", dict(model_pred=M, ref_pred=None, target=T), TypeError, "ref_pred"),
    ("both refs", dict(model_pred=M, ref_pred=R, target=T, ref_err=torch.ones(4)), TypeError, "ref_err"),
    ("ref_err shape", dict(model_pred=M, target=T, ref_err=torch.ones(2)), ValueError, "ref_err"),
    ("ref_err dtype", dict(model_pred=M, target=T, ref_err=torch.ones(4, dtype=torch.long)), TypeError, "ref_err"),
    ("ref_pred grad", dict(model_pred=M, ref_pred=R.clone().requires_grad_(True), target=T), ValueError, "no_grad"),
    ("target grad", dict(model_pred=M, ref_pred=R, target=T.clone().requires_grad_(True)), ValueError, "target"),
    ("ref_err grad", dict(model_pred=M, target=T, ref_err=torch.ones(4, requires_grad=True)), ValueError, "ref_err"),
    ("target device", dict(model_pred=M, ref_pred=R, target=T.to(META)), ValueError, "target"),
    ("ref_pred device", dict(model_pred=M, ref_pred=R.to(META), target=T), ValueError, "ref_pred"),
    ("ref_err device", dict(model_pred=M, target=T, ref_err=torch.ones(4, device=META)), ValueError, "ref_err"),
    ("beta zero", dict(model_pred=M, ref_pred=R, target=T, beta=0.0), ValueError, "beta"),
    ("beta negative", dict(model_pred=M, ref_pred=R, target=T, beta=-5.0), ValueError, "beta"),
    ("beta inf", dict(model_pred=M, ref_pred=R, target=T, beta=float("inf")), ValueError, "beta"),
    ("beta tensor", dict(model_pred=M, ref_pred=R, target=T, beta=torch.tensor(5.0)), TypeError, "beta"),
    ("beta bool", dict(model_pred=M, ref_pred=R, target=T, beta=True), TypeError, "beta"),
    ("reduction", dict(model_pred=M, ref_pred=R, target=T, reduction="avg"), ValueError, "reduction"),
    ("backend", dict(model_pred=M, ref_pred=R, target=T, backend="tpu"), ValueError, "backend"),
]  # fmt: skip


@pytest.mark.parametrize("fn", [fastpref.dpo_loss, fastpref.dmpo_loss], ids=["dpo", "dmpo"])
@pytest.mark.parametrize("desc,kwargs,exc,text", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clearly(fn, desc, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        fn(**kwargs)


@pytest.mark.parametrize("alpha,exc", [(0.0, ValueError), (1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                       ("0.1", TypeError)])  # fmt: skip
def test_dmpo_alpha_outside_unit_interval(alpha, exc):
    with pytest.raises(exc, match="alpha"):
        fastpref.dmpo_loss(M, R, T, alpha=alpha)


def test_unknown_dpo_kind():
    with pytest.raises(ValueError, match="kind"):
        fastpref.dpo_loss(M, R, T, kind="logistic")


def test_good_input_variants_are_accepted():
    """The forms the docs promise: shared target, ref_err, mixed float dtypes, keyword target."""
    fastpref.dpo_loss(M, R, T[:2])
    fastpref.dpo_loss(M, target=T, ref_err=torch.ones(4, dtype=torch.float64))
    fastpref.dmpo_loss(M.bfloat16(), R.half(), T)
