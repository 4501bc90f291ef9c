"""Checks that run after the data is indexed and before any model is loaded, so that a run which
cannot finish stops in seconds with one message instead of after its training steps."""

from __future__ import annotations

import os
import tempfile

from fastpref.train.data import describe_skips

__all__ = ["check_output_dir", "check_validation_prompts", "preflight"]


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` exists (it is created) and a file can be written in it."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".fastpref-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"--output_dir {output_dir!r} is not writable ({exc.strerror or exc}); "
                         "choose a folder you can write to") from None


def check_validation_prompts(prompts: list[str], dataset) -> None:
    """Every validation prompt can be scored by the dataset's reward (when it has one)."""
    unscorable = getattr(dataset, "unscorable", None)
    bad = unscorable(prompts) if unscorable is not None else []
    if bad:
        example = dataset.prompts()[0] if hasattr(dataset, "prompts") else None
        raise ValueError(f"--validation_prompts: the {type(dataset).__name__} reward cannot score {bad!r} "
                         "(a prompt must name exactly one palette colour as a word"
                         + (f", e.g. {example!r})" if example else ")"))


def preflight(cfg, dataset, prompts: list[str], log=print, *, writes: bool = True) -> None:
    """All checks of a run that need no model; ``log`` receives the data problems worth reading.
    ``writes``: this process writes the outputs (process 0 of a job), so it checks ``--output_dir``."""
    if writes:
        check_output_dir(cfg.output_dir)
    check_validation_prompts(prompts, dataset)
    if getattr(dataset, "problems", None):
        log(f"data: skipped {describe_skips(dataset)}")
