"""Peak memory of one training step: every embedded model × reference mode × gradient checkpointing.

    python -m benchmarks.memory                                   # every models.TINY_MODELS entry
    python -m benchmarks.memory --models fastpref:tiny-unet --quick --pairs 4 --output /tmp/m.csv  # the test's

The step is the trainer's own: :func:`fastpref.train.compute_loss` (text encoders, noise, the policy and the
reference mode, the ``--loss`` objective) → backward → gradient clipping → AdamW step, on a model placed as
:func:`fastpref.train.train` places it (LoRA rank 8 on the attention projections, or a full fine-tune; fp32 on
a CPU). Rows: LoRA × ``adapter_off``, ``batched``, ``copy``, ``cache`` (``--loss dpo``) and ``none``
(``--loss mapo``, the reference-free loss that allows it), and the full fine-tune × ``copy``; each with
``--gradient_checkpointing`` off and on. The embedded models come from ``models.TINY_MODELS``, so a new
family's tiny model appears here without an edit.

How a CPU step's peak is measured: **each configuration in a fresh process**, forked from the runner after its
imports and before it builds anything — not with ``torch.profiler``'s memory timeline, which sees only
allocations made through PyTorch's allocator and whose own bookkeeping grows the process; the process measures
what the operating system charges (its resident set), with nothing left from another configuration
(allocator free lists, lazily built kernels, a reference copy). In the process: glibc is told to return freed
memory at once (``mallopt``: blocks ≥ 64 KiB are mmap'ed, no trim threshold — otherwise glibc keeps the
warm-up step's freed blocks and the measured step reuses them unseen), everything is built, one warm-up step
runs (it creates the optimiser state and the lazily initialised parts), glibc's free heap pages are released
(``malloc_trim``: also those inherited from the runner), the kernel's peak-RSS counter is reset
(``echo 5 > /proc/self/clear_refs``: VmHWM := VmRSS), the measured step runs, VmHWM is read.
``step_peak_mib = VmHWM − VmRSS before the step``: activations kept for backward, gradients, the reference's
prediction, temporaries — with what is not the step subtracted (imports, weights, the frozen copy, optimiser
state, data; those are in ``before_step_mib``, which also holds the shared imports).

Writes ``benchmarks/results/memory_cpu.csv`` and ``.md`` (or ``--output PATH.csv`` and ``PATH.md``).
``--estimate`` prints the 80 GB GPU estimate for SDXL and Flux (benchmarks/RESULTS.md, "Trainer memory").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["model", "family", "training", "mode", "loss", "gradient_checkpointing", "pairs", "resolution",
           "trained_params", "before_step_mib", "step_peak_mib", "step_cpu_s", "device", "threads", "torch",
           "diffusers", "load_avg"]
LORA_MODES = (("adapter_off", "dpo"), ("batched", "dpo"), ("copy", "dpo"), ("cache", "dpo"), ("none", "mapo"))
FULL_MODES = (("copy", "dpo"),)


def configurations(models, quick: bool) -> list[dict]:
    """The rows to measure; ``quick``: LoRA ``adapter_off`` only (the test's run)."""
    lora = LORA_MODES[:1] if quick else LORA_MODES
    out = []
    for model in models:
        for training, modes in (("lora", lora), ("full", () if quick else FULL_MODES)):
            for mode, loss in modes:
                for gc in (False, True):
                    out.append({"model": model, "training": training, "mode": mode, "loss": loss,
                                "gradient_checkpointing": gc})
    return out


# ----------------------------------------------------------------------------------------------
# One configuration (in its own process)
# ----------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_one(spec: dict) -> dict:
    """Build the configuration ``spec``, run a warm-up step, and measure the next step's peak (see above)."""
    import tempfile

    import torch

    from fastpref.train import TrainConfig, compute_loss
    from fastpref.train.cache import precompute
    from fastpref.train.data import SyntheticPreferences, collate_pairs
    from fastpref.train.memory import build_optimizer, enable_gradient_checkpointing
    from fastpref.train.models import LORA_TARGET_MODULES, load_model
    from fastpref.train.objectives import get_objective
    from fastpref.train.reference import make_reference

    torch.set_num_threads(spec["threads"])
    pairs, lora = spec["pairs"], spec["training"] == "lora"
    cfg = TrainConfig(loss=spec["loss"], lora_rank=8 if lora else 0, seed=0, beta=50.0,
                      gradient_checkpointing=spec["gradient_checkpointing"], reference_mode=spec["mode"])
    model = load_model(spec["model"])
    denoiser = model.denoiser
    for m in model.frozen_modules():
        m.requires_grad_(False).eval()
    if lora:
        from peft import LoraConfig

        denoiser.requires_grad_(False)
        denoiser.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGET_MODULES))
    else:
        denoiser.requires_grad_(True)
    denoiser.train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(denoiser)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    data = SyntheticPreferences(2 * pairs, model.resolution, seed=0)
    data.resolution = model.resolution
    cache = None
    with tempfile.TemporaryDirectory() as tmp:
        if spec["mode"] == "cache":
            _, cache = precompute(model, data, range(2 * pairs), seed=0, device="cpu", epochs=1,
                                  ref_path=os.path.join(tmp, "ref.safetensors"), batch_size=pairs, progress=False)
    reference = make_reference(spec["mode"], model, cache=cache)
    optimizer = build_optimizer(cfg, params)
    objective = get_objective(cfg.loss)
    accelerator = type("CPU", (), {"device": torch.device("cpu"), "autocast": staticmethod(contextlib.nullcontext)})
    batches = [collate_pairs([data[i] for i in range(k * pairs, (k + 1) * pairs)]) for k in (0, 1)]

    def step(batch):
        batch["epoch"] = 0
        out = compute_loss(model, denoiser, reference, objective, batch, cfg, accelerator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    step(batches[0])  # warm-up: optimiser state, lazily initialised kernels
    _trim()  # free heap pages (the warm-up's, or inherited from the runner) leave the resident set
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    c0 = time.thread_time()
    loss = step(batches[1])
    cpu_s = time.thread_time() - c0
    peak = _status_kib("VmHWM")
    if not torch.isfinite(loss):
        raise RuntimeError(f"{spec}: non-finite loss")
    return {"family": model.family, "resolution": model.resolution, "trained_params": sum(p.numel() for p in params),
            "before_step_mib": round(before / 1024, 1), "step_peak_mib": round((peak - before) / 1024, 2),
            "step_cpu_s": round(cpu_s, 3)}


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


def _set_malloc() -> None:
    """glibc: mmap every block ≥ 64 KiB and trim the heap at once, so freed memory leaves the resident set."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 0)


def _trim() -> None:
    """``malloc_trim(0)``: glibc returns the free pages of its heaps to the kernel (``madvise``), so a step that
    reuses them faults them in again and is seen."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _child(spec: dict, queue) -> None:
    try:
        _set_malloc()
        queue.put(measure_one(spec))
    except BaseException:  # noqa: BLE001 - hand the traceback to the runner
        import traceback

        queue.put({"error": traceback.format_exc()})


def run(configs: list[dict], pairs: int, threads: int) -> list[dict]:
    import multiprocessing

    import diffusers
    import peft  # noqa: F401 - imported once here, shared by every forked measurement
    import torch

    import fastpref.train  # noqa: F401
    from benchmarks.harness import device_name, load_avg

    rows = []
    device = device_name(torch.device("cpu"))
    ctx = multiprocessing.get_context("fork")
    for spec in configs:
        spec = {**spec, "pairs": pairs, "threads": threads}
        queue = ctx.SimpleQueue()
        proc = ctx.Process(target=_child, args=(spec, queue))
        proc.start()
        result = queue.get()
        proc.join()
        if "error" in result:
            raise RuntimeError(f"{spec} failed:\n{result['error']}")
        row = {**{k: spec[k] for k in ("model", "training", "mode", "loss", "gradient_checkpointing", "pairs")},
               **result, "device": device, "threads": threads, "torch": torch.__version__,
               "diffusers": diffusers.__version__, "load_avg": round(load_avg(), 1)}
        rows.append(row)
        print(" ".join(f"{k}={row[k]}" for k in COLUMNS[:12]), flush=True)
    return rows


def write(rows: list[dict], command: str, path: Path | None = None) -> Path:
    path = Path(path or RESULTS / "memory_cpu.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    render(path, command)
    return path


def render(path: Path, command: str | None = None) -> str:
    """The markdown table of a results CSV: one row per (model, training, mode), checkpointing off | on."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["model"], r["training"], r["mode"], r["gradient_checkpointing"]): r for r in rows}
    head = rows[0]
    loads = [float(r["load_avg"]) for r in rows]
    lines = [
        f"Device: {head['device']}, {head['threads']} torch thread(s); torch {head['torch']}, diffusers "
        f"{head['diffusers']}; {head['pairs']} pairs per step; load average {min(loads):.1f}–{max(loads):.1f}."
        + (f" Command: `{command}`." if command else ""),
        "",
        "| model | training | reference mode | loss | before the step MiB | step peak MiB, no checkpointing "
        "| step peak MiB, `--gradient_checkpointing` | ratio | step CPU s (off → on) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen = []
    for r in rows:
        key = (r["model"], r["training"], r["mode"])
        if key in seen:
            continue
        seen.append(key)
        off, on = by.get((*key, "False")), by.get((*key, "True"))
        if off is None or on is None:
            continue
        ratio = float(on["step_peak_mib"]) / float(off["step_peak_mib"]) if float(off["step_peak_mib"]) > 0 else 0
        lines.append(f"| {key[0]} ({off['family']}, {off['resolution']}²) | {key[1]} | {key[2]} | {off['loss']} "
                     f"| {off['before_step_mib']} | {off['step_peak_mib']} | {on['step_peak_mib']} | {ratio:.2f} "
                     f"| {off['step_cpu_s']} → {on['step_cpu_s']} |")
    text = "\n".join(lines) + "\n"
    Path(path).with_suffix(".md").write_text(text)
    print(f"wrote {path} and {Path(path).with_suffix('.md')}")
    return text


def main(argv=None) -> int:
    from fastpref.train.models import TINY_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TINY_MODELS), choices=TINY_MODELS)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (2 × as many images)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each measurement")
    parser.add_argument("--quick", action="store_true", help="LoRA adapter_off only, checkpointing off and on")
    parser.add_argument("--output", type=Path, help="results CSV (default benchmarks/results/memory_cpu.csv)")
    parser.add_argument("--render", type=Path, help="only rewrite the markdown table of this results CSV")
    parser.add_argument("--command", help="with --render: the command that produced the CSV")
    parser.add_argument("--estimate", action="store_true", help="print the SDXL / Flux 80 GB GPU estimate")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.command)
        return 0
    if args.estimate:
        from benchmarks.memory_estimate import report

        print(report())
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("benchmarks.memory measures the resident set through /proc (Linux)")
    rows = run(configurations(args.models, args.quick), args.pairs, args.threads)
    write(rows, " ".join(["python -m benchmarks.memory", *(argv if argv is not None else sys.argv[1:])]), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
