"""fastpref without the triton package (macOS, Windows, a Linux box without it): ``import fastpref``
and every loss with ``backend="auto"`` work — the C++ op where it builds, else the reference.

Each check runs in a fresh interpreter whose import system refuses ``triton`` (a meta-path finder
that raises ImportError, as a missing package does), so the triton this machine has cannot leak in.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TRITON = """
import importlib.abc, sys

class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTriton())
"""


def run_without_triton(body: str, *, interpret: str = "0") -> dict:
    """Run ``body`` (which sets ``result``, a JSON-able dict) with triton blocked; return ``result``."""
    code = BLOCK_TRITON + textwrap.dedent(body) + "\nprint('RESULT=' + json.dumps(result))\n"
    env = {**os.environ, "TRITON_INTERPRET": interpret, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT="))
    return json.loads(line[len("RESULT="):])


def test_the_blocker_blocks():
    result = run_without_triton("""
        try:
            import triton  # noqa: F401
            result = {"imported": True}
        except ImportError:
            result = {"imported": False}
    """)
    assert result == {"imported": False}


# Every public loss with backend="auto" and backend="torch": same value, a finite gradient; the
# backend auto resolved to for the pair family ("cpu" where the C++ extension builds, else "torch").
EVERY_LOSS = """
import torch
import fastpref
from fastpref.losses import resolve_backend

g = torch.Generator().manual_seed(13)
B, S = 3, (4, 5)
m0 = torch.randn(2 * B, *S, generator=g)
ref = m0 + 0.1 * torch.randn(2 * B, *S, generator=g)
tgt = torch.randn(2 * B, *S, generator=g)
labels = torch.tensor([1, 0, 1, 1, 0, 0])
emb = torch.randn(B, 8, generator=g)

calls = {
    "dpo": lambda m, be: fastpref.dpo_loss(m, ref, tgt, beta=50.0, backend=be),
    "hinge": lambda m, be: fastpref.dpo_loss(m, ref, tgt, beta=50.0, kind="hinge", backend=be),
    "ipo": lambda m, be: fastpref.dpo_loss(m, ref, tgt, beta=0.1, kind="ipo", backend=be),
    "dmpo": lambda m, be: fastpref.dmpo_loss(m, ref, tgt, beta=50.0, backend=be),
    "dro": lambda m, be: fastpref.dro_loss(m, ref, tgt, backend=be),
    "mapo": lambda m, be: fastpref.mapo_loss(m, tgt, backend=be),
    "orpo": lambda m, be: fastpref.orpo_loss(m, tgt, beta=2.0, backend=be),
    "orrpo": lambda m, be: fastpref.orpo_loss(m, tgt, beta=2.0, win_emb=emb, lose_emb=emb, backend=be),
    "kto": lambda m, be: fastpref.kto_loss(m, ref, tgt, labels, beta=50.0, backend=be),
    "rpo": lambda m, be: fastpref.rpo_loss(m, ref, tgt, beta=50.0, win_emb=emb, lose_emb=emb, backend=be),
}
result = {"auto_backend": resolve_backend("auto", m0.device), "losses": {}}
for name, fn in calls.items():
    out = {}
    for be in ("auto", "torch"):
        m = m0.clone().requires_grad_(True)
        loss = fn(m, be)
        loss.backward()
        out[be] = (loss.item(), m.grad.abs().sum().item(), bool(torch.isfinite(m.grad).all()), str(loss.dtype))
    result["losses"][name] = out
try:
    fastpref.dpo_loss(m0, ref, tgt, backend="triton")
    result["explicit_triton"] = None
except ValueError as e:
    result["explicit_triton"] = str(e)
import fastpref.clip, fastpref.ops.cpp, fastpref.ops.distributed, fastpref.ops.extension, fastpref.ops.family
import fastpref.ops.library, fastpref.reference, fastpref.stats
result["triton_available"] = fastpref.ops.triton_available()
result["triton_loaded"] = any(k == "triton" or k.startswith("triton.") for k in sys.modules)
"""


@pytest.fixture(scope="module", params=["0", "1"], ids=["plain", "TRITON_INTERPRET=1"])
def no_triton_run(request):
    """One interpreter per setting; TRITON_INTERPRET=1 asks for the Triton interpreter, which without
    triton must fall back just the same."""
    return run_without_triton(EVERY_LOSS, interpret=request.param)


def test_import_fastpref_touches_no_triton(no_triton_run):
    assert no_triton_run["triton_loaded"] is False
    assert no_triton_run["triton_available"] is False


def test_every_loss_runs_on_auto_without_triton(no_triton_run):
    assert no_triton_run["auto_backend"] in ("cpu", "torch")
    losses = no_triton_run["losses"]
    assert len(losses) == 10
    for name, out in losses.items():
        (auto, gauto, finite, dt_auto), (ref, gref, _, dt_ref) = out["auto"], out["torch"]
        assert finite, name
        assert dt_auto == dt_ref == "torch.float32", (name, dt_auto, dt_ref)
        assert auto == pytest.approx(ref, rel=1e-4, abs=1e-6), name
        assert gauto == pytest.approx(gref, rel=1e-4, abs=1e-9), name
        assert gref > 0, name


def test_explicit_triton_backend_says_why_without_triton(no_triton_run):
    assert no_triton_run["explicit_triton"] is not None and "triton" in no_triton_run["explicit_triton"]
