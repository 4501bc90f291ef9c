"""One output-dtype rule on every backend: the loss and its statistics are float64 when any input
tensor is float64, else float32 (fp16/bf16 inputs give an fp32 loss)."""

import pytest
import torch

import fastpref
from fastpref.losses import result_dtype
from fastpref.ops import extension

BACKENDS = ["torch", "triton"] + (["cpu"] if extension.has_kernel("cpu") else [])
EXPECTED = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
            torch.float16: torch.float32}  # fmt: skip


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    m, r, t = (torch.randn(4, 3, 5, generator=g).to(dtype) for _ in range(3))
    return m, r, t, torch.tensor([1, 0, 0, 1]), torch.randn(2, 6, generator=g)


CALLS = {
    "dpo": lambda m, r, t, y, e, be: fastpref.dpo_loss(m, r, t, beta=50.0, backend=be, return_stats=True),
    "dmpo": lambda m, r, t, y, e, be: fastpref.dmpo_loss(m, r, t, beta=50.0, backend=be, return_stats=True),
    "dro": lambda m, r, t, y, e, be: fastpref.dro_loss(m, r, t, backend=be, return_stats=True),
    "mapo": lambda m, r, t, y, e, be: fastpref.mapo_loss(m, t, backend=be, return_stats=True),
    "orpo": lambda m, r, t, y, e, be: fastpref.orpo_loss(m, t, beta=2.0, backend=be, return_stats=True),
    "kto": lambda m, r, t, y, e, be: fastpref.kto_loss(m, r, t, y, beta=50.0, backend=be, return_stats=True),
    "rpo": lambda m, r, t, y, e, be: fastpref.rpo_loss(m, r, t, beta=50.0, win_emb=e, lose_emb=e, backend=be,
                                                        return_stats=True),
}  # fmt: skip
NO_CPP = ("kto", "rpo")  # the C++ extension has no kernel for these


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", list(CALLS))
@pytest.mark.parametrize("dtype", list(EXPECTED), ids=str)
def test_loss_and_stats_dtype(loss, backend, dtype):
    if backend == "cpu" and loss in NO_CPP:
        pytest.skip(f"{loss} has no C++ kernel")
    m, r, t, y, e = _inputs(dtype, seed=7)
    m.requires_grad_(True)
    out, stats = CALLS[loss](m, r, t, y, e, backend)
    assert out.dtype == EXPECTED[dtype], (loss, backend, out.dtype)
    margin = stats.implicit_reward if loss == "kto" else stats.margin
    errors = stats.model_err if loss == "kto" else stats.model_err_win
    assert margin.dtype == errors.dtype == EXPECTED[dtype]
    out.backward()
    assert m.grad.dtype == dtype  # the gradient keeps the input's dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_fp64_input_makes_the_loss_fp64(backend):
    m, r, t, _, _ = _inputs(torch.float32, seed=8)
    out = fastpref.dpo_loss(m, r, t.double(), beta=50.0, backend=backend)
    assert out.dtype == torch.float64
    assert result_dtype(m, None, t.double()) == torch.float64
    assert result_dtype(m.half(), r.bfloat16()) == torch.float32
