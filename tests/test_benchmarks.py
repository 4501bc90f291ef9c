"""Smoke test of the benchmark suite: the sweep runs a tiny preset through the harness and every row
it writes is well-formed. Speed itself is measured by `make bench`, never asserted here."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from benchmarks import harness, sweep

NUMERIC = (
    "elements", "bytes_moved", "ms_median", "ms_p20", "ms_p80", "reps", "gbps", "pct_copy_bw",
    "cpu_ms_median", "copy_gbps", "launch_us", "floor_ms", "x_floor", "speedup_vs_eager", "peak_mem_mb",
)  # fmt: skip


def test_bytes_moved_counts_each_tensor_once():
    d = 4 * 8 * 8
    full = harness.Case("tiny", 2)  # N = 4·d fp32 elements
    assert full.bytes_moved("forward") == 3 * 4 * d * 4  # model, ref, target
    assert full.bytes_moved("backward") == 3 * 4 * d * 4  # model, target in; grad out
    lean = harness.Case("tiny", 2, "bf16", "shared", "ref_err")
    assert lean.bytes_moved("forward") == int(1.5 * 4 * d * 2)  # model + half a target
    assert lean.bytes_moved("full") == int((1.5 + 2.5) * 4 * d * 2)


def test_case_rejects_unknown_settings():
    with pytest.raises(ValueError, match="shape"):
        harness.Case("sd9", 1)
    with pytest.raises(ValueError, match="target"):
        harness.Case("tiny", 1, target="half")


def test_providers_never_time_the_triton_interpreter():
    # tests run with TRITON_INTERPRET=1 on a CPU: the interpreter is a correctness tool
    providers, skipped = harness.discover_providers(torch.device("cpu"), only=("torch", "fastpref-triton"))
    assert [p.name for p in providers] == ["torch"]
    assert "interpreter" in skipped["fastpref-triton"]


def test_smoke_sweep_writes_well_formed_rows(tmp_path):
    result = sweep.run(
        "smoke", device="cpu", providers=("torch",), out=tmp_path / "smoke", copy_mib=16, log=lambda *_: None
    )
    rows, facts = result["rows"], result["facts"]
    cases = sweep.preset_cases("smoke")
    assert len([r for r in rows if r["op"] == "pair_loss"]) == len(cases) * len(harness.MODES)
    # fastpref.rpo_loss exists: the RPO rows are there, one per M and mode
    rpo_rows = [r for r in rows if r["op"] == "rpo"]
    assert "rpo" not in result["skipped"], result["skipped"]
    assert len(rpo_rows) == len(sweep.PRESET_RPO["smoke"]) * len(harness.MODES) > 0
    assert facts.copy_gbps > 0 and facts.launch_us > 0
    for r in rows:
        assert set(r) == set(harness.COLUMNS)
        assert r["device_name"] == facts.name and r["torch"] == torch.__version__
        for col in NUMERIC:
            assert math.isfinite(r[col]) and r[col] >= 0, (col, r[col])
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["ms_median"] / 1e6)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / facts.copy_gbps)
        floor_ms = max(facts.launch_us / 1e3, r["bytes_moved"] / (facts.copy_gbps * 1e6))
        assert r["floor_ms"] == pytest.approx(floor_ms) and r["x_floor"] == pytest.approx(r["ms_median"] / floor_ms)
        assert r["speedup_vs_eager"] == pytest.approx(1.0)  # the eager provider against itself
        assert r["rel_err_vs_eager"] == 0.0

    with open(result["paths"]["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == harness.COLUMNS
        back = list(reader)
    assert len(back) == len(rows)
    assert float(back[0]["ms_median"]) == pytest.approx(rows[0]["ms_median"], rel=1e-5)
    md = result["paths"]["md"].read_text()
    assert facts.name in md and "benchmarks.sweep" in md and "| torch |" in md
    assert result["paths"]["png"].stat().st_size > 1000
