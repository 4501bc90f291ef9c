"""One training step, per reference mode, against the diffusers-example step — side by side, one run.

    python -m benchmarks.train_step                      # CPU preset: small UNet + small SD3 transformer
    python -m benchmarks.train_step --pairs 2 8 --steps 10 --rounds 3

Rows (LoRA unless marked *full*):

``baseline``        the diffusers ``train_diffusion_dpo.py`` step: VAE ``encode`` and text encoder every
                    step, policy call, reference call with ``disable_adapters()``, the eager loss lines.
``baseline_full``   the same with a frozen copy of the model as reference (Salesforce DiffusionDPO style).
``adapter_off``     fastpref: cached latents/embeddings, policy call, ``adapter_off`` reference, fused loss.
``batched``         fastpref: cached latents, ONE forward for policy + reference rows, fused loss.
``cache``           fastpref: cached latents, precomputed reference errors (no reference forward).
``none``            fastpref: cached latents, policy only — the floor a reference-free loss (MaPO) pays.
``copy``            fastpref, *full*: cached latents, frozen copy, fused loss.
``loop``            the trainer's own step, ``fastpref.train.compute_loss`` (UNet only): VAE and text encoder
                    every step, ``adapter_off`` reference, the ``--loss`` objective, backward, AdamW.
``loop_cache_latents`` the same step with ``--cache_latents``: the batch read from the latent cache
                    (built once by ``fastpref.train.cache.precompute`` before timing), no VAE, no text encoder.

Every step is ``zero_grad → forward(s) → loss → backward → AdamW.step``. Time: median over
``rounds × steps`` steps after warm-up, the modes interleaved round by round so that a noisy machine
hurts all of them alike; also the fastest step and, on a CPU, the median *thread CPU time* of the
step (``time.thread_time``; with one intra-op thread every op runs on the calling thread), which
other processes on a shared machine inflate far less than wall time.
Memory: on CUDA ``max_memory_allocated`` (everything on the device: weights,
optimiser state, activations); on a CPU the resident weights the mode keeps (policy, reference copy,
VAE and text encoder when it runs them) plus the peak RSS increase during its steps (sampled every
millisecond after ``malloc_trim``; an approximation: the allocator may reuse freed memory).
The fastpref rows call ``fastpref.dpo_loss``/``dmpo_loss`` with ``backend="auto"`` (the ``loss_backend``
column says what ran: Triton on a GPU; on a CPU the C++ extension where it builds, else the PyTorch
path); the loss is a small part of a step either way.

Writes ``benchmarks/results/train_step_<device>.csv`` and ``.md`` (or ``--output PATH.csv`` and ``PATH.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import csv
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fastpref
from fastpref.train.cache import collate_cached, encode, precompute
from fastpref.train.models import DiffusionModel
from fastpref.train.noise import add_noise, noise_pairs
from fastpref.train.reference import make_reference, tuner_layers

RESULTS = Path(__file__).resolve().parent / "results"
LOOP_MODES = ("loop", "loop_cache_latents")
LORA_MODES = ("baseline", "adapter_off", "batched", "cache", "none", *LOOP_MODES)
FULL_MODES = ("baseline_full", "copy")
COLUMNS = [
    "model", "pairs", "mode", "loss", "step_ms_median", "step_ms_min", "cpu_ms_median", "pairs_per_s",
    "time_vs_baseline", "cpu_time_vs_baseline",
    "resident_mb", "step_peak_mb", "peak_mb", "mem_vs_baseline", "device", "threads", "torch", "diffusers", "peft",
    "loss_backend",
]

# ----------------------------------------------------------------------------------------------
# Models (small, random, built from configs: no download)
# ----------------------------------------------------------------------------------------------

IMAGE, LATENT_CH, TEXT_DIM, TEXT_LEN, POOLED_DIM = 32, 4, 64, 16, 32


def build_models(kind: str, device, seed: int = 0):
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=LATENT_CH,
        norm_num_groups=8, sample_size=IMAGE,
    )
    text = CLIPTextModelWithProjection(CLIPTextConfig(  # CLIP's vocabulary: the trainer's tokenizer feeds it
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_LEN, projection_dim=POOLED_DIM,
    ))
    latent = IMAGE // 2
    if kind == "unet":
        model = UNet2DConditionModel(
            sample_size=latent, in_channels=LATENT_CH, out_channels=LATENT_CH, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM, attention_head_dim=8,
            norm_num_groups=16,
        )
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    else:
        model = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=LATENT_CH, num_layers=4, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=64,
            pooled_projection_dim=POOLED_DIM, out_channels=LATENT_CH, pos_embed_max_size=latent,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for m in (vae, text):
        m.requires_grad_(False).eval().to(device)
    return model.to(device), vae, text, scheduler


def encode_prompt(text, ids, kind):
    out = text(ids)
    cond = {"encoder_hidden_states": out.last_hidden_state}
    if kind != "unet":
        cond["pooled_projections"] = out.text_embeds
    return cond


def add_lora(model, rank=8):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return model


def module_mb(*modules) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**20


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident-set increase over a block, sampled every millisecond (CPU)."""

    def __init__(self):
        self._libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    @contextlib.contextmanager
    def measure(self):
        if self._libc is not None:
            self._libc.malloc_trim(0)  # give freed heap back, so the next block's growth shows
        start = self._rss()
        box = {"peak": start}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                box["peak"] = max(box["peak"], self._rss())
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield box
        finally:
            stop.set()
            thread.join()
            box["peak"] = max(box["peak"], self._rss())
            box["delta_mb"] = (box["peak"] - start) / 2**20


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------


@dataclass
class Setup:
    kind: str
    pairs: int
    device: torch.device
    model: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module
    scheduler: object
    pixels: torch.Tensor  # (N, 2, 3, H, W)
    ids: torch.Tensor  # (N, L)
    cached: list  # latent-cache rows {"latents", "cond", "index"}
    beta: float = 5000.0
    extra: dict = field(default_factory=dict)


def eager_dpo_loss(model_pred, ref_pred, target, beta):
    """The loss lines of diffusers' train_diffusion_dpo.py (sigmoid), verbatim in structure."""
    model_losses = (model_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()


def eager_dmpo_loss(model_pred, ref_pred, target, beta, alpha=0.01):
    """DMPO written the eager way (DMPO, arXiv:2507.07510, eq. 14), as a user would add it to that script."""
    e = (model_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    with torch.no_grad():
        r = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
    (ew, el), (rw, rl) = e.chunk(2), r.chunk(2)
    u = -0.5 * beta * ((ew - el) - (rw - rl))
    s = torch.sigmoid(u)
    log_1m_alpha, log_alpha = torch.log1p(torch.tensor(-alpha)), torch.log(torch.tensor(alpha))
    return (s * (F.logsigmoid(u) - log_1m_alpha) + (1 - s) * (F.logsigmoid(-u) - log_alpha)).mean()


def make_step(setup: Setup, mode: str, loss_name: str):
    """A closure running one optimiser step of ``mode`` on batch ``i``; returns it and the modules kept."""
    kind, b, dev = setup.kind, setup.pairs, setup.device
    model = setup.model
    full = mode in FULL_MODES
    if full:
        policy = setup.extra.setdefault("full_policy", _full_copy(model))
    else:
        policy = model
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    n_rows = setup.pixels.shape[0]
    dm = DiffusionModel("unet" if kind == "unet" else "sd3", policy, setup.scheduler, [], [])  # predict() only

    def rows(i):
        start = (i * b) % (n_rows - b + 1)
        return list(range(start, start + b))

    if mode in LOOP_MODES:
        return _loop_step(setup, mode, loss_name, opt, rows)

    if mode in ("baseline", "baseline_full"):
        ref_model = _frozen_copy(policy) if full else None
        eager = eager_dpo_loss if loss_name == "dpo" else eager_dmpo_loss

        def step(i):
            idx = rows(i)
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                px = setup.pixels[idx].to(dev)
                px = torch.cat([px[:, 0], px[:, 1]])
                latents = setup.vae.encode(px).latent_dist.sample() * setup.vae.config.scaling_factor
                cond = encode_prompt(setup.text, setup.ids[idx].to(dev), kind)
                cond = {k: torch.cat([v, v]) for k, v in cond.items()}
            noised = add_noise(setup.scheduler, latents, torch.randn_like(latents[:b]), torch.randint(0, 1000, (b,)))
            target = torch.cat([noised.target] * 2) if noised.target.shape[0] == b else noised.target
            model_pred = dm.predict(policy, noised.noisy, noised.timesteps, cond)
            with torch.no_grad():
                if full:
                    ref_pred = dm.predict(ref_model, noised.noisy, noised.timesteps, cond)
                else:
                    policy.disable_adapters()
                    ref_pred = dm.predict(policy, noised.noisy, noised.timesteps, cond)
                    policy.enable_adapters()
            loss = eager(model_pred, ref_pred, target, setup.beta)
            loss.backward()
            opt.step()
            return loss

        kept = [policy, setup.vae, setup.text] + ([ref_model] if full else [])
        return step, kept

    cache = None
    if mode == "cache":  # the reference errors of every row at epoch 0, computed once by the trainer's precompute
        cache = setup.extra.get("ref_cache")
        if cache is None:
            import tempfile
            from types import SimpleNamespace

            with tempfile.TemporaryDirectory() as tmp:
                _, cache = setup.extra["ref_cache"] = precompute(
                    dm, SimpleNamespace(resolution=IMAGE), range(n_rows), seed=0, device=dev, epochs=1,
                    ref_path=os.path.join(tmp, "ref.safetensors"), batch_size=max(b, 8), latents=setup.cached,
                    progress=False)
    ref = make_reference(mode, dm, cache=cache)
    loss_fn = fastpref.dpo_loss if loss_name == "dpo" else fastpref.dmpo_loss

    def step(i):
        idx = rows(i)
        opt.zero_grad(set_to_none=True)
        batch = collate_cached([setup.cached[j] for j in idx])
        x0, cond = encode(dm, batch, 0, dev)
        noised = noise_pairs(dm, x0, idx, 0, 0)
        model_pred, ref_kw = ref(policy, noised, cond, batch)
        if mode == "none":  # reference-free floor: the SFT term every such loss contains
            target = torch.cat([noised.target] * 2) if noised.target.shape[0] == b else noised.target
            loss = (model_pred.float() - target).pow(2).mean()
        else:
            loss = loss_fn(model_pred, target=noised.target, beta=setup.beta, **ref_kw)
        loss.backward()
        opt.step()
        return loss

    kept = [policy] + ([ref.frozen] if mode == "copy" else [])
    return step, kept


class PixelPairs(torch.utils.data.Dataset):
    """The benchmark's image pairs as a trainer dataset: ``{"pixel_values", "caption", "index"}``."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels, self.resolution = pixels, pixels.shape[-1]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "caption": f"a photo of pair {i}", "index": int(i)}


def _loop_step(setup: Setup, mode: str, loss_name: str, opt, rows):
    """The trainer's step (``compute_loss``) on a DiffusionModel of the benchmark's UNet, VAE and text
    encoder with the trainer's CLIP tokenizer; ``loop_cache_latents`` reads the batch from a latent cache
    written once, before timing, by the trainer's precompute."""
    import tempfile
    from types import SimpleNamespace

    from fastpref.train import TrainConfig, compute_loss
    from fastpref.train.cache import LatentCache, latents_fingerprint
    from fastpref.train.data import collate_pairs
    from fastpref.train.models import build_tiny_model
    from fastpref.train.objectives import get_objective

    if setup.kind != "unet":
        raise ValueError("the loop rows run the UNet model only (the trainer's SD3 conditioning differs from the "
                         "benchmark's)")
    dev = setup.device
    tokenizer = build_tiny_model("fastpref:tiny-unet").tokenizers[0]  # CLIP's BPE, 16 tokens (= TEXT_LEN)
    text = setup.text

    class LastHidden(torch.nn.Module):  # encode_prompts reads [0]: the last hidden state
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, ids):
            return (self.encoder(ids).last_hidden_state,)

    dm = DiffusionModel("unet", setup.model, setup.scheduler, [tokenizer], [LastHidden(text)], setup.vae)
    data = PixelPairs(setup.pixels)
    source, collate = data, collate_pairs
    if mode == "loop_cache_latents":
        folder = setup.extra.setdefault("tmp", tempfile.mkdtemp(prefix="fastpref-bench-"))
        path = os.path.join(folder, "latents.safetensors")
        if not os.path.isfile(path):
            precompute(dm, data, range(len(data)), seed=0, device=dev, latents_path=path, progress=False)
        source, collate = LatentCache.load(path, latents_fingerprint(dm, data, range(len(data)), 0)), collate_cached
    reference = make_reference("adapter_off", dm)
    cfg, objective = TrainConfig(loss=loss_name, beta=setup.beta, seed=0), get_objective(loss_name)
    accelerator = SimpleNamespace(device=dev, autocast=contextlib.nullcontext)

    def step(i):
        opt.zero_grad(set_to_none=True)
        batch = collate([source[j] for j in rows(i)])
        out = compute_loss(dm, setup.model, reference, objective, batch, cfg, accelerator)
        out.loss.backward()
        opt.step()
        return out.loss

    return step, [setup.model] + ([setup.vae, setup.text] if mode == "loop" else [])


def _frozen_copy(model):
    import copy

    ref = copy.deepcopy(model).requires_grad_(False).eval()
    return ref


def _full_copy(model):
    """The same weights as a plain (adapter-free) model, every parameter trainable: full fine-tune."""
    import copy

    full = copy.deepcopy(model)
    if tuner_layers(full):
        full.disable_adapters()
        full = _strip_adapters(full)
    return full.requires_grad_(True).train()


def _strip_adapters(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, child_name, child.get_base_layer())
    return model


# ----------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', platform.processor()).strip()} ({fields.get('CPU(s)', '?').strip()} CPUs)"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "cpu"


def run(kind: str, pairs: int, losses, args, device) -> list[dict]:
    import diffusers
    import peft

    model, vae, text, scheduler = build_models(kind, device)
    add_lora(model)
    model.train()
    n_rows = max(4 * pairs, 16)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(n_rows, 2, 3, IMAGE, IMAGE, generator=g) * 2 - 1
    ids = torch.randint(0, 1000, (n_rows, TEXT_LEN), generator=g)
    with torch.no_grad():  # latent-cache rows, built once (as fastpref.train.cache.precompute does)
        cached = []
        for i in range(n_rows):
            lat = vae.encode(pixels[i].to(device)).latent_dist.sample() * vae.config.scaling_factor
            cond = encode_prompt(text, ids[i : i + 1].to(device), kind)
            cached.append({"latents": lat.cpu(), "cond": {k: v[0].cpu() for k, v in cond.items()}, "index": i})
    setup = Setup(kind, pairs, device, model, vae, text, scheduler, pixels, ids, cached)

    modes = [m for m in LORA_MODES + FULL_MODES if m in args.modes and (kind == "unet" or m not in LOOP_MODES)]
    configs = [(m, loss) for m in modes for loss in (losses if m != "none" else ["sft"])]
    steps, kept, mem = {}, {}, {}
    times, cpu_times = {c: [] for c in configs}, {c: [] for c in configs}
    rss = PeakRSS()
    for c in configs:  # build, warm up and measure memory once per config
        steps[c], kept[c] = make_step(setup, *c)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with rss.measure() as box:
            for i in range(args.warmup):
                steps[c](i)
        if device.type == "cuda":
            torch.cuda.synchronize()
            mem[c] = (torch.cuda.max_memory_allocated(device) / 2**20, None)
        else:
            resident = module_mb(*{id(m): m for m in kept[c]}.values())
            mem[c] = (resident + box["delta_mb"], resident, box["delta_mb"])
    for r in range(args.rounds):  # interleaved timing
        for c in configs:
            for i in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.thread_time()
                loss = steps[c](args.warmup + r * args.steps + i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[c].append(time.perf_counter() - t0)
                cpu_times[c].append(time.thread_time() - c0)
                if not torch.isfinite(loss.detach()):
                    raise RuntimeError(f"{kind} {c}: non-finite loss")

    from fastpref.losses import resolve_backend

    rows = []
    dev_name = device_name(device)
    loss_backend = resolve_backend("auto", device)
    for c in configs:
        mode, loss = c
        base = ("baseline_full" if mode in FULL_MODES else "baseline", loss if loss != "sft" else "dpo")
        med = statistics.median(times[c])
        base_med = statistics.median(times[base]) if base in times else float("nan")
        cpu_med = statistics.median(cpu_times[c])
        base_cpu = statistics.median(cpu_times[base]) if base in cpu_times else float("nan")
        peak = mem[c][0]
        base_peak = mem[base][0] if base in mem else float("nan")
        rows.append({
            "model": kind, "pairs": pairs, "mode": mode, "loss": loss,
            "step_ms_median": round(1e3 * med, 2), "step_ms_min": round(1e3 * min(times[c]), 2),
            "cpu_ms_median": round(1e3 * cpu_med, 2),
            "pairs_per_s": round(pairs / med, 2), "time_vs_baseline": round(med / base_med, 3),
            "cpu_time_vs_baseline": round(cpu_med / base_cpu, 3),
            "resident_mb": round(mem[c][1], 2) if mem[c][1] is not None else "",
            "step_peak_mb": round(mem[c][2], 2) if len(mem[c]) > 2 else "",
            "peak_mb": round(peak, 2), "mem_vs_baseline": round(peak / base_peak, 3),
            "device": dev_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__,
            "loss_backend": "eager" if mode.startswith("baseline") or mode == "none" else loss_backend,
        })
        print(" ".join(f"{k}={rows[-1][k]}" for k in COLUMNS[:14]), flush=True)
    return rows


def write(rows, device, command, path: Path | None = None):
    slug = "cuda" if device.type == "cuda" else "cpu"
    path = Path(path or RESULTS / f"train_step_{slug}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    render(path, command)


def render(path: Path, command: str | None = None) -> None:
    """The markdown table of a results CSV (``--render`` redoes it from the CSV alone). Besides the
    median, the fastest step and its ratio: on a shared machine the minimum is the steadier estimate
    of what a step costs (other processes only ever add time)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    mins = {(r["model"], r["pairs"], r["mode"], r["loss"]): float(r["step_ms_min"]) for r in rows}

    def min_ratio(r):
        base = "baseline_full" if r["mode"] in FULL_MODES else "baseline"
        b = mins.get((r["model"], r["pairs"], base, r["loss"] if r["loss"] != "sft" else "dpo"))
        return f"{float(r['step_ms_min']) / b:.3f}" if b else ""

    head = rows[0]
    lines = [
        f"Device: {head['device']}, {head['threads']} thread(s); torch {head['torch']}, diffusers "
        f"{head['diffusers']}, peft {head['peft']}." + (f" Command: `{command}`." if command else ""),
        "",
        "| model | pairs | mode | loss | step ms median | step ms min | CPU ms median | pairs/s (median) "
        "| time vs baseline (median) | (min) | (CPU time) | peak MB | memory vs baseline |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['pairs']} | {r['mode']} | {r['loss']} | {r['step_ms_median']} | {r['step_ms_min']} "
            f"| {r.get('cpu_ms_median', '')} | {r['pairs_per_s']} | {r['time_vs_baseline']} | {min_ratio(r)} "
            f"| {r.get('cpu_time_vs_baseline', '')} | {r['peak_mb']} | {r['mem_vs_baseline']} |"
        )
    Path(path).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path} and {Path(path).with_suffix('.md')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet", "sd3"], choices=["unet", "sd3"])
    parser.add_argument("--pairs", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--losses", nargs="+", default=["dpo", "dmpo"], choices=["dpo", "dmpo"])
    parser.add_argument("--modes", nargs="+", default=list(LORA_MODES + FULL_MODES), choices=LORA_MODES + FULL_MODES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--render", type=Path, help="only rewrite the markdown table of this results CSV")
    parser.add_argument("--command", help="with --render: the command that produced the CSV")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable timings on a shared machine; OpenMP spin-waits "
                        "degrade badly when other processes hold the cores)")
    parser.add_argument("--output", type=Path, help="results CSV (default benchmarks/results/train_step_<device>.csv)")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.command)
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for need in ("baseline",):
        if need not in args.modes:
            args.modes.append(need)
    if any(m in FULL_MODES for m in args.modes) and "baseline_full" not in args.modes:
        args.modes.append("baseline_full")
    device = torch.device(args.device)
    rows = []
    for kind in args.models:
        for pairs in args.pairs:
            rows += run(kind, pairs, args.losses, args, device)
    write(rows, device, "python -m benchmarks.train_step " + " ".join(argv if argv is not None else sys.argv[1:]),
          args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
