"""Kernels, one file per kernel family. Importing this package imports no kernel module (and so
queries no GPU); :func:`triton_available` tells whether the Triton family can be imported."""

from __future__ import annotations

import functools
import importlib.util

import torch

__all__ = ["triton_available"]


@torch.compiler.assume_constant_result  # under torch.compile: a constant, not a traced find_spec
def triton_available() -> bool:
    """True when the ``triton`` package is installed (it is on Linux; not on macOS/Windows)."""
    return _find_triton()


@functools.lru_cache(maxsize=None)
def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # an import hook that refuses triton, a half-removed module
        return False
