"""Benchmark sweep: ``python -m benchmarks.sweep --preset cpu|gpu|full|smoke``.

Runs a preset's cases through :mod:`benchmarks.harness` for every provider that runs on the device and
writes, under ``benchmarks/results/`` (or ``--out PREFIX``):

* ``PREFIX.csv`` — one row per (provider, case, mode) with the device, versions, bytes moved, GB/s,
  % of the copy bandwidth measured in the same run, median / p20 / p80, speed-ups, peak memory;
* ``PREFIX.md`` — the same rows as Markdown tables, with the command, the device and what was skipped;
* ``PREFIX.png`` — achieved GB/s against bytes moved per provider, dashed line at the measured copy
  bandwidth (the roofline); RPO time against M when the RPO benchmark ran.

Presets
    ``cpu``    ``make bench``: every latent shape at 1/4/8/32 pairs (video at 1) in fp32 with a full
               target and ``ref_pred``, plus every dtype × target × ref variant on SDXL×4; RPO
               M = 8, 32, 128, 512, 2048. A few minutes on a quiet 2-core CPU.
    ``gpu``    ``make bench-gpu``: every shape × pairs 1/4/8/32 in bf16 and fp32 (full target,
               ``ref_pred``), plus the target × ref variants on every shape at 8 pairs in both dtypes;
               RPO M = 8…4096.
    ``full``   the whole product shape × pairs × dtype × target × ref.
    ``gpu-quick``  ``make bench-gpu-quick``: SD1.5/SDXL/SD3 × 1 and 8 pairs, bf16, full target,
               ``ref_pred``, and SD1.5 at 520 px × 8 (D not a multiple of 16); RPO M = 64 and 1024 —
               the first look at a GPU in a few minutes
               (``benchmarks/gpu_quick.py`` adds the parity tests and the roofline table).
    ``smoke``  two tiny cases, for the test suite.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import MODES, Case, Timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAIRS = (1, 4, 8, 32)
LATENTS = ("sd15", "sdxl", "sd3", "video")
RPO_M = tuple(2**k for k in range(3, 13))  # 8 … 4096
RPO_M_CPU = (8, 32, 128, 512, 2048)  # eager M = 4096 takes seconds per call on a CPU


def _variants(shape: str, pairs: int, dtypes, loss: str) -> list[Case]:
    return [
        Case(shape, pairs, dtype, target, ref, loss)
        for dtype, target, ref in itertools.product(dtypes, ("full", "shared"), ("ref_pred", "ref_err"))
    ]


def preset_cases(preset: str, loss: str = "sigmoid") -> list[Case]:
    """The cases of a preset, without duplicates, in run order."""
    if preset == "smoke":
        cases = [Case("tiny", 1, loss=loss), Case("tiny", 2, "bf16", "shared", "ref_err", loss)]
    elif preset == "cpu":
        main = [
            Case(shape, pairs, loss=loss)
            for shape in LATENTS
            for pairs in (PAIRS if shape != "video" else (1,))  # video ×4…×32: seconds per eager call on a CPU
        ]
        cases = main + _variants("sdxl", 4, ("fp32", "bf16"), loss)
    elif preset == "gpu":
        main = [Case(shape, pairs, dtype, loss=loss) for dtype in ("bf16", "fp32") for shape in LATENTS for pairs in PAIRS]
        cases = main + [c for shape in LATENTS for c in _variants(shape, 8, ("bf16", "fp32"), loss)]
    elif preset == "gpu-quick":
        cases = [Case(shape, pairs, "bf16", loss=loss) for shape in ("sd15", "sdxl", "sd3") for pairs in (1, 8)]
        cases.append(Case("sd15-odd", 8, "bf16", loss=loss))  # what a sample size off the 16-grid costs
    elif preset == "full":
        cases = [
            Case(shape, pairs, dtype, target, ref, loss)
            for shape, pairs, dtype, target, ref in itertools.product(
                LATENTS, PAIRS, ("bf16", "fp32"), ("full", "shared"), ("ref_pred", "ref_err")
            )
        ]
    else:
        raise ValueError(f"preset must be one of {', '.join(PRESET_TIMING)}; got {preset!r}")
    return list(dict.fromkeys(cases))


PRESET_TIMING = {
    "smoke": Timing(warmup=1, min_reps=3, max_reps=5, budget_s=0.0),
    "cpu": Timing(warmup=2, min_reps=5, max_reps=50, budget_s=0.25),
    "gpu": Timing(warmup=10, min_reps=20, max_reps=200, budget_s=0.1),
    "gpu-quick": Timing(warmup=10, min_reps=20, max_reps=200, budget_s=0.1),
    "full": Timing(warmup=10, min_reps=20, max_reps=200, budget_s=0.1),
}
PRESET_RPO = {"smoke": (8,), "cpu": RPO_M_CPU, "gpu": RPO_M, "gpu-quick": (64, 1024), "full": RPO_M}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run(
    preset: str = "cpu",
    *,
    device: str | torch.device | None = None,
    providers: tuple[str, ...] | None = None,
    modes: tuple[str, ...] = MODES,
    loss: str = "sigmoid",
    out: str | Path | None = None,
    memory: bool = True,
    plot: bool = True,
    rpo: bool = True,
    timing: Timing | None = None,
    threads: int | None = None,
    copy_mib: int | None = None,
    shapes: tuple[str, ...] | None = None,
    dtypes: tuple[str, ...] | None = None,
    rpo_ms: tuple[int, ...] | None = None,
    pairs: tuple[int, ...] | None = None,
    interpreted_triton: bool = False,
    log=print,
) -> dict:
    """Run a preset; returns ``{"rows", "skipped", "facts", "paths"}`` and writes the files.

    ``threads`` sets ``torch.set_num_threads`` (CPU); ``copy_mib`` the size of the copy-bandwidth buffer;
    ``shapes``/``dtypes`` keep only those cases of the preset (e.g. to split a long GPU run), ``rpo_ms``
    those RPO sizes, ``pairs`` those pair counts. ``interpreted_triton`` runs the Triton provider through the interpreter on a CPU
    (a dry run of a GPU preset: every step but meaningful times).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; run the CPU preset (make bench)")
    bad = set(modes) - set(MODES)
    if bad:
        raise ValueError(f"modes must be among {MODES}, got {sorted(bad)}")
    bad = set(shapes or ()) - set(LATENTS) - ({"tiny"} if preset == "smoke" else set()) - {"sd15-odd"}
    if bad:
        raise ValueError(f"shapes must be among {LATENTS}, got {sorted(bad)}")
    timing = timing or PRESET_TIMING[preset]
    cases = [
        c
        for c in preset_cases(preset, loss)
        if (shapes is None or c.shape in shapes) and (dtypes is None or c.dtype in dtypes)
        and (pairs is None or c.pairs in pairs)
    ]  # fmt: skip
    started = time.time()

    facts = harness.measure_device(device, copy_mib)
    log(f"device: {facts.describe()}")
    found, skipped = harness.discover_providers(device, providers, interpreted_triton=interpreted_triton)
    log(f"providers: {', '.join(p.name for p in found)}")
    for name, why in skipped.items():
        log(f"skipped {name}: {why}")

    rows = []
    for i, case in enumerate(cases, 1):
        t0 = time.time()
        case_rows = harness.run_case(case, found, device, facts, modes=modes, timing=timing, memory=memory, skipped=skipped)
        rows += case_rows
        log(f"[{i}/{len(cases)}] {case.label()}: {time.time() - t0:.1f} s — " + _summary(case_rows))

    if rpo:
        from benchmarks import rpo as rpo_bench

        rpo_rows, why = rpo_bench.run(
            rpo_ms or PRESET_RPO[preset], found, device, facts, modes=modes, timing=timing, memory=memory, skipped=skipped, log=log
        )
        if why:
            skipped["rpo"] = why
            log(f"skipped rpo: {why}")
        rows += rpo_rows

    out = Path(out) if out else RESULTS_DIR / f"{preset}-{_slug(facts.name)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.sweep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = {
        "preset": preset,
        "command": command if Path(sys.argv[0]).stem == "sweep" else f"benchmarks.sweep.run({preset!r})",
        "device": facts.__dict__,
        "elapsed_s": round(time.time() - started, 1),
        "skipped": skipped,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "fastpref": str(Path(harness.fastpref.__file__).parent),
    }
    paths = {"csv": out.with_suffix(".csv"), "md": out.with_suffix(".md"), "json": out.with_suffix(".json")}
    write_csv(rows, paths["csv"])
    paths["json"].write_text(json.dumps(meta, indent=2) + "\n")
    paths["md"].write_text(markdown(rows, meta))
    if plot and rows:
        try:
            from benchmarks.plot import plot_rows
        except ImportError as exc:  # a bare GPU image may lack matplotlib: keep the CSV, say so
            log(f"no plot ({exc}); the CSV and the tables are written")
        else:
            paths["png"] = out.with_suffix(".png")
            plot_rows(rows, facts, paths["png"])
    log(f"wrote {', '.join(str(p) for p in paths.values())} in {meta['elapsed_s']} s")
    return {"rows": rows, "skipped": skipped, "facts": facts, "paths": paths}


def _summary(rows) -> str:
    full = [r for r in rows if r["mode"] == "full"] or rows
    return ", ".join(f"{r['provider']} {r['ms_median']:.3g} ms" for r in full)


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=harness.COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


_TEXT = {"timestamp", "device", "device_name", "torch", "triton", "op", "provider", "loss", "mode", "shape",
         "sample_shape", "dtype", "target", "ref"}  # fmt: skip


def read_csv(path) -> list[dict]:
    """Rows of a sweep CSV with their numbers parsed back."""
    with open(path, newline="") as f:
        return [
            {k: v if k in _TEXT else (int(v) if k in ("pairs", "threads", "reps", "elements", "bytes_moved") else float(v))
             for k, v in r.items()}
            for r in csv.DictReader(f)
        ]  # fmt: skip


def report(prefix) -> dict:
    """Re-render ``PREFIX.md`` and ``PREFIX.png`` from ``PREFIX.csv`` and ``PREFIX.json`` (no run)."""
    prefix = Path(prefix)
    rows = read_csv(prefix.with_suffix(".csv"))
    meta = json.loads(prefix.with_suffix(".json").read_text())
    prefix.with_suffix(".md").write_text(markdown(rows, meta))
    from benchmarks.plot import plot_rows

    plot_rows(rows, harness.DeviceFacts(**meta["device"]), prefix.with_suffix(".png"))
    return {"rows": rows, "meta": meta}


def _fmt(v, spec="{:.3g}") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def _case_key(r) -> str:
    if r["op"] == "pair_loss":
        return f"{r['shape']}×{r['pairs']} {r['dtype']} {r['target']} {r['ref']}"
    return f"{r['op']} M={r['pairs']} {r['dtype']}"


def summary(rows, mode: str = "full") -> list[str]:
    """One line per case: every provider's median [p20–p80] ms side by side, the speed-ups of the
    fastest fastpref provider (vs eager, vs compile) and its distance to the floor. On a CPU, the
    speed-ups are also given on process CPU time (blind to time spent waiting for a core)."""
    sel = [r for r in rows if r["mode"] == mode]
    if not sel:
        return []
    provs = list(dict.fromkeys(r["provider"] for r in sel))
    on_cpu = any(math.isfinite(r["cpu_ms_median"]) for r in sel)
    extra = ["compile vs eager", "best fastpref vs eager", "vs compile"]
    cols = ["case", "MB moved"] + [f"{p} ms" for p in provs] + extra + ["its % copy BW", "its × floor"]
    if on_cpu:
        cols += [f"{c}, CPU time" for c in extra]
    out = [
        f"### Summary: {mode}" + (" (forward + backward)" if mode == "full" else ""),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + " --- |" * len(cols),
    ]
    for key in dict.fromkeys(_case_key(r) for r in sel):
        by = {r["provider"]: r for r in sel if _case_key(r) == key}
        cells = [key, _fmt(next(iter(by.values()))["bytes_moved"] / 2**20)]
        cells += [
            f"{_fmt(by[p]['ms_median'])} [{_fmt(by[p]['ms_p20'])}–{_fmt(by[p]['ms_p80'])}]" if p in by else "—"
            for p in provs
        ]
        fast = [r for p, r in by.items() if p.startswith("fastpref-")]
        best = min(fast, key=lambda r: r["ms_median"]) if fast else None

        def ratios(col):
            eager, comp = by.get("torch", {}).get(col), by.get("torch_compile", {}).get(col)
            mine = best[col] if best else None
            div = lambda a, b: a / b if a is not None and b else math.nan  # noqa: E731
            return [div(eager, comp), div(eager, mine), div(comp, mine)]

        cells += [_fmt(v, "{:.2f}") for v in ratios("ms_median")]
        cells += [_fmt(best["pct_copy_bw"], "{:.0f}"), _fmt(best["x_floor"], "{:.1f}")] if best else ["—", "—"]
        if on_cpu:
            cells += [_fmt(v, "{:.2f}") for v in ratios("cpu_ms_median")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(rows, meta) -> str:
    """The rows as Markdown tables, one per (op, mode), with the command and the device."""
    dev = meta["device"]
    lines = [
        f"# Benchmark results: preset `{meta['preset']}`",
        "",
        f"- Command: `{meta['command']}` ({meta['elapsed_s']} s)",
        f"- Device: {dev['name']}; torch {dev['torch']}, triton {dev['triton']}",
        f"- Measured in the same run: copy bandwidth {dev['copy_gbps']:.2f} GB/s (read + write), "
        f"one-element op {dev['launch_us']:.1f} µs",
        "",
    ]
    if meta["skipped"]:
        lines += ["Skipped:", ""] + [f"- `{k}`: {v}" for k, v in meta["skipped"].items()] + [""]
    lines += summary(rows) + [""]
    header = (
        "| case | provider | median ms | p20–p80 ms | CPU ms | GB/s | % copy BW | × floor | vs eager | vs compile "
        "| peak MB | rel err | load |"
    )
    for op in dict.fromkeys(r["op"] for r in rows):
        for mode in MODES:
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            if not sel:
                continue
            lines += [f"## {op}, {mode}", "", header, "|" + " --- |" * 13]
            for r in sel:
                lines.append(
                    f"| {_case_key(r)} | {r['provider']} | {_fmt(r['ms_median'])} | "
                    f"{_fmt(r['ms_p20'])}–{_fmt(r['ms_p80'])} | {_fmt(r['cpu_ms_median'])} | {_fmt(r['gbps'])} | {_fmt(r['pct_copy_bw'], '{:.0f}')} | "
                    f"{_fmt(r['x_floor'], '{:.1f}')} | {_fmt(r['speedup_vs_eager'], '{:.2f}')} | "
                    f"{_fmt(r['speedup_vs_compile'], '{:.2f}')} | {_fmt(r['peak_mem_mb'], '{:.1f}')} | "
                    f"{_fmt(r['rel_err_vs_eager'], '{:.1e}')} | {_fmt(r['load_avg'], '{:.1f}')} |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", choices=tuple(PRESET_TIMING))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--providers", default=None, help="comma-separated subset, e.g. torch,torch_compile,fastpref-cpu")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of forward,backward,full")
    p.add_argument("--loss", default="sigmoid", choices=("sigmoid", "hinge", "ipo", "dmpo"))
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/<preset>-<device>)")
    p.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(LATENTS))
    p.add_argument("--dtypes", default=None, help="comma-separated subset of fp32,bf16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on a CPU (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-rpo", action="store_true", help="skip the RPO M×M benchmark")
    p.add_argument("--rpo-only", action="store_true", help="only the RPO M×M benchmark")
    p.add_argument("--report", metavar="PREFIX", help="only re-render PREFIX.md/.png from PREFIX.csv/.json")
    args = p.parse_args(argv)
    if args.report:
        report(args.report)
        return 0
    run(
        args.preset,
        device=args.device,
        providers=tuple(args.providers.split(",")) if args.providers else None,
        modes=tuple(args.modes.split(",")),
        loss=args.loss,
        out=args.out,
        memory=not args.no_memory,
        plot=not args.no_plot,
        rpo=not args.no_rpo,
        threads=args.threads,
        shapes=() if args.rpo_only else tuple(args.shapes.split(",")) if args.shapes else None,
        dtypes=tuple(args.dtypes.split(",")) if args.dtypes else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
