"""The sweep's figure: achieved GB/s against bytes moved, one line per provider and one panel per
mode, with the copy bandwidth measured in the same run as a dashed roofline; RPO time against M.
On a CPU a dotted line per provider gives bytes / process CPU time (see ``harness.Samples``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from benchmarks.harness import MODES  # noqa: E402


def _main_axis(rows):
    """Pair-loss rows of the preset's main axis: shapes × pairs at one dtype / target / ref, so that
    a line joins comparable points (the variants are in the tables)."""
    pair = [r for r in rows if r["op"] == "pair_loss"]
    if not pair:
        return [], None
    keys = [(r["dtype"], r["target"], r["ref"]) for r in pair]
    main = max(set(keys), key=keys.count)  # the most common setting is the main axis
    return [r for r, k in zip(pair, keys) if k == main], main


def plot_rows(rows, facts, path: Path) -> None:
    sel, main = _main_axis(rows)
    rpo = [r for r in rows if r["op"] == "rpo"]
    ncols = len(MODES) + (1 if rpo else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4.2), squeeze=False)
    axes = axes[0]
    if sel:
        dtype, target, ref = main
        colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in sel))}
        markers = dict(zip(dict.fromkeys(r["shape"] for r in sel), "osD^vP*X"))
        for ax, mode in zip(axes, MODES):
            # one line per (provider, shape) through its pair counts: colour = provider, marker = shape
            for (prov, shape) in dict.fromkeys((r["provider"], r["shape"]) for r in sel):
                mine = sorted(
                    (r for r in sel if (r["provider"], r["shape"], r["mode"]) == (prov, shape, mode)),
                    key=lambda r: r["bytes_moved"],
                )
                if not mine:
                    continue
                mib = [r["bytes_moved"] / 2**20 for r in mine]
                style = dict(color=colors[prov], marker=markers[shape])
                ax.plot(mib, [r["gbps"] for r in mine], **style)
                if facts.device == "cpu":  # dotted: bytes / process CPU time, blind to waiting for a core
                    gb_cpu = [r["bytes_moved"] / (r["cpu_ms_median"] * 1e6) for r in mine]
                    ax.plot(mib, gb_cpu, ls=":", alpha=0.6, mfc="none", **style)
            ax.axhline(facts.copy_gbps, ls="--", color="k")
            ax.set(xscale="log", yscale="log", xlabel="bytes moved (MiB)", ylabel="achieved GB/s", title=mode)
            ax.grid(True, which="both", alpha=0.3)
        handles = [Line2D([], [], color=c, label=p) for p, c in colors.items()]
        handles += [Line2D([], [], color="gray", marker=m, ls="none", label=s) for s, m in markers.items()]
        handles.append(Line2D([], [], color="k", ls="--", label=f"copy bandwidth {facts.copy_gbps:.1f} GB/s"))
        if facts.device == "cpu":
            handles.append(Line2D([], [], color="gray", ls=":", label="dotted: bytes / CPU time"))
        axes[0].legend(handles=handles, fontsize=7)
        fig.suptitle(
            f"pair loss ({dtype}, target {target}, {ref}) on {facts.name} — torch {facts.torch}", fontsize=10
        )
    if rpo:
        ax = axes[-1]
        for prov in dict.fromkeys(r["provider"] for r in rpo):
            pts = sorted((r["pairs"], r["ms_median"]) for r in rpo if r["provider"] == prov and r["mode"] == "full")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.set(xscale="log", yscale="log", xlabel="M (pairs)", ylabel="ms, forward + backward", title="RPO M×M")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
