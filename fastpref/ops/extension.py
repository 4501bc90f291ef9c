"""Build, load and cache the C++ extension of the fused pair-loss op (``csrc/``).

The extension is compiled by :func:`torch.utils.cpp_extension.load` (ninja) the first time a
C++/CUDA backend is asked for — never at import — and cached on disk: ``$TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions/<python>_<cuda>/fastpref_C*`` (``_cuda`` with the CUDA sources,
``_avx2`` when compiled for AVX2). The build (~45 s for the CPU
sources on a 2-core machine) happens once per machine; torch rebuilds it only when a source file or
a flag changes, and a file lock serialises concurrent builds. Where CUDA is available (and
``CUDA_HOME`` found) the CUDA sources are compiled into the same library, so one ``fastpref::``
op runs on both devices.

Loading registers the ops ``torch.ops.fastpref.pair_loss_fwd`` / ``pair_loss_bwd`` (schemas:
``csrc/ops.cpp``, autograd: ``csrc/autograd.cpp``); :mod:`fastpref.ops.library` then adds their fake
implementations.
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
    """The files of the extension: the op schemas, their autograd, the CPU kernels, and the CUDA
    kernels if asked."""
    files = [CSRC / "ops.cpp", CSRC / "autograd.cpp", CSRC / "cpu" / "pair_loss_cpu.cpp"]
    if with_cuda:
        files.append(CSRC / "cuda" / "pair_loss_cuda.cu")
    return [str(f) for f in files]


#: what x86 vector code the C++ sources are compiled for when ATen detects AVX2 (or better) here:
#: at::vec's AVX2 specialisations (8 fp32 lanes, F16C conversions, FMA)
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def cpu_capability() -> str:
    """``"avx2"`` when ATen reports AVX2 or AVX-512 on this machine (and x86), else ``"default"``."""
    import platform

    cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "avx2" if x86 and cap.upper().startswith(("AVX2", "AVX512")) else "default"


def build_flags() -> dict:
    """Compiler flags: -O3 and OpenMP (at::parallel_for is OpenMP in PyTorch's builds and only
    parallelises code compiled with -fopenmp), and AVX2/FMA/F16C where this machine has them. No
    -march=native: the build cache may be shared, so the vector ISA is part of the library's name
    (:func:`library_name`) and a machine without AVX2 builds and loads its own portable copy."""
    cflags = ["-O3", "-fopenmp"] + (AVX2_FLAGS if cpu_capability() == "avx2" else [])
    return dict(extra_cflags=cflags, extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"])


def library_name(with_cuda: bool) -> str:
    return NAME + ("_cuda" if with_cuda else "") + ("_avx2" if cpu_capability() == "avx2" else "")


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
        name=library_name(with_cuda),
        sources=sources(with_cuda),
        is_python_module=False,  # the library registers torch.ops.fastpref.*; no Python module
        verbose=os.environ.get("FASTPREF_VERBOSE_BUILD", "0") == "1",
        **build_flags(),
    )


def _reason(exc: Exception) -> str:
    """One line: the compiler's complaint where there is one (torch's message ends in ninja's)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    hit = next((line for line in lines if "not found" in line or "error:" in line.lower()), lines[-1])
    return f"{type(exc).__name__}: {hit[:300]}"


def _build_with_cpu_fallback() -> None:
    if not _wants_cuda():
        build(with_cuda=False)
        return
    try:
        build(with_cuda=True)
    except Exception as exc:  # a CUDA toolkit that does not fit this torch: keep the CPU op
        warnings.warn(f"fastpref: the CUDA sources did not build ({type(exc).__name__}); building the CPU op only",
                      RuntimeWarning, stacklevel=4)  # fmt: skip
        build(with_cuda=False)


def load() -> bool:
    """Build (first time on this machine) and load the extension; True on success. Never raises:
    the failure reason is kept for :func:`unavailable_reason`."""
    global _state
    if _state is None:
        try:
            _build_with_cpu_fallback()
            from fastpref.ops import library

            library.register()
            _state = (True, None)
        except Exception as exc:  # no compiler, no ninja, a compile error: fall back, say why
            _state = (False, _reason(exc))
            warnings.warn(
                "fastpref: the C++ extension could not be built, so the CPU backend falls back to the PyTorch "
                f"reference ({_state[1]}). Install a C++ compiler and ninja to get it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state[0]


# (the _state it was read under, {device type: has a kernel}): the dispatcher query costs more
# than the rest of a small call's front end, and its answer changes only when the library does
_kernels: tuple[tuple[bool, str | None] | None, dict[str, bool]] = (None, {})


@torch.compiler.assume_constant_result  # evaluated once at trace time: no graph break, no build inside a graph
def has_kernel(device_type: str) -> bool:
    """True when the loaded library has a kernel for ``device_type`` (``"cpu"`` or ``"cuda"``); the
    first call may build it."""
    global _kernels
    if not load():
        return False
    if _kernels[0] is not _state:
        _kernels = (_state, {})
    known = _kernels[1]
    if device_type not in known:
        known[device_type] = torch._C._dispatch_has_kernel_for_dispatch_key(
            "fastpref::pair_loss_fwd", device_type.upper()
        )
    return known[device_type]


def available() -> bool:
    """True when the extension is (or can be) built and loaded. The first call may build it."""
    return load()


def unavailable_reason() -> str | None:
    """Why the extension could not be loaded (None if it was, or was not tried yet)."""
    return None if _state is None else _state[1]
