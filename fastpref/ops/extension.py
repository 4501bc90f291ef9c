"""Build, load and cache the C++ extension of the fused pair-loss op (``csrc/``).

The extension is compiled by :func:`torch.utils.cpp_extension.load` (ninja) the first time a
C++/CUDA backend is asked for — never at import — and cached on disk: ``$TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions/<python>_<cuda>/fastpref_C``. The build (~45 s for the CPU
sources on a 2-core machine) happens once per machine; torch rebuilds it only when a source file or
a flag changes, and a file lock serialises concurrent builds. Where CUDA is available (and
``CUDA_HOME`` found) the CUDA sources are compiled into the same library, so one ``fastpref::``
op runs on both devices.

Loading registers the ops ``torch.ops.fastpref.pair_loss_fwd`` / ``pair_loss_bwd`` (schemas:
``csrc/ops.cpp``); :mod:`fastpref.ops.library` then adds their fake implementations and autograd.
If the build fails (no compiler, no ninja, no ``csrc/`` in a wheel install) the reason is kept,
:func:`available` returns False and ``backend="auto"`` falls back to the PyTorch reference with one
warning.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

__all__ = ["CSRC", "available", "has_kernel", "unavailable_reason", "load", "build", "sources", "build_flags"]

logger = logging.getLogger(__name__)

#: the C++/CUDA sources (present in a source checkout / editable install)
CSRC = Path(__file__).resolve().parents[2] / "csrc"
NAME = "fastpref_C"

# (loaded, failure reason): None until the first attempt
_state: tuple[bool, str | None] | None = None


def sources(with_cuda: bool) -> list[str]:
    """The files of the extension: the op schemas, the CPU kernels, and the CUDA kernels if asked."""
    files = [CSRC / "ops.cpp", CSRC / "cpu" / "pair_loss_cpu.cpp"]
    if with_cuda:
        files.append(CSRC / "cuda" / "pair_loss_cuda.cu")
    return [str(f) for f in files]


def build_flags() -> dict:
    """Compiler flags: -O3 and OpenMP (at::parallel_for is OpenMP in PyTorch's builds and only
    parallelises code compiled with -fopenmp). No -march=native: the cache may be shared."""
    return dict(extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"])


def _wants_cuda() -> bool:
    from torch.utils import cpp_extension

    return torch.cuda.is_available() and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def build(with_cuda: bool) -> None:
    """Compile (or find in the cache) and load the library; raises on failure."""
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    if not (CSRC / "ops.cpp").is_file():
        raise FileNotFoundError(f"the C++ sources are not at {CSRC} (install fastpref from a source checkout)")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    logger.info("fastpref: building the C++ extension (once per machine; cached under %s)", root)
    cpp_extension.load(
        name=NAME + ("_cuda" if with_cuda else ""),
        sources=sources(with_cuda),
        is_python_module=False,  # the library registers torch.ops.fastpref.*; no Python module
        verbose=os.environ.get("FASTPREF_VERBOSE_BUILD", "0") == "1",
        **build_flags(),
    )


def load() -> bool:
    """Build (first time on this machine) and load the extension; True on success. Never raises:
    the failure reason is kept for :func:`unavailable_reason`."""
    global _state
    if _state is None:
        try:
            build(_wants_cuda())
            from fastpref.ops import library

            library.register()
            _state = (True, None)
        except Exception as exc:  # no compiler, no ninja, a compile error: fall back, say why
            _state = (False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
            warnings.warn(
                "fastpref: the C++ extension could not be built, so the CPU backend falls back to the PyTorch "
                f"reference ({_state[1]}). Install a C++ compiler and ninja to get it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state[0]


@torch.compiler.assume_constant_result  # evaluated once at trace time: no graph break, no build inside a graph
def has_kernel(device_type: str) -> bool:
    """True when the loaded library has a kernel for ``device_type`` (``"cpu"`` or ``"cuda"``); the
    first call may build it."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key("fastpref::pair_loss_fwd", device_type.upper())


def available() -> bool:
    """True when the extension is (or can be) built and loaded. The first call may build it."""
    return load()


def unavailable_reason() -> str | None:
    """Why the extension could not be loaded (None if it was, or was not tried yet)."""
    return None if _state is None else _state[1]
