"""torch.compile and torch.library integration of the C++ op and of the Triton family's custom op
(fastpref/ops/library.py).

A training step that calls fastpref.dmpo_loss compiles with fullgraph=True (no graph break) and
gives the eager result; the op stays one node of the graph (fake implementation, autograd through
pair_loss_bwd); dynamic batch sizes do not recompile; autocast does not downcast the reduction;
torch.library.opcheck passes. Most tests use the aot_eager backend (dynamo + AOTAutograd: everything
the op contributes to compilation); one runs inductor end to end.
"""

import math

import pytest
import torch
from _pairs import LOSSES, make_pairs
from torch._dynamo.testing import CompileCounterWithBackend

import fastpref
from fastpref.ops import extension
from fastpref.ops.cpp import REDUCTION_IDS
from fastpref.ops.pair_loss import LOSS_IDS

requires_cpp = pytest.mark.skipif(
    not extension.available(), reason=f"the C++ extension could not be built: {extension.unavailable_reason()}"
)


def _loss_fn(loss):
    if loss == "dmpo":
        return lambda *a, **kw: fastpref.dmpo_loss(*a, alpha=0.05, **kw)
    return lambda *a, **kw: fastpref.dpo_loss(*a, kind=loss, **kw)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.GELU(), torch.nn.Linear(16, 7))


def _batch(num_pairs, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * num_pairs, 4, 5, 7, generator=g)
    ref_pred = torch.randn(2 * num_pairs, 4, 5, 7, generator=g)
    target = torch.randn(num_pairs, 4, 5, 7, generator=g)  # shared by each pair
    return x, ref_pred, target


def _grads_after(fn, model, *args):
    model.zero_grad()
    out = fn(*args)
    out.backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@requires_cpp
@pytest.mark.parametrize("loss,backend", [(loss, "cpu") for loss in LOSSES] + [("dmpo", "auto")])
def test_training_step_compiles_without_graph_break(loss, backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # so "auto" means the C++ op on this CPU
    model, loss_fn = _model(), _loss_fn(loss)

    def step(x, ref_pred, target):
        return loss_fn(model(x), ref_pred, target, beta=40.0, backend=backend)

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)  # fullgraph: a graph break raises
    batch = _batch(3)
    out_c, grads_c = _grads_after(compiled, model, *batch)
    out_e, grads_e = _grads_after(step, model, *batch)
    assert counter.frame_count == 1
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)

    # the op is one node of the captured graph (not the reference traced op by op)
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend=record)(*batch)
    targets = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    op = torch.ops.fastpref.pair_loss_fwd
    assert {op, op.default} & targets, targets


@pytest.mark.parametrize("loss", ["sigmoid", "dmpo"])
def test_triton_path_compiles_without_graph_break(loss, device):
    """The Triton family is a custom op too (kernels opaque to the compiler; on this CPU they run in
    the interpreter): fullgraph compile, same loss and gradients as eager, bit for bit."""
    model, loss_fn = _model().to(device), _loss_fn(loss)

    def step(x, ref_pred, target):
        return loss_fn(model(x), ref_pred, target, beta=40.0, backend="triton")

    counter = CompileCounterWithBackend("aot_eager")
    batch = [t.to(device) for t in _batch(2)]
    out_c, grads_c = _grads_after(torch.compile(step, fullgraph=True, backend=counter), model, *batch)
    out_e, grads_e = _grads_after(step, model, *batch)
    assert counter.frame_count == 1  # one graph: fullgraph=True and no recompilation
    assert torch.equal(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@requires_cpp
def test_inductor_compiled_loss_equals_eager():
    """inductor end to end (the default backend): the loss, its statistics and the gradient."""

    def loss_and_stats(model_pred, ref_pred, target):
        loss, stats = fastpref.dmpo_loss(model_pred, ref_pred, target, beta=40.0, return_stats=True, backend="cpu")
        return loss, stats.implicit_accuracy, stats.margin

    model_pred, ref_pred, target, beta = make_pairs(3, (4, 5, 7), torch.float32, "cpu", shared=True, seed=5)
    results = []
    for fn in (torch.compile(loss_and_stats, fullgraph=True), loss_and_stats):
        m = model_pred.clone().requires_grad_(True)
        outs = fn(m, ref_pred, target)
        outs[0].backward()
        results.append((*outs, m.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@requires_cpp
def test_dynamic_batch_size_does_not_recompile():
    model = _model()

    def step(x, ref_pred, target):
        return fastpref.dmpo_loss(model(x), ref_pred, target, beta=40.0, reduction="none", backend="cpu")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    compiles = []
    for num_pairs in (3, 6, 9):  # no B or 2B equal to a sample dim (4, 5, 7): duck sizing would guard on it
        batch = _batch(num_pairs, seed=num_pairs)
        got = compiled(*batch)
        compiles.append(counter.frame_count)
        assert got.shape == (num_pairs,)
        torch.testing.assert_close(got, step(*batch), rtol=1e-6, atol=1e-7)
    assert compiles[0] >= 1 and compiles[1:] == [compiles[0]] * 2, compiles  # compiled once, then reused


@requires_cpp
def test_autocast_region_keeps_fp32_reduction_compiled():
    """Under autocast the model's Linear runs in bf16; the loss still reduces in fp32, compiled or not."""
    model = _model()

    def step(x, ref_pred, target):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(x)
            return pred.dtype, fastpref.dmpo_loss(pred, ref_pred, target, beta=40.0, backend="cpu")

    batch = _batch(2)
    pred_dtype, eager = step(*batch)
    _, compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*batch)
    assert pred_dtype == torch.bfloat16
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def _opcheck_cases():
    cases = []
    for loss in LOSSES:
        cases.append((loss, torch.float32, "ref_pred", "mean"))
    cases += [
        ("dmpo", torch.bfloat16, "shared", "none"),
        ("sigmoid", torch.float64, "ref_err", "sum"),
        ("hinge", torch.float16, "shared+ref_err", "none"),
    ]
    return cases


@requires_cpp
@pytest.mark.parametrize("loss,dtype,form,reduction", _opcheck_cases(), ids=str)
def test_opcheck(loss, dtype, form, reduction):
    """Schema, fake implementation, autograd registration and AOT dispatch (static and dynamic)."""
    model_pred, ref_pred, target, beta = make_pairs(3, (2, 5), dtype, "cpu", shared="shared" in form, seed=3)
    ref_err = None
    if "ref_err" in form:
        ref_err = fastpref.reference.pair_errors(ref_pred, target)
        ref_pred = None
    args = (model_pred.requires_grad_(True), ref_pred, target, ref_err, LOSS_IDS[loss], beta, -0.05, -3.0,
            REDUCTION_IDS[reduction])  # fmt: skip
    torch.library.opcheck(torch.ops.fastpref.pair_loss_fwd.default, args)

    out, _, _, dl_de = torch.ops.fastpref.pair_loss_fwd(*args)
    grad_out = torch.rand_like(out)
    torch.library.opcheck(torch.ops.fastpref.pair_loss_bwd.default,
                          (grad_out, model_pred.detach(), target, dl_de, REDUCTION_IDS[reduction]))  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_triton_op(reduction, device):
    model_pred, ref_pred, target, beta = make_pairs(2, (3, 5), torch.float32, device, shared=True, seed=4)
    c0, c1 = math.log1p(-0.05), math.log(0.05)  # dmpo's constants at α = 0.05
    args = (model_pred.requires_grad_(True), ref_pred, target, None, None, "dmpo", beta, c0, c1, reduction)
    torch.library.opcheck(torch.ops.fastpref.triton_pair_loss_fwd.default, args)
