"""CSV + TensorBoard logging and the end-of-run plot.

``train.csv`` holds one row per logged optimizer step, ``eval.csv`` one row per evaluation; the same
numbers go to TensorBoard (``logs/``) under ``train/…`` and ``eval/…``. On resume, rows past the
checkpoint's step (written by the interrupted run) are dropped so the files read as one run.
"""

from __future__ import annotations

import csv
import os

__all__ = ["MetricsLogger", "read_csv", "ema", "plot_curves"]


def read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as fh:
        return [{k: (float(v) if k != "step" else int(v)) if v not in ("", None) else None for k, v in row.items()}
                for row in csv.DictReader(fh)]


class MetricsLogger:
    def __init__(self, log_dir: str, report_to: str, resume_step: int = 0):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        targets = set(filter(None, report_to.split(",")))
        self.csv = "csv" in targets
        self.tb = None
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"), purge_step=resume_step or None)
        for name in ("train.csv", "eval.csv"):  # keep the rows up to the resumed step
            path = os.path.join(log_dir, name)
            rows = [r for r in read_csv(path) if r["step"] <= resume_step] if resume_step else []
            if os.path.isfile(path):
                os.remove(path)
            for r in rows:
                self._append(name, r)

    def _append(self, name: str, row: dict) -> None:
        if not self.csv:
            return
        path = os.path.join(self.log_dir, name)
        new = not os.path.isfile(path)
        if not new:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh))
            if header != list(row):  # a column appeared (e.g. eval reward): rewrite with the union
                rows = read_csv(path) + [row]
                cols = list(dict.fromkeys([c for r in rows for c in r]))
                with open(path, "w", newline="") as fh:
                    w = csv.DictWriter(fh, cols)
                    w.writeheader()
                    for r in rows:
                        w.writerow({k: _fmt(r.get(k)) for k in cols})
                return
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, list(row))
            if new:
                w.writeheader()
            w.writerow({k: _fmt(v) for k, v in row.items()})

    def log(self, kind: str, step: int, values: dict) -> None:
        """``kind`` is ``"train"`` or ``"eval"``."""
        row = {"step": step, **values}
        self._append(f"{kind}.csv", row)
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    return "" if v is None else (f"{v:.9g}" if isinstance(v, float) else v)


def ema(values: list[float], span: float) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing): the first points
    are averages of what came so far, not pulled towards 0. ``span`` ≈ the number of points averaged."""
    decay = 1.0 - 2.0 / (span + 1.0)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc, weight = decay * acc + (1.0 - decay) * v, decay * weight + (1.0 - decay)
        out.append(acc / weight)
    return out


def plot_curves(log_dir: str, out_path: str) -> str | None:
    """Loss, implicit accuracy and margin per step (raw values faint, an EMA over ~1/10 of the run on
    top), held-out accuracy and sample reward (± its standard error) per evaluation."""
    train, evals = read_csv(os.path.join(log_dir, "train.csv")), read_csv(os.path.join(log_dir, "eval.csv"))
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, train) for k in ("loss", "implicit_accuracy", "u") if k in train[0]]
    panels += [(k, evals) for k in ("heldout_accuracy", "reward") if evals and evals[-1].get(k) is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    span = max(5.0, len(train) / 10)
    for ax, (key, rows) in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        if rows is evals:
            err = [r.get(f"{key}_sem") or 0.0 for r in rows if r.get(key) is not None]
            ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", ms=3, capsize=2, color="C1")
        else:
            ax.plot(x, y, color="C0", alpha=0.25, lw=0.8, label="per step")
            ax.plot(x, ema(y, span), color="C0", lw=1.8, label=f"EMA (span {span:.0f})")
        ax.set_title(("eval " if rows is evals else "") + key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    if panels and panels[0][1] is train:
        axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
