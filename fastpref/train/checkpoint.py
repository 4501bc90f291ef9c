"""Checkpoints: save crash-safely, find the latest complete one, resume.

A checkpoint ``output_dir/checkpoint-N/`` holds what ``accelerator.save_state`` writes (optimizer,
LR scheduler, one RNG file per process) plus the trained part of the model — the LoRA adapters
(``adapter_model.safetensors``, peft's state dict) or the full denoiser (``denoiser/``) — and
``trainer_state.json``: the step, the settings a resume must match, and the size of every file
the checkpoint holds.

Crash safety: everything is written into ``output_dir/.tmp-checkpoint-N/``; ``trainer_state.json``
comes last, and only then is the folder renamed to ``checkpoint-N`` (``os.replace``, atomic on one
file system). A process killed during a save leaves a temporary folder that nothing reads (the next
save removes it). ``--resume_from_checkpoint latest`` takes the newest checkpoint whose files are all
present with the sizes ``trainer_state.json`` lists, and warns about each newer one it skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

__all__ = ["list_checkpoints", "checkpoint_problems", "find_latest_checkpoint", "register_model_hooks",
           "save_checkpoint", "load_checkpoint", "STATE_FILE"]

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")
_TMP_PREFIX = ".tmp-"


def list_checkpoints(output_dir: str) -> list[str]:
    """Every ``checkpoint-N`` folder in ``output_dir``, oldest (smallest N) first, complete or not."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if _NAME.fullmatch(d) and os.path.isdir(os.path.join(output_dir, d))]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(_NAME.fullmatch(d).group(1)))]


def checkpoint_problems(path: str) -> list[str]:
    """Why ``path`` cannot be resumed from (empty: it is complete)."""
    state_path = os.path.join(path, STATE_FILE)
    try:
        with open(state_path) as fh:
            state = json.load(fh)
    except FileNotFoundError:
        return [f"{STATE_FILE} is missing"]
    except (OSError, ValueError) as exc:
        return [f"{STATE_FILE} is unreadable ({exc})"]
    problems = []
    for name, size in state.get("files", {}).items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            problems.append(f"{name} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{name} has {os.path.getsize(full)} bytes, {size} expected")
    return problems


def find_latest_checkpoint(output_dir: str, *, warn: bool = True) -> str | None:
    """The newest complete checkpoint in ``output_dir`` (None if there is none); an incomplete newer
    one (a save that was killed before the atomic rename existed, a file deleted since) is skipped
    with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        if warn:
            warnings.warn(f"--resume_from_checkpoint latest: skipping incomplete checkpoint {path} "
                          f"({'; '.join(problems)})", stacklevel=2)
    return None


def register_model_hooks(accelerator, is_lora: bool) -> None:
    """What ``save_state`` / ``load_state`` do with the model: the LoRA adapters (peft state dict) or
    the full denoiser in diffusers' folder format — never a pickle of the whole module."""

    def save_hook(models, weights, out_dir):
        if accelerator.is_main_process:
            for m in models:
                m = accelerator.unwrap_model(m)
                if is_lora:
                    from peft.utils import get_peft_model_state_dict
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(m).items()},
                              os.path.join(out_dir, "adapter_model.safetensors"))
                else:
                    m.save_pretrained(os.path.join(out_dir, "denoiser"))
        while weights:  # accelerate would pickle them otherwise
            weights.pop()

    def load_hook(models, in_dir):
        while models:
            m = accelerator.unwrap_model(models.pop())
            if is_lora:
                from peft.utils import set_peft_model_state_dict
                from safetensors.torch import load_file

                set_peft_model_state_dict(m, load_file(os.path.join(in_dir, "adapter_model.safetensors")))
            else:
                loaded = type(m).from_pretrained(os.path.join(in_dir, "denoiser"))
                m.load_state_dict(loaded.state_dict())
                del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _files(folder: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = os.path.getsize(full)
    return dict(sorted(out.items()))


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, total_limit: int | None = None) -> str:
    """Write ``output_dir/checkpoint-{step}`` through a temporary folder (every process takes part:
    each writes its RNG state); ``state`` goes into ``trainer_state.json``. Then keep only the
    ``total_limit`` newest checkpoints. Returns the checkpoint's path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}checkpoint-{step}")
    if accelerator.is_main_process:
        for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
            if name.startswith(_TMP_PREFIX + "checkpoint-"):  # left by a save that was killed
                shutil.rmtree(os.path.join(output_dir, name))
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process's files are in tmp
    if accelerator.is_main_process:
        files = _files(tmp)  # before trainer_state.json exists: it does not list itself
        with open(os.path.join(tmp, STATE_FILE), "w") as fh:
            json.dump({**state, "global_step": step, "files": files}, fh, indent=1)
        if os.path.isdir(final):  # the same step saved again (a run resumed from an earlier checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, resume_from: str, output_dir: str, expected: dict) -> dict | None:
    """Restore the state of ``resume_from`` (a checkpoint folder, or ``latest`` = the newest complete
    one in ``output_dir``) and return its ``trainer_state.json``; None when ``latest`` finds nothing.
    ``expected``: settings the checkpoint must have been written with (e.g. the loss)."""
    if resume_from == "latest":
        path = find_latest_checkpoint(output_dir, warn=accelerator.is_main_process)
        if path is None:
            accelerator.print(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; "
                              "starting a new run")
            return None
    else:
        path = resume_from
        problems = checkpoint_problems(path)
        if problems:
            raise ValueError(f"--resume_from_checkpoint {path} is incomplete ({'; '.join(problems)}); "
                             "pass another checkpoint or 'latest'")
    with open(os.path.join(path, STATE_FILE)) as fh:
        state = json.load(fh)
    differ = {k: state[k] for k, v in expected.items() if k in state and state[k] != v}
    if differ:
        written = " ".join(f"--{k} {v}" for k, v in differ.items())
        raise ValueError(f"--resume_from_checkpoint {path}: it was written with {written}; "
                         "resume with the same settings")
    accelerator.load_state(path)
    accelerator.print(f"resumed from {path} at step {state['global_step']}")
    return state
