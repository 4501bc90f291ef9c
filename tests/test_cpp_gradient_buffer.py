"""The C++ backward's gradient buffer: reused only when nothing references the previous gradient."""

import pytest
import torch

import fastpref
from fastpref.ops import extension

pytestmark = pytest.mark.skipif(not extension.available(), reason="the C++ extension did not build here")


def _grad(model, ref, target):
    model.grad = None
    fastpref.dmpo_loss(model, ref, target, beta=50.0, alpha=0.3, backend="cpu").backward()
    return model.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 4, 64, 64), (4, 16, 128, 256)], ids=["128KiB", "4MiB"])
def test_held_gradient_is_never_overwritten_and_a_freed_one_is_reused(dtype, shape, one_torch_thread):
    """Gradients of 128 KiB (bf16; 256 KiB fp32: the reuse threshold) and of 4 / 8 MiB."""
    g = torch.Generator().manual_seed(16)
    target = torch.randn(shape, generator=g).to(dtype)
    ref = (target.float() + torch.randn(shape, generator=g)).to(dtype)
    model_a = (ref.float() + 0.3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_(True)
    model_b = (ref.float() + 0.3 * torch.randn(shape, generator=g)).to(dtype).requires_grad_(True)
    want_a = _grad(model_a, ref, target).clone()
    want_b = _grad(model_b, ref, target).clone()

    held = _grad(model_a, ref, target)  # held by model_a.grad ...
    other = _grad(model_b, ref, target)  # ... so this one must not share its memory
    assert held.data_ptr() != other.data_ptr()
    torch.testing.assert_close(held, want_a, rtol=0, atol=0)
    torch.testing.assert_close(other, want_b, rtol=0, atol=0)

    ptr = other.data_ptr()
    del other
    model_b.grad = None  # the previous gradient is gone: its storage serves the next call
    again = _grad(model_b, ref, target)
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again, want_b, rtol=0, atol=0)
    torch.testing.assert_close(held, want_a, rtol=0, atol=0)  # still intact


@pytest.mark.parametrize("dtype,numel", [(torch.float32, 2_100_001), (torch.bfloat16, 4_200_001)], ids=str)
def test_gradient_above_the_cache_size_matches_the_reference(dtype, numel, one_torch_thread):
    """A ≥ 32 MiB gradient takes the streaming-store path; an odd D puts rows 1… off the 32-byte grid
    (scalar head, then aligned vector stores)."""
    g = torch.Generator().manual_seed(32)
    target = torch.randn((4, numel), generator=g).to(dtype)
    ref = (target.float() + torch.randn((4, numel), generator=g)).to(dtype)
    model = (ref.float() + 0.3 * torch.randn((4, numel), generator=g)).to(dtype).requires_grad_(True)
    assert model.numel() * model.element_size() >= 32 * 2**20
    got = _grad(model, ref, target).clone()
    model.grad = None
    fastpref.dmpo_loss(model, ref, target, beta=50.0, alpha=0.3, backend="torch").backward()
    torch.testing.assert_close(got, model.grad)
