"""The C++ CPU backend (csrc/cpu, backend="cpu") against the reference, and its build fallback.

The same matrix as the Triton tests (test_pair_loss.py: per-dtype flash-attention rule, odd shapes,
layouts, reductions, extreme margins), plus what only a threaded CPU implementation can get wrong:
1 vs 2 threads bit-identical, sizes spanning several of its fixed S-chunks. The extension builds once
per machine (~45 s, cached under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).
"""

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import test_loss_family as tlf
import test_pair_loss as tpl
import torch
from _pairs import DTYPES, LOSSES, make_pairs
from test_validation import BAD_CALLS

import fastpref
from fastpref import reference
from fastpref.ops import extension

pytestmark = pytest.mark.skipif(
    not extension.available(), reason=f"the C++ extension could not be built: {extension.unavailable_reason()}"
)

CPU = torch.device("cpu")
CHUNK = 8192  # csrc/cpu/pair_loss_cpu.cpp kChunk: one task's share of S


_call = tpl.call  # the public function for a loss name of the kernel family


@pytest.fixture
def cpp_call(monkeypatch):
    """tpl.check_against_reference (loss and gradient vs fp64 under the per-dtype rule), run on
    backend="cpu"."""
    monkeypatch.setattr(tpl, "call", functools.partial(_call, backend="cpu"))
    return tpl.check_against_reference

# one pair; odd/prime; several S-chunks with a ragged last one
SHAPES = [(1, (3, 5, 7)), (3, (4, 13, 17)), (2, (3, CHUNK + 17))]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_pairs,sample_shape", SHAPES, ids=["one_pair", "odd", "multi_chunk"])
def test_matches_reference(cpp_call, loss, dtype, num_pairs, sample_shape):
    model_pred, ref_pred, target, beta = make_pairs(num_pairs, sample_shape, dtype, CPU)
    cpp_call(loss, model_pred, ref_pred, target, beta=beta)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", tpl.LAYOUTS)
def test_layouts_and_input_forms(cpp_call, loss, dtype, case):
    model_pred, ref_pred, target, beta = make_pairs(3, (2, 7, 11), dtype, CPU, shared="shared" in case)
    model_pred, ref_pred, target, ref_err = tpl._layout(case, model_pred, ref_pred, target)
    cpp_call(loss, model_pred, ref_pred, target, ref_err=ref_err, beta=beta)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_upstream_weights(cpp_call, loss, reduction):
    model_pred, ref_pred, target, beta = make_pairs(5, (3, 9), torch.float32, CPU)
    cpp_call(loss, model_pred, ref_pred, target, beta=beta, reduction=reduction)


def test_mixed_input_dtypes_are_promoted():
    """bf16 model_pred, fp16 ref_pred, fp32 target: computed like the reference (fp32), the
    gradient comes back in model_pred's dtype."""
    model_pred, ref_pred, target, beta = make_pairs(2, (5, 6), torch.float32, CPU)
    m = model_pred.bfloat16().requires_grad_(True)
    out = fastpref.dmpo_loss(m, ref_pred.half(), target, beta=beta, backend="cpu")
    out.backward()
    m64 = m.detach().double().requires_grad_(True)
    out64 = reference.pair_loss_ref("dmpo", m64, ref_pred.half().double(), target.double(), beta=beta, alpha=0.01)[0]
    out64.backward()
    assert m.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-2, atol=1e-6)  # bf16 storage of the gradient


@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_margins_are_finite(loss):
    beta = 5000.0
    us = [-1e4, -50.0, 0.0, 50.0, 1e4]
    model_pred, target, ref_err = tpl._at_margin(us, beta, CPU)
    m = model_pred.requires_grad_(True)
    out, stats = _call(loss, m, None, target, ref_err=ref_err, beta=beta, reduction="none", return_stats=True,
                       backend="cpu")  # fmt: skip
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(m.grad).all()
    torch.testing.assert_close(stats.margin.double(), torch.tensor(us, dtype=torch.float64), rtol=1e-6, atol=1e-2)
    expected = reference.PAIR_LOSSES[loss](torch.tensor(us, dtype=torch.float64), beta, 0.01)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("form", ["ref_pred", "shared", "ref_err"])
def test_gradcheck_fp64(loss, form):
    """fp64 in, fp64 accumulation and outputs: the op's analytic gradient against finite differences."""
    g = torch.Generator().manual_seed(2)
    model_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
    target = torch.randn(3 if form == "shared" else 6, 3, 5, dtype=torch.float64, generator=g)
    ref_err = reference.pair_errors(ref_pred, target) if form == "ref_err" else None
    ref_pred = None if form == "ref_err" else ref_pred

    def f(m):
        return _call(loss, m, ref_pred, target, ref_err=ref_err, beta=3.0, reduction="none", backend="cpu")

    assert f(model_pred).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (model_pred,))
    expected = reference.pair_loss_ref(loss, model_pred, ref_pred, target, ref_err=ref_err, beta=3.0, alpha=0.01,
                                       reduction="none")[0]  # fmt: skip
    torch.testing.assert_close(f(model_pred), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["full_target", "shared_target"])
def test_one_and_two_threads_bit_identical(dtype, shared):
    """Enough work (4 pairs × 6 chunks) that at::parallel_for splits it over 2 threads."""
    model_pred, ref_pred, target, beta = make_pairs(4, (5 * CHUNK + 123,), dtype, CPU, shared=shared)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = model_pred.clone().requires_grad_(True)
            out, stats = fastpref.dmpo_loss(m, ref_pred, target, beta=beta, return_stats=True, backend="cpu")
            out.backward()
            results[threads] = (out.detach(), stats.margin, stats.model_err_win, stats.ref_err_lose, m.grad)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [fastpref.dpo_loss, fastpref.dmpo_loss], ids=["dpo", "dmpo"])
@pytest.mark.parametrize("desc,kwargs,exc,text", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_like_the_front_end(fn, desc, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        fn(**{"backend": "cpu", **kwargs})


def test_backend_on_the_wrong_device_raises():
    model_pred, ref_pred, target, _ = make_pairs(1, (4,), torch.float32, CPU)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastpref.dpo_loss(model_pred, ref_pred, target, backend="cuda")
    meta = [t.to("meta") for t in (model_pred, ref_pred, target)]
    with pytest.raises(ValueError, match="backend='cpu'"):
        fastpref.dpo_loss(*meta, backend="cpu")


def test_op_checks_direct_calls():
    """torch.ops.fastpref.* called without the front end still refuses bad ids and shapes."""
    model_pred, ref_pred, target, _ = make_pairs(1, (4,), torch.float32, CPU)
    op = torch.ops.fastpref.pair_loss_fwd
    for bad_id in (99, 7):  # 7: kto, not in csrc
        with pytest.raises(RuntimeError, match=f"loss id {bad_id} is not implemented here"):
            op(model_pred, ref_pred, target, None, bad_id, 1.0, 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="exactly one of ref_pred or ref_err"):
        op(model_pred, None, target, None, 0, 1.0, 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="target must have model_pred's dtype"):
        op(model_pred, ref_pred, target.double(), None, 0, 1.0, 0.0, 0.0, 1)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("where", ["model_pred", "ref_pred", "target", "ref_err"])
def test_nan_is_never_hidden(loss, where):
    model_pred, ref_pred, target, beta = make_pairs(2, (3, 4), torch.float32, CPU)
    ref_err = reference.pair_errors(ref_pred, target) if where == "ref_err" else None
    tensors = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target, "ref_err": ref_err}
    tensors[where] = tensors[where].clone()
    tensors[where].view(-1)[1] = float("nan")
    if ref_err is not None:
        tensors["ref_pred"] = None
    out = _call(loss, tensors["model_pred"], tensors["ref_pred"], tensors["target"], ref_err=tensors["ref_err"],
                beta=beta, reduction="none", backend="cpu")  # fmt: skip
    assert torch.isnan(out).any().item(), f"NaN in {where} was hidden: {out}"


def test_autocast_does_not_downcast_the_reduction():
    model_pred, ref_pred, target, beta = make_pairs(2, (4, 6), torch.float32, CPU)
    expected = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend="cpu")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend="cpu")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_auto_picks_cpp_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model_pred, ref_pred, target, beta = make_pairs(2, (3, 5), torch.float32, CPU)
    auto = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend="auto")
    cpp = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend="cpu")
    assert torch.equal(auto, cpp)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter asked for explicitly: Triton
    from fastpref.losses import resolve_backend

    assert resolve_backend("auto", CPU) == "triton"


def test_no_compiler_falls_back_to_reference_with_one_warning(monkeypatch):
    """A failed build (here: a compiler that is not there) → one RuntimeWarning, auto uses the
    reference, and an explicit backend='cpu' says why it cannot run."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(extension, "_state", None)

    def no_compiler(with_cuda):
        raise RuntimeError("Error building extension 'fastpref_C': c++: command not found")

    monkeypatch.setattr(extension, "build", no_compiler)
    model_pred, ref_pred, target, beta = make_pairs(2, (3, 5), torch.float32, CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falls back to the PyTorch reference" in messages[0], messages
    assert "command not found" in messages[0]
    expected = reference.pair_loss_ref("dmpo", model_pred, ref_pred, target, beta=beta, alpha=0.01)[0]
    for out in outs:
        assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="command not found"):
        fastpref.dmpo_loss(model_pred, ref_pred, target, beta=beta, backend="cpu")


# ----------------------------------------------------------------------------------------------
# The rest of the kernel family in C++: DRO, MaPO, ORPO (kto's unpaired rows stay on Triton/torch).
# ----------------------------------------------------------------------------------------------

CPP_FAMILY = ("dro", "mapo", "orpo")


@pytest.fixture
def family_call(monkeypatch):
    """test_loss_family.check_against_reference on backend="cpu"."""
    monkeypatch.setattr(tlf, "call", functools.partial(tlf.call, backend="cpu"))
    return tlf.check_against_reference


def test_cpp_losses_are_the_kernel_family_less_kto():
    from fastpref.ops.cpp import CPP_LOSSES
    from fastpref.ops.pair_loss import LOSS_IDS, UNPAIRED_LOSSES

    assert set(CPP_LOSSES) == set(LOSS_IDS) - set(UNPAIRED_LOSSES)


@pytest.mark.parametrize("loss", CPP_FAMILY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_pairs,sample_shape", SHAPES, ids=["one_pair", "odd", "multi_chunk"])
def test_family_matches_reference(family_call, loss, dtype, num_pairs, sample_shape):
    model_pred, ref_pred, target, _ = tlf.inputs(loss, num_pairs, sample_shape, dtype, CPU)
    family_call(loss, model_pred, ref_pred, target)


@pytest.mark.parametrize("loss", CPP_FAMILY)
@pytest.mark.parametrize("case", ["shared", "transposed", "ref_err"])
def test_family_layouts_and_reductions(family_call, loss, case):
    model_pred, ref_pred, target, _ = tlf.inputs(loss, 3, (2, 7, 11), torch.bfloat16, CPU, shared=case == "shared")
    ref_err = None
    if case == "transposed":
        model_pred, ref_pred, target = (x.transpose(-1, -2).contiguous().transpose(-1, -2)
                                        for x in (model_pred, ref_pred, target))  # fmt: skip
    if case == "ref_err" and loss == "dro":
        ref_err = reference.pair_errors(ref_pred, target)
    for reduction in ("mean", "none"):
        family_call(loss, model_pred, ref_pred, target, ref_err=ref_err, reduction=reduction)


@pytest.mark.parametrize("loss", CPP_FAMILY)
def test_family_extreme_values_are_finite(loss):
    model_pred, target = tlf._preds_with_errors([0.0, 1e-8, 1e-3, 1.0, 1e2, 1e4], CPU)
    ref_err = torch.tensor([1e4, 1e2, 1.0, 1e-3, 1e-8, 0.0])
    kw = {"mapo": dict(num_train_timesteps=1e6), "orpo": dict(beta=1e5, lambda_orpo=1.0), "dro": dict(margin=0.5)}
    outs = []
    for backend in ("cpu", "torch"):
        m = model_pred.clone().requires_grad_(True)
        out = tlf.call(loss, m, None, target, ref_err=ref_err, backend=backend, reduction="none", **kw[loss])
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(m.grad).all(), (backend, out, m.grad)
        outs.append(out.double())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", CPP_FAMILY)
def test_family_gradcheck_fp64(loss):
    g = torch.Generator().manual_seed(3)
    model_pred = torch.randn(4, 3, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    ref_pred = torch.randn(4, 3, 5, dtype=torch.float64, generator=g)
    target = torch.randn(4, 3, 5, dtype=torch.float64, generator=g)
    f = {
        "mapo": lambda m: fastpref.mapo_loss(m, target, num_train_timesteps=5.0, reduction="none", backend="cpu"),
        "orpo": lambda m: fastpref.orpo_loss(m, target, beta=2.0, reduction="none", backend="cpu"),
        "dro": lambda m: fastpref.dro_loss(m, ref_pred, target, margin=0.05, reduction="none", backend="cpu"),
    }[loss]
    assert f(model_pred).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (model_pred,))


def test_kto_has_no_cpp_backend_and_auto_uses_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model_pred, ref_pred, target, labels = tlf.inputs("kto", 2, (3, 4), torch.float32, CPU)
    with pytest.raises(ValueError, match="kto_loss has no 'cpu' backend"):
        fastpref.kto_loss(model_pred, ref_pred, target, labels, backend="cpu")
    auto = fastpref.kto_loss(model_pred, ref_pred, target, labels, backend="auto")
    assert torch.equal(auto, fastpref.kto_loss(model_pred, ref_pred, target, labels, backend="torch"))


# ----------------------------------------------------------------------------------------------
# csrc/cuda: compiled here when a CUDA toolkit is present; run where a GPU is.
# ----------------------------------------------------------------------------------------------


def _cuda_home():
    from torch.utils import cpp_extension

    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", cpp_extension.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return home
    return None


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is a CPU-only build: no CUDA extension can build")
@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_sources_compile_for_sm90():
    """csrc/cuda builds (nvcc, sm_90), links with the CPU sources and registers CUDA kernels for both
    ops — on a machine with no GPU. First run ~2–5 min on 2 cores, then cached like the CPU build."""
    env = dict(os.environ, CUDA_HOME=_cuda_home(), TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    code = (
        "import torch\n"
        "from fastpref.ops import extension\n"
        "extension.build(with_cuda=True)\n"
        "for op in ('pair_loss_fwd', 'pair_loss_bwd'):\n"
        "    for key in ('CPU', 'CUDA'):\n"
        "        assert torch._C._dispatch_has_kernel_for_dispatch_key('fastpref::' + op, key), (op, key)\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


requires_cuda_backend = pytest.mark.skipif(
    not torch.cuda.is_available() or not extension.has_kernel("cuda"),
    reason="needs a CUDA GPU and the CUDA extension; none on this machine",
)


@requires_cuda_backend
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_pairs,sample_shape", SHAPES + [(2, (4, 64, 64)), (16, (5, 33, 31))],
                         ids=["one_pair", "odd", "multi_chunk", "vectorised", "many_pairs_odd"])  # fmt: skip
def test_cuda_matches_reference(monkeypatch, loss, dtype, num_pairs, sample_shape):
    monkeypatch.setattr(tpl, "call", functools.partial(_call, backend="cuda"))
    model_pred, ref_pred, target, beta = make_pairs(num_pairs, sample_shape, dtype, "cuda")
    tpl.check_against_reference(loss, model_pred, ref_pred, target, beta=beta)


@requires_cuda_backend
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", tpl.LAYOUTS)
def test_cuda_layouts_and_agreement_with_triton(monkeypatch, loss, case):
    monkeypatch.setattr(tpl, "call", functools.partial(_call, backend="cuda"))
    model_pred, ref_pred, target, beta = make_pairs(3, (2, 7, 11), torch.bfloat16, "cuda", shared="shared" in case)
    model_pred, ref_pred, target, ref_err = tpl._layout(case, model_pred, ref_pred, target)
    tpl.check_against_reference(loss, model_pred, ref_pred, target, ref_err=ref_err, beta=beta)
    outs = [_call(loss, model_pred, ref_pred, target, ref_err=ref_err, beta=beta, reduction="none", backend=b)
            for b in ("cuda", "triton")]  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
