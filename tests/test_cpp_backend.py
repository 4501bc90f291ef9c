"""What only the C++/CUDA op (csrc/, backend="cpu"/"cuda") can get wrong: fp64 accumulation (gradcheck),
mixed input dtypes, 1 vs 2 threads bit-identical across its fixed S-chunks, direct op calls, the build
and its fallback, and the CUDA sources.

The loss-by-loss matrix against the reference (dtypes, shapes, layouts, reductions, extreme values,
NaN, the independent checks) runs on backend="cpu" in test_losses.py. The extension builds once per
machine (~45 s, cached under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _pairs import CPP_LOSSES, DTYPES, LOSSES, REF_FREE, call, check_against_reference, inputs, make_pairs
from test_losses import LAYOUTS, _layout
from test_validation import BAD_CALLS

import fastpref
from fastpref import reference
from fastpref.ops import extension
from fastpref.ops.family import REDUCTION_IDS

pytestmark = pytest.mark.skipif(
    not extension.available(), reason=f"the C++ extension could not be built: {extension.unavailable_reason()}"
)

CPU = torch.device("cpu")
CHUNK = 8192  # csrc/cpu/pair_loss_cpu.cpp kChunk: one task's share of S


# one pair; odd/prime; several S-chunks with a ragged last one
SHAPES = [(1, (3, 5, 7)), (3, (4, 13, 17)), (2, (3, CHUNK + 17))]


def test_mixed_input_dtypes_are_promoted():
    """bf16 model_pred, fp16 ref_pred, fp32 target: computed like the reference (fp32), the
    gradient comes back in model_pred's dtype."""
    model_pred, ref_pred, target, beta = make_pairs(2, (5, 6), torch.float32, CPU)
    m = model_pred.bfloat16().requires_grad_(True)
    out = fastpref.dmpo_loss(m, ref_pred.half(), target, beta=beta, backend="cpu")  # α = 0.01
    out.backward()
    m64 = m.detach().double().requires_grad_(True)
    out64 = reference.pair_loss_ref("dmpo", m64, ref_pred.half().double(), target.double(), beta=beta, alpha=0.01)[0]
    out64.backward()
    assert m.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-2, atol=1e-6)  # bf16 storage of the gradient


PARAMS64 = {"mapo": dict(num_train_timesteps=5.0), "orpo": dict(beta=2.0), "dro": dict(margin=0.05)}


@pytest.mark.parametrize("loss", CPP_LOSSES)
@pytest.mark.parametrize("form", ["ref_pred", "shared", "ref_err"])
def test_gradcheck_fp64(loss, form):
    """fp64 in, fp64 accumulation and outputs: the op's analytic gradient against finite differences,
    and its value equal to the fp64 reference to 1e-12."""
    if form == "ref_err" and loss in REF_FREE:
        pytest.skip("reference-free")
    g = torch.Generator().manual_seed(2)
    model_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_pred = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
    target = torch.randn(3 if form == "shared" else 6, 3, 5, dtype=torch.float64, generator=g)
    ref_err = reference.pair_errors(ref_pred, target) if form == "ref_err" else None
    ref_pred = None if form == "ref_err" else ref_pred
    p = PARAMS64.get(loss, dict(beta=3.0))

    def f(m, backend="cpu"):
        return call(loss, m, ref_pred, target, ref_err=ref_err, reduction="none", backend=backend, **p)

    assert f(model_pred).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (model_pred,))
    torch.testing.assert_close(f(model_pred), f(model_pred, "torch"), rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("big", [False, True], ids=["cached_stores", "streaming_stores"])
def test_bf16_gradient_rounds_to_nearest_even_like_torch(big, one_torch_thread):
    """The bf16 gradient is c·(model − target) computed in fp32 and rounded once, to nearest, ties to
    even, NaN kept — bit for bit what ``.to(torch.bfloat16)`` gives. c = 1 exactly (sum reduction,
    D = 64 per row → coef 2/64, dl_de = 32), and every difference is an exact tie between two bf16
    values (2^e·(1 + k/128 + 1/256)), so truncation, ties away from zero and a permuted pack all
    differ from it. ``big``: a ≥ 32 MiB gradient, written with streaming stores."""
    g = torch.Generator().manual_seed(64)
    rows, D = (2 * 131_072 if big else 2 * 5), 64  # 2·131072·64 bf16 = 32 MiB
    k = torch.randint(0, 128, (rows, D), generator=g).double()
    e = torch.randint(-12, 12, (rows, D), generator=g).double()
    sign = torch.randint(0, 2, (rows, D), generator=g).double() * 2 - 1
    model = (sign * 2**e * (1 + k / 128)).to(torch.bfloat16)
    target = (-sign * 2 ** (e - 8)).to(torch.bfloat16)
    model[0, 3] = model[1, 17] = float("nan")
    diff = model.float() - target.float()
    finite = ~diff.isnan()
    assert torch.equal(diff.double()[finite], (sign * 2**e * (1 + k / 128 + 1 / 256))[finite])  # exact ties
    want = diff.to(torch.bfloat16)
    assert torch.all(want.double()[finite] != diff.double()[finite])  # so every finite element rounds
    dl_de = torch.full((rows,), 32.0)
    got = torch.ops.fastpref.pair_loss_bwd(torch.ones(()), model, target, dl_de, REDUCTION_IDS["sum"])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 2
    ok = ~want.isnan()
    assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16))


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


def test_no_compiler_end_to_end(tmp_path):
    """The real thing, in a fresh process: CXX points nowhere and the cache is empty → one warning
    naming the compiler, and "auto" computes the reference's result."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               TRITON_INTERPRET="0")  # fmt: skip
    code = (
        "import warnings, torch, fastpref\n"
        "from fastpref import reference\n"
        "m, r, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.randn(2, 3, 5)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    outs = [fastpref.dmpo_loss(m, r, t, beta=3.0) for _ in range(2)]\n"
        "msgs = [str(x.message) for x in w if 'fastpref' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'no-such-c++' in msgs[0], msgs\n"
        "expected = reference.pair_loss_ref('dmpo', m, r, t, beta=3.0, alpha=0.01)[0]\n"
        "assert all(torch.equal(o, expected) for o in outs)\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# The rest of the kernel family in C++: DRO, MaPO, ORPO (kto's unpaired rows stay on Triton/torch).
# ----------------------------------------------------------------------------------------------

def test_cpp_losses_are_the_kernel_family_less_kto():
    from fastpref.ops.cpp import CPP_LOSSES
    from fastpref.ops.pair_loss import LOSS_IDS, UNPAIRED_LOSSES

    assert set(CPP_LOSSES) == set(LOSS_IDS) - set(UNPAIRED_LOSSES)


def test_kto_has_no_cpp_backend_and_auto_uses_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model_pred, ref_pred, target, labels = inputs("kto", 2, (3, 4), torch.float32, CPU)
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
def test_cuda_matches_reference(loss, dtype, num_pairs, sample_shape):
    model_pred, ref_pred, target, _ = make_pairs(num_pairs, sample_shape, dtype, "cuda")
    check_against_reference(loss, "cuda", model_pred, ref_pred, target)


@requires_cuda_backend
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", LAYOUTS)
def test_cuda_layouts_and_agreement_with_triton(loss, case):
    model_pred, ref_pred, target, beta = make_pairs(3, (2, 7, 11), torch.bfloat16, "cuda", shared="shared" in case)
    model_pred, ref_pred, target, ref_err = _layout(case, model_pred, ref_pred, target)
    check_against_reference(loss, "cuda", model_pred, ref_pred, target, ref_err=ref_err)
    ref_pred = None if ref_err is not None else ref_pred
    outs = [call(loss, model_pred, ref_pred, target, ref_err=ref_err, beta=beta, reduction="none", backend=b)
            for b in ("cuda", "triton")]  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
