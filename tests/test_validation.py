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


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_good_input_variants_are_accepted(backend):
    """The forms the docs promise give the loss of the plain form: a shared (B, *S) target, ref_err
    instead of ref_pred (any float dtype), mixed float dtypes, keyword arguments."""
    shared = torch.cat([T[:2], T[:2]])
    torch.testing.assert_close(fastpref.dpo_loss(M, R, T[:2], backend=backend),
                               fastpref.dpo_loss(M, R, shared, backend="torch"), rtol=1e-5, atol=1e-6)  # fmt: skip
    ref_err = ((R - T) ** 2).mean(dim=(1, 2)).double()
    torch.testing.assert_close(fastpref.dpo_loss(M, target=T, ref_err=ref_err, backend=backend).double(),
                               fastpref.dpo_loss(M.double(), R.double(), T.double(), backend="torch"),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    mixed = fastpref.dmpo_loss(M.bfloat16(), R.half(), T, backend=backend)
    upcast = fastpref.dmpo_loss(M.bfloat16().double(), R.half().double(), T.double(), backend="torch")
    assert mixed.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(mixed.double(), upcast, rtol=1e-5, atol=1e-6)


# ---- the rest of the family: MaPO, ORPO, DRO, KTO ------------------------------------------------------

Y = torch.tensor([1, 0, 1, 1])

FAMILY_BAD_CALLS = [
    ("mapo odd batch", lambda: fastpref.mapo_loss(M[:3], T[:3]), ValueError, "model_pred"),
    ("mapo target shape", lambda: fastpref.mapo_loss(M, T[:, :2]), ValueError, "target"),
    ("mapo beta", lambda: fastpref.mapo_loss(M, T, beta=0.0), ValueError, "beta"),
    ("mapo snr", lambda: fastpref.mapo_loss(M, T, snr_value=-1.0), ValueError, "snr_value"),
    ("mapo timesteps", lambda: fastpref.mapo_loss(M, T, num_train_timesteps="1000"), TypeError, "num_train_timesteps"),
    ("mapo reduction", lambda: fastpref.mapo_loss(M, T, reduction="avg"), ValueError, "reduction"),
    ("mapo backend", lambda: fastpref.mapo_loss(M, T, backend="tpu"), ValueError, "backend"),
    ("orpo lambda", lambda: fastpref.orpo_loss(M, T, lambda_orpo=-1.0), ValueError, "lambda_orpo"),
    ("orpo beta", lambda: fastpref.orpo_loss(M, T, beta=float("nan")), ValueError, "beta"),
    ("orpo integer", lambda: fastpref.orpo_loss(M.long(), T), TypeError, "model_pred"),
    ("orpo group without weights", lambda: fastpref.orpo_loss(M, T, group=object()), ValueError, "group"),
    ("dro no ref", lambda: fastpref.dro_loss(M, None, T), TypeError, "ref_pred"),
    ("dro margin", lambda: fastpref.dro_loss(M, R, T, margin=-0.1), ValueError, "margin"),
    ("dro ref grad", lambda: fastpref.dro_loss(M, R.clone().requires_grad_(True), T), ValueError, "ref_pred"),
    ("kto labels shape", lambda: fastpref.kto_loss(M, R, T, Y[:3]), ValueError, "labels"),
    ("kto labels values", lambda: fastpref.kto_loss(M, R, T, torch.tensor([0, 1, 2, 1])), ValueError, "labels"),
    ("kto labels list", lambda: fastpref.kto_loss(M, R, T, [1, 0, 1, 1]), TypeError, "labels"),
    ("kto labels device", lambda: fastpref.kto_loss(M, R, T, Y.to("meta")), ValueError, "labels"),
    ("kto target shape", lambda: fastpref.kto_loss(M, R, T[:2], Y), ValueError, "target"),
    ("kto ref shape", lambda: fastpref.kto_loss(M, R[:3], T, Y), ValueError, "ref_pred"),
    ("kto both refs", lambda: fastpref.kto_loss(M, R, T, Y, ref_err=torch.ones(4)), TypeError, "ref_err"),
    ("kto ref_err shape", lambda: fastpref.kto_loss(M, None, T, Y, ref_err=torch.ones(3)), ValueError, "ref_err"),
    ("kto lambda", lambda: fastpref.kto_loss(M, R, T, Y, lambda_desirable=-1.0), ValueError, "lambda_desirable"),
    ("kto beta", lambda: fastpref.kto_loss(M, R, T, Y, beta=0), ValueError, "beta"),
    ("kto empty", lambda: fastpref.kto_loss(M[:0], R[:0], T[:0], Y[:0]), ValueError, "model_pred"),
    ("kto target grad", lambda: fastpref.kto_loss(M, R, T.clone().requires_grad_(True), Y), ValueError, "target"),
]  # fmt: skip


@pytest.mark.parametrize("desc,fn,exc,text", FAMILY_BAD_CALLS, ids=[c[0] for c in FAMILY_BAD_CALLS])
def test_family_bad_input_raises_clearly(desc, fn, exc, text):
    with pytest.raises(exc, match=text):
        fn()
