"""How the processes of a run are set up, and the line that says so before anything slow starts.

Launchers tell a process about its peers through the environment (torchrun and ``accelerate launch
--multi_gpu``: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``; mpirun: ``PMI_SIZE`` / ``OMPI_COMM_WORLD_SIZE``).
accelerate turns that into a distributed job only when it finds a GPU (NCCL) or when told to use the
CPU (``ACCELERATE_USE_CPU=1``, ``Accelerator(cpu=True)``: gloo). Without either, every process of a
``torchrun --nproc_per_node 2`` on a GPU-less machine would run the whole job alone, all into the same
output folder. So: several processes and no accelerator device → the CPU with gloo; and if accelerate
still does not see every launched process, stop with the command that works.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["launched_processes", "build_accelerator", "start_line", "CPU_COMMAND"]

CPU_COMMAND = "torchrun --nproc_per_node N -m fastpref.train ..."


def launched_processes() -> int:
    """The number of processes the launcher started (1 without a launcher), read from the
    environment the way accelerate reads it."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name)
        if value:
            return int(value)
    return 1


def _has_accelerator_device() -> bool:
    accel = getattr(torch, "accelerator", None)  # CUDA, ROCm, XPU, MPS, … (torch ≥ 2.6)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def build_accelerator(**kwargs):
    """An ``Accelerator`` that sees every launched process, or a ValueError naming the command that works.

    ``kwargs`` go to ``Accelerator``. accelerate keeps process-wide singletons; the per-run part
    (mixed precision, gradient accumulation) is reset here so that a second ``train()`` in one process
    (tests, notebooks) may use other settings. The distributed part (``PartialState``) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import parse_flag_from_env

    launched = launched_processes()
    if launched == 1 and parse_flag_from_env("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR"):
        # `accelerate launch --cpu --num_processes N` sets these and starts ONE process (accelerate runs
        # several CPU processes only through mpirun): the run is correct, but not what was asked for.
        warnings.warn("one process: `accelerate launch --cpu` starts a single process whatever --num_processes "
                      f"says; for N processes on the CPU run `{CPU_COMMAND}` (see docs/trainer-launch.md)",
                      stacklevel=2)
    cpu = launched > 1 and not _has_accelerator_device()
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(cpu=cpu, **kwargs)
    if accelerator.num_processes != launched:
        raise ValueError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value} on {accelerator.device}): each would train alone. On GPUs use "
            "`accelerate launch --multi_gpu --num_processes N -m fastpref.train ...` (one process per GPU); "
            f"on the CPU `{CPU_COMMAND}` or `ACCELERATE_USE_CPU=1 {CPU_COMMAND}`")
    return accelerator


def start_line(accelerator, cfg, *, model_name: str, reference: str, train_pairs: int, eval_pairs: int,
               skipped: dict) -> str:
    """One line, printed before any model is loaded: processes, device, model, loss, data, skips."""
    n = accelerator.num_processes
    procs = f"{n} process{'es' if n > 1 else ''}"
    if n > 1:
        procs += f" ({accelerator.distributed_type.value}, {accelerator.state.backend})"
    per_update = cfg.train_batch_size * cfg.gradient_accumulation_steps * n
    what = f"LoRA r={cfg.lora_rank}" if cfg.is_lora else "full fine-tune"
    skips = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "none"
    return (f"fastpref-train: {procs} on {accelerator.device}; model {model_name} ({what}, reference {reference}); "
            f"loss {cfg.loss}; data {cfg.dataset}: {train_pairs} training pairs, {eval_pairs} held out, "
            f"skipped: {skips}; "
            f"{per_update} pairs per update ({cfg.train_batch_size} × {cfg.gradient_accumulation_steps} accumulated "
            f"× {n}); output {cfg.output_dir}")
