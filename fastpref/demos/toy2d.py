"""DMPO's 2-D study (Li et al., 2025, arXiv:2507.07510, §5.1), reproduced on a CPU with numbers
instead of a picture.

A small MLP ε-prediction diffusion model is pretrained on N((3,3), 2·I). Preference pairs take the
winner from the 6:4 mixture of N((4.3,4.3), I) and N((1.8,1.8), I) and the loser from
N((4.5,0.8), I). Copies of the pretrained model are fine-tuned from the same start with each public
fastpref loss (``fastpref.dpo_loss``, ``fastpref.dmpo_loss``, and ``fastpref.mapo_loss`` when it
exists), the frozen pretrained model being the reference, and 2000 points are sampled from each.

The paper's claim (its Figure 1): Diffusion-DPO pushes samples away from the undesirable region but
spreads them (mean-seeking); DMPO concentrates on the dominant preferred mode (4.3,4.3) (mode-seeking).
The table measures it: the fraction of samples near each preferred mode and in the undesirable region,
the share of the dominant mode among the two (0.6 for the preferred mixture itself), the sample mean
and spread, the NLL of the samples under the preferred mixture, and KDE estimates of the reverse and
forward KL to it (mode-seeking = low reverse KL, high forward KL).

    python -m fastpref.demos.toy2d                   # the study (make demo): ~170 s of CPU, 2 processes
    python -m fastpref.demos.toy2d --sweep           # a small β/α sweep for DMPO and DPO

Every choice the paper leaves open (network, schedule, steps, β, α, learning rate) is a field of
:class:`Config`; README.md ("The demo") explains the values.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import inspect
import json
import math
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

import fastpref

# The distributions of the DMPO paper's §5.1 ("variance 2" / "variance 1": isotropic covariances 2·I and I).
PRETRAIN_MEAN = (3.0, 3.0)
PRETRAIN_VAR = 2.0
PREF_MEANS = ((4.3, 4.3), (1.8, 1.8))  # dominant mode first
PREF_WEIGHTS = (0.6, 0.4)
UNDESIRABLE_MEAN = (4.5, 0.8)
# A sample is "near" the centre it is closest to when within this distance (unit covariance:
# 86.5 % of a component's own mass); the three regions are disjoint.
REGION_RADIUS = 2.0
# The model works on z = (x − 3) / 2 so the data is about unit scale, as diffusion schedules assume.
DATA_SHIFT = 3.0
DATA_SCALE = 2.0

__all__ = ["Config", "run", "run_sweep", "main", "region_fractions", "sample_metrics"]


@dataclass
class Config:
    """Everything the paper leaves open. Defaults are the settings README.md reports."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # network: MLP on [z, sinusoidal embedding of t], SiLU
    hidden: int = 64
    layers: int = 3
    # schedule: DDPM, linear betas 1e-4 … 0.02 over 1000 steps (Ho et al.; the paper's pseudo-code
    # draws t from randint(0, 1000)); sampling: DDPM ancestral steps on an evenly strided subset.
    num_train_timesteps: int = 1000
    sampling_steps: int = 100
    # pretraining on N((3,3), 2·I): Adam, cosine decay
    pretrain_steps: int = 2000
    pretrain_batch: int = 512
    pretrain_lr: float = 2e-3
    # fine-tuning: Adam, constant lr after a short warm-up (the paper: lr 1e-5, 500 warm-up steps)
    finetune_steps: int = 1000
    pairs_per_batch: int = 256
    finetune_lr: float = 1e-4
    warmup_steps: int = 100
    beta_dpo: float = 500.0
    beta_dmpo: float = 500.0
    alpha: float = 0.01
    methods: tuple[str, ...] = ("sft", "dpo", "dmpo", "mapo")
    n_samples: int = 2000
    # The public losses' reference backend: with D = 2 elements per sample a fused kernel has nothing
    # to save, and "auto" on a CPU JIT-builds the C++ extension on first use (minutes on a busy 2-core
    # box). --backend auto / cpu / triton run the same study through the other implementations.
    backend: str = "torch"
    out_dir: str = "outputs/toy2d"
    plot: bool = True
    progress: bool = True
    workers: int = 2  # seeds run in parallel processes
    threads: int = 1  # torch threads per process: the 64-wide MLP gains nothing from more
    log_every: int = 50


# ----------------------------------------------------------------------------------------------
# Data: the four distributions of §5.1, drawn with an explicit generator (two runs are identical).
# ----------------------------------------------------------------------------------------------


def _gauss(n: int, mean, var: float, g: torch.Generator) -> torch.Tensor:
    return torch.tensor(mean) + math.sqrt(var) * torch.randn(n, 2, generator=g)


def sample_pretrain(n: int, g: torch.Generator) -> torch.Tensor:
    return _gauss(n, PRETRAIN_MEAN, PRETRAIN_VAR, g)


def sample_preferred(n: int, g: torch.Generator) -> torch.Tensor:
    means = torch.tensor(PREF_MEANS)
    comp = torch.multinomial(torch.tensor(PREF_WEIGHTS), n, replacement=True, generator=g)
    return means[comp] + torch.randn(n, 2, generator=g)


def sample_undesirable(n: int, g: torch.Generator) -> torch.Tensor:
    return _gauss(n, UNDESIRABLE_MEAN, 1.0, g)


def log_prob_preferred(x: torch.Tensor) -> torch.Tensor:
    """log density of the preferred mixture 0.6·N((4.3,4.3), I) + 0.4·N((1.8,1.8), I)."""
    x = x.double()
    means = torch.tensor(PREF_MEANS, dtype=torch.float64)
    logw = torch.log(torch.tensor(PREF_WEIGHTS, dtype=torch.float64))
    sq = (x[:, None, :] - means[None]).square().sum(-1)
    return torch.logsumexp(logw - 0.5 * sq - math.log(2 * math.pi), dim=1)


def log_prob_undesirable(x: torch.Tensor) -> torch.Tensor:
    sq = (x.double() - torch.tensor(UNDESIRABLE_MEAN, dtype=torch.float64)).square().sum(-1)
    return -0.5 * sq - math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# The model: a small MLP that predicts ε from (z_t, t).
# ----------------------------------------------------------------------------------------------


class NoiseMLP(torch.nn.Module):
    """ε_θ(z_t, t): an MLP on the 2-D point concatenated with diffusers' sinusoidal time embedding."""

    def __init__(self, hidden: int = 64, layers: int = 3, time_channels: int = 16):
        super().__init__()
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(time_channels, hidden)
        blocks: list[torch.nn.Module] = [torch.nn.Linear(2 + hidden, hidden), torch.nn.SiLU()]
        for _ in range(layers - 1):
            blocks += [torch.nn.Linear(hidden, hidden), torch.nn.SiLU()]
        blocks.append(torch.nn.Linear(hidden, 2))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(self.time_proj(t))
        return self.net(torch.cat([z, emb], dim=1))


def _scheduler(cfg: Config) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear", clip_sample=False)


def _to_z(x: torch.Tensor) -> torch.Tensor:
    return (x - DATA_SHIFT) / DATA_SCALE


def _to_x(z: torch.Tensor) -> torch.Tensor:
    return z * DATA_SCALE + DATA_SHIFT


def _bar(iterable, cfg: Config, desc: str):
    return tqdm(iterable, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)


def pretrain(cfg: Config, seed: int) -> NoiseMLP:
    """Standard ε-prediction diffusion training on N((3,3), 2·I)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = NoiseMLP(cfg.hidden, cfg.layers)
    sched = _scheduler(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(100, cfg.pretrain_steps // 10), cfg.pretrain_steps)
    for _ in _bar(range(cfg.pretrain_steps), cfg, f"seed {seed} · pretrain"):
        z0 = _to_z(sample_pretrain(cfg.pretrain_batch, g))
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, cfg.num_train_timesteps, (z0.shape[0],), generator=g)
        loss = F.mse_loss(model(sched.add_noise(z0, noise, t), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The fine-tuning losses: the public fastpref API, called exactly as a user's training step does.
# ----------------------------------------------------------------------------------------------


def _pair_losses(cfg: Config) -> dict:
    """name → (needs_reference, fn(model_pred (2B,2), ref_pred (2B,2) or None, noise (B,2)) → (loss, stats)).

    ``sft`` (plain MSE on the winners) is the non-preference baseline: it shows what fitting the
    preferred mixture itself gives. Losses added to fastpref later join when present (``hasattr``)."""

    def dpo(pred, ref, noise):
        return fastpref.dpo_loss(pred, ref, noise, beta=cfg.beta_dpo, backend=cfg.backend, return_stats=True)

    def dmpo(pred, ref, noise):
        return fastpref.dmpo_loss(
            pred, ref, noise, beta=cfg.beta_dmpo, alpha=cfg.alpha, backend=cfg.backend, return_stats=True
        )

    def sft(pred, ref, noise):
        return F.mse_loss(pred[: noise.shape[0]], noise), None

    table = {"sft": (False, sft), "dpo": (True, dpo), "dmpo": (True, dmpo)}
    if hasattr(fastpref, "mapo_loss"):  # reference-free (MaPO); its own published defaults
        params = inspect.signature(fastpref.mapo_loss).parameters

        def mapo(pred, ref, noise):
            kwargs = {"backend": cfg.backend} if "backend" in params else {}
            return fastpref.mapo_loss(pred, target=torch.cat([noise, noise]), **kwargs), None

        table["mapo"] = (False, mapo)
    return table


def finetune(cfg: Config, seed: int, method: str, pretrained: NoiseMLP, log_rows: list) -> NoiseMLP:
    """Fine-tune a copy of ``pretrained`` on preference pairs with one loss; the reference is the
    frozen ``pretrained`` itself. A pair shares its noise and timestep (the DMPO paper's App. B.3)."""
    needs_ref, loss_fn = _pair_losses(cfg)[method]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(10_000 + seed)  # same pairs, noise and t for every method
    model = copy.deepcopy(pretrained).train().requires_grad_(True)
    sched = _scheduler(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.finetune_lr)
    lr_sched = get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    b = cfg.pairs_per_batch
    for step in _bar(range(cfg.finetune_steps), cfg, f"seed {seed} · {method}"):
        z0 = _to_z(torch.cat([sample_preferred(b, g), sample_undesirable(b, g)]))  # winners, then losers
        noise = torch.randn(b, 2, generator=g)
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=g).repeat(2)
        z_t = sched.add_noise(z0, noise.repeat(2, 1), t)
        pred = model(z_t, t)
        ref = None
        if needs_ref:
            with torch.no_grad():
                ref = pretrained(z_t, t)
        loss, stats = loss_fn(pred, ref, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if step % cfg.log_every == 0 or step == cfg.finetune_steps - 1:
            row = {"seed": seed, "method": method, "step": step, "loss": loss.item()}
            if stats is not None:
                row["margin"] = stats.margin.mean().item()
                row["implicit_accuracy"] = stats.implicit_accuracy.item()
            log_rows.append(row)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def sample(cfg: Config, model: NoiseMLP, n: int, seed: int, desc: str = "sample") -> torch.Tensor:
    """DDPM ancestral sampling with diffusers' scheduler over ``cfg.sampling_steps`` evenly strided
    timesteps (the posterior between strided steps, as diffusers computes it); returns x-space points."""
    sched = _scheduler(cfg)
    sched.set_timesteps(cfg.sampling_steps)
    g = torch.Generator().manual_seed(20_000 + seed)
    z = torch.randn(n, 2, generator=g)
    for t in _bar(sched.timesteps, cfg, desc):
        eps = model(z, t.expand(n))
        z = sched.step(eps, t, z, generator=g).prev_sample
    return _to_x(z)


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------


def region_fractions(x: torch.Tensor) -> dict[str, float]:
    """Fraction of points near the dominant mode, the minor mode and the undesirable centre: a point
    counts for the centre it is nearest to when within ``REGION_RADIUS`` (disjoint regions)."""
    centres = torch.tensor([*PREF_MEANS, UNDESIRABLE_MEAN], dtype=x.dtype)
    d = torch.cdist(x, centres)
    nearest = d.argmin(dim=1)
    inside = d.min(dim=1).values < REGION_RADIUS
    frac = [((nearest == k) & inside).float().mean().item() for k in range(3)]
    return {"mode_hi": frac[0], "mode_lo": frac[1], "undesirable": frac[2]}


def _kde_log_prob(points: torch.Tensor, data: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
    """Gaussian KDE of ``data`` (diagonal Scott bandwidth σ_d·n^(−1/6)) evaluated at ``points``."""
    data, points = data.double(), points.double()
    n = data.shape[0] - (1 if leave_one_out else 0)
    h = data.std(dim=0).clamp_min(1e-3) * data.shape[0] ** (-1.0 / 6.0)
    sq = ((points[:, None, :] - data[None]) / h).square().sum(-1)
    if leave_one_out:
        sq.fill_diagonal_(float("inf"))
    return torch.logsumexp(-0.5 * sq, dim=1) - math.log(n) - math.log(2 * math.pi) - h.log().sum()


def sample_metrics(x: torch.Tensor, reference_draw: torch.Tensor) -> dict[str, float]:
    """All table columns for one set of samples ``x`` (N, 2). ``reference_draw`` is a fresh draw from
    the preferred mixture for the forward-KL estimate."""
    m = region_fractions(x)
    pair = m["mode_hi"] + m["mode_lo"]
    m["hi_share"] = m["mode_hi"] / pair if pair > 0 else float("nan")
    m["mean_x"], m["mean_y"] = x.mean(dim=0).tolist()
    m["spread"] = x.var(dim=0).mean().sqrt().item()  # RMS of the per-axis standard deviations
    logp_x = log_prob_preferred(x)
    m["nll_pref"] = (-logp_x).mean().item()
    m["kl_reverse"] = (_kde_log_prob(x, x, leave_one_out=True) - logp_x).mean().item()  # KL(q ‖ p)
    m["kl_forward"] = (log_prob_preferred(reference_draw) - _kde_log_prob(reference_draw, x)).mean().item()
    return m


METRIC_COLUMNS = (
    ("mode_hi", "near (4.3,4.3)"),
    ("mode_lo", "near (1.8,1.8)"),
    ("hi_share", "hi/(hi+lo)"),
    ("undesirable", "undesirable"),
    ("mean_x", "mean x"),
    ("mean_y", "mean y"),
    ("spread", "spread"),
    ("nll_pref", "NLL pref"),
    ("kl_reverse", "KL(q‖p)"),
    ("kl_forward", "KL(p‖q)"),
)


def summarise(rows: list[dict], columns=METRIC_COLUMNS) -> list[dict]:
    """Mean and sample std over seeds per model, in first-seen order."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        s = {"model": name, "seeds": len(group)}
        for key, _ in columns:
            v = torch.tensor([r[key] for r in group], dtype=torch.float64)
            s[key] = v.mean().item()
            s[key + "_std"] = v.std().item() if len(group) > 1 else 0.0
        out.append(s)
    return out


def markdown_table(summary: list[dict], columns=METRIC_COLUMNS) -> str:
    head = "| model | " + " | ".join(label for _, label in columns) + " |"
    sep = "| --- |" + " ---: |" * len(columns)
    lines = [head, sep]
    for s in summary:
        cells = [f"{s[k]:.2f} ± {s[k + '_std']:.2f}" for k, _ in columns]
        lines.append(f"| {s['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------
# The plot: one scatter panel per model over the data's density contours.
# ----------------------------------------------------------------------------------------------


def plot_samples(samples: dict[str, torch.Tensor], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = (-2.5, 8.5)
    grid = torch.linspace(*lim, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    pref = log_prob_preferred(pts).exp().reshape(gx.shape)
    bad = log_prob_undesirable(pts).exp().reshape(gx.shape)
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.5), sharex=True, sharey=True)
    for ax, name in zip(axes if len(names) > 1 else [axes], names):
        ax.contour(gx, gy, pref, levels=6, colors="tab:green", linewidths=0.8)
        ax.contour(gx, gy, bad, levels=4, colors="tab:red", linewidths=0.8)
        x = samples[name]
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.35, color="tab:blue", rasterized=True)
        f = region_fractions(x)
        ax.set_title(f"{name}\nhi {f['mode_hi']:.2f} · lo {f['mode_lo']:.2f} · bad {f['undesirable']:.2f}", fontsize=9)
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The study.
# ----------------------------------------------------------------------------------------------

LABELS = {"sft": "SFT (winners)", "dpo": "Diffusion-DPO", "dmpo": "DMPO", "mapo": "MaPO"}


def _methods(cfg: Config) -> list[str]:
    available = _pair_losses(cfg)
    unknown = [m for m in cfg.methods if m not in LABELS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected a subset of {list(LABELS)}")
    return [m for m in cfg.methods if m in available]  # e.g. MaPO only once fastpref has it


def _run_seed(cfg: Config, seed: int, methods: list[str]) -> tuple[list[dict], list[dict], dict[str, torch.Tensor]]:
    """One seed of the study: pretrain, fine-tune with each loss, sample, measure."""
    torch.set_num_threads(cfg.threads)
    log_rows: list[dict] = []
    g = torch.Generator().manual_seed(30_000 + seed)
    reference_draw = sample_preferred(cfg.n_samples, g)
    models = {"pretrained": pretrain(cfg, seed)}
    for m in methods:
        models[LABELS[m]] = finetune(cfg, seed, m, models["pretrained"], log_rows)
    samples = {
        "data: pretraining": sample_pretrain(cfg.n_samples, g),
        "data: preferred": sample_preferred(cfg.n_samples, g),
    }
    for name, model in models.items():
        samples[name] = sample(cfg, model, cfg.n_samples, seed, f"seed {seed} · sample {name}")
    rows = [{"model": name, "seed": seed, **sample_metrics(x, reference_draw)} for name, x in samples.items()]
    return rows, log_rows, samples


def _map_seeds(cfg: Config, fn, *args) -> list:
    """``[fn(cfg, seed, *args) for seed in cfg.seeds]``, the seeds spread over ``cfg.workers`` forked
    processes (one torch thread each: two cores run two seeds at once). Every seed draws from its own
    generators, so the results do not depend on the number of workers."""
    workers = min(cfg.workers, len(cfg.seeds))
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        return [fn(cfg, seed, *args) for seed in cfg.seeds]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(fn, [cfg] * len(cfg.seeds), cfg.seeds, *([a] * len(cfg.seeds) for a in args)))


def run(cfg: Config) -> dict:
    """Run the study for every seed; write the CSVs, the Markdown table, the PNG and the config.

    Returns ``{"out_dir", "rows", "summary", "markdown", "log", "seconds"}``."""
    if not cfg.seeds:
        raise ValueError("seeds must name at least one seed")
    methods = _methods(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = _map_seeds(cfg, _run_seed, methods)
    rows = [r for seed_rows, _, _ in per_seed for r in seed_rows]
    log_rows = [r for _, seed_log, _ in per_seed for r in seed_log]
    first_samples = {k: v for k, v in per_seed[0][2].items() if k != "data: pretraining"}
    summary = summarise(rows)
    md = markdown_table(summary)
    _write_csv(out / "metrics_per_seed.csv", rows)
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "train_log.csv", log_rows)
    n_seeds = len(cfg.seeds)
    header = (
        f"DMPO 2-D study (arXiv:2507.07510 §5.1), {cfg.n_samples} samples per model, mean ± std over {n_seeds} "
        f"seed(s) {list(cfg.seeds)}; β_DPO = {cfg.beta_dpo:g}, β_DMPO = {cfg.beta_dmpo:g}, α = {cfg.alpha:g}, "
        f"{cfg.finetune_steps} fine-tuning steps × {cfg.pairs_per_batch} pairs, lr {cfg.finetune_lr:g}.\n"
        f"Regions: nearest centre within {REGION_RADIUS:g}. Preferred-mixture rows are the data itself.\n\n"
    )
    (out / "summary.md").write_text(header + md + "\n")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if cfg.plot:
        plot_samples(
            first_samples,
            out / "samples.png",
            f"seed {cfg.seeds[0]}: green = preferred 6:4 mixture, red = undesirable; "
            f"β_DPO={cfg.beta_dpo:g}, β_DMPO={cfg.beta_dmpo:g}, α={cfg.alpha:g}",
        )
    return {
        "out_dir": out,
        "rows": rows,
        "summary": summary,
        "markdown": md,
        "log": log_rows,
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------------------
# The β/α sweep: which settings make DMPO mode-seeking here, and which do not.
# ----------------------------------------------------------------------------------------------

SWEEP_DPO = (50.0, 200.0, 500.0)
SWEEP_DMPO = ((200.0, 0.01), (500.0, 0.01), (2000.0, 0.01), (500.0, 0.001), (50.0, 0.1), (200.0, 0.1))
SWEEP_COLUMNS = (*METRIC_COLUMNS, ("final_margin", "final u"))


def _sweep_seed(cfg: Config, seed: int) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(30_000 + seed)
    reference_draw = sample_preferred(cfg.n_samples, g)
    pretrained = pretrain(cfg, seed)
    rows = []
    settings = [("dpo", b, float("nan")) for b in SWEEP_DPO] + [("dmpo", b, a) for b, a in SWEEP_DMPO]
    for method, beta, alpha in settings:
        c = dataclasses.replace(cfg, beta_dpo=beta, beta_dmpo=beta, alpha=0.01 if math.isnan(alpha) else alpha)
        log_rows: list[dict] = []
        model = finetune(c, seed, method, pretrained, log_rows)
        x = sample(c, model, cfg.n_samples, seed, f"seed {seed} · sample {method} β={beta:g}")
        name = f"{LABELS[method]} β={beta:g}" + ("" if math.isnan(alpha) else f" α={alpha:g}")
        rows.append({"model": name, "seed": seed, "final_margin": log_rows[-1]["margin"], **sample_metrics(x, reference_draw)})
    return rows


def run_sweep(cfg: Config) -> dict:
    """Fine-tune DMPO over ``SWEEP_DMPO`` (β, α) and DPO over ``SWEEP_DPO`` β from the same pretrained
    models; writes sweep.csv / sweep.md under ``cfg.out_dir``."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [r for seed_rows in _map_seeds(cfg, _sweep_seed) for r in seed_rows]
    summary = summarise(rows, SWEEP_COLUMNS)
    md = markdown_table(summary, SWEEP_COLUMNS)
    _write_csv(out / "sweep_per_seed.csv", rows)
    _write_csv(out / "sweep.csv", summary)
    (out / "sweep.md").write_text(
        f"β/α sweep, mean ± std over seeds {list(cfg.seeds)}, {cfg.finetune_steps} steps, lr {cfg.finetune_lr:g}\n\n"
        + md
        + "\n"
    )
    return {"out_dir": out, "rows": rows, "summary": summary, "markdown": md, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastpref.demos.toy2d", description=__doc__.split("\n\n")[0])
    d = Config()
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    for f in dataclasses.fields(Config):
        if f.name in ("seeds", "methods", "plot", "progress"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(LABELS))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--sweep", action="store_true", help="run the β/α sweep instead of the study")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    # The MLP is tiny (64 wide): extra threads only add synchronisation, and on a busy machine
    # oversubscribed threads made it ~10× slower here; the seeds use the cores instead.
    torch.set_num_threads(args.threads)
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name not in ("plot", "progress")}
    kw.update(seeds=tuple(args.seeds), methods=tuple(args.methods), plot=not args.no_plot, progress=not args.no_progress)
    cfg = Config(**kw)
    result = run_sweep(cfg) if args.sweep else run(cfg)
    print(result["markdown"])
    print(f"\n{time.strftime('%H:%M:%S')} · {result['seconds']:.0f} s · results in {Path(result['out_dir']).resolve()}")
    return result


if __name__ == "__main__":
    main()
