"""``make bench-gpu-quick`` checked on a CPU: every step of the one-command GPU run but timing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_tables_without_diffusers_or_open_clip(tmp_path):
    # a fresh interpreter: the guard inside gpu_quick fails if importing the benchmarks pulled in
    # diffusers, open_clip, transformers, accelerate or peft (a bare GPU image has none of them)
    env = dict(os.environ, TRITON_INTERPRET="1")
    prefix = tmp_path / "gq"
    cmd = [sys.executable, "-m", "benchmarks.gpu_quick", "--dry-run", "--shapes", "sd15", "--pairs", "1", "--rpo", "8",
           "--providers", "torch,fastpref-triton", "--out", str(prefix)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = prefix.with_suffix(".md").read_text()
    assert "fastpref-triton" in table and "## rpo, full" in table, table[:2000]
    roof = Path(f"{prefix}-roofline.md").read_text()
    # the fused provider ran (interpreted) and has a row next to eager, and the model table is there
    assert "| sd15×1 bf16 | fastpref-triton |" in roof and "| sd15×1 bf16 | torch |" in roof, roof
    assert "splits (now)" in roof
    rows = (prefix.with_suffix(".csv")).read_text().splitlines()
    assert any(",fastpref-triton," in r and ",rpo," in r for r in rows), rows[:3]


def test_quick_preset_is_the_documented_subset():
    from benchmarks import sweep

    cases = sweep.preset_cases("gpu-quick")
    assert {(c.shape, c.pairs, c.dtype, c.target, c.ref) for c in cases} == {
        (s, b, "bf16", "full", "ref_pred") for s in ("sd15", "sdxl", "sd3") for b in (1, 8)
    } | {("sd15-odd", 8, "bf16", "full", "ref_pred")}
    assert sweep.PRESET_RPO["gpu-quick"] == (64, 1024)
