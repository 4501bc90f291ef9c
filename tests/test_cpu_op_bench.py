"""benchmarks/cpu_op.py, the C++ op against the copy and torch.compile: the rounds interleave
providers and thread counts, and the tables say what was measured. Speed itself is never asserted."""

import pytest
import torch

from benchmarks import cpu_op
from fastpref.ops import extension

pytestmark = pytest.mark.skipif(not extension.available(), reason="the C++ extension did not build here")


@pytest.fixture
def eager_compile(monkeypatch, one_torch_thread):
    """torch.compile as the identity: the harness is under test, not Inductor (and it keeps this fast)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def test_rounds_interleave_thread_counts(eager_compile, monkeypatch):
    seen = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), set_threads(n)))
    rows = cpu_op.run_case("tiny", "fp32", rounds=3, log=lambda line: None, threads=(1, 2))
    assert seen == [1, 2] + [1, 2] * 3  # the warm-up of each count, then every round visits each count
    assert [r["threads"] for r in rows] == [1, 2]
    (shape, pairs) = cpu_op.SHAPES["tiny"]
    numel = 2 * pairs * torch.Size(shape).numel()
    for r in rows:
        assert r["MiB"] == pytest.approx(6 * numel * 4 / 2**20)  # 6N·s bytes, fp32
        assert all(r[f"{k} ms"] > 0 and r[f"{k} cpu ms"] >= 0 for k in ("copy", "compile", "fastpref"))
        assert r["vs compile"] == pytest.approx(r["compile ms"] / r["fastpref ms"])
        assert r["% copy BW"] == pytest.approx(100 * r["copy ms"] / r["fastpref ms"])
    (scale,) = cpu_op.scaling(rows)
    assert scale["threads"] == "1 → 2"
    for k in ("copy", "compile", "fastpref"):
        assert scale[k] == pytest.approx(rows[0][f"{k} ms"] / rows[1][f"{k} ms"])


def test_main_prints_both_tables(eager_compile, capsys):
    assert cpu_op.main(["--threads", "1,2", "--rounds", "1", "--cases", "tiny:bf16", "--op"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| case | threads |"))
    row = next(line for line in out.splitlines() if line.startswith("| tiny bf16 | 1 |"))
    assert header.count("|") == row.count("|")  # one column per value, the op's included
    assert "| fastpref ms | op ms |" in header and "| fastpref CPU ms | op CPU ms |" in header
    assert "| tiny bf16 | 1 |" in out and "| tiny bf16 | 2 |" in out
    assert "Scaling" in out and "| tiny bf16 | 1 → 2 |" in out
    assert "load average" in out
