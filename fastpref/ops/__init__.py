"""Kernels, one file per kernel family. Importing this package imports no kernel module (and so
queries no GPU); :func:`triton_available` tells whether the Triton family can be imported."""

from __future__ import annotations

import functools
import importlib.util

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package is installed (it is on Linux; not on macOS/Windows)."""
    return importlib.util.find_spec("triton") is not None
