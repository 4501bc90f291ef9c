"""csrc/cuda by inspection: every CUDA kernel instantiation for fp32/bf16/fp16 inputs compiles for sm_80
and sm_90 with no register spill, and the streaming kernels keep 4 resident blocks of 256 threads per SM (≤ 64 registers), as
the Triton twins (tests/test_kernels_compile_for_gpu.py). ``nvcc -Xptxas -v`` on a machine with no
GPU; skipped where no CUDA toolkit is installed."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "90")
THREADS = 256  # kThreads in csrc/cuda/pair_loss_cuda.cu
DESIGN_BLOCKS_PER_SM = 4


def _nvcc():
    from torch.utils import cpp_extension

    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", cpp_extension.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _ptxas_report(tmp_path) -> str:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")] + [f"-I{sys.base_prefix}/include"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    # device code only (-fatbin): no host compilation, ptxas runs once per target
    cmd = [_nvcc(), "-fatbin", str(ROOT / "csrc" / "cuda" / "pair_loss_cuda.cu"), "-o", str(tmp_path / "k.fatbin"),
           "-std=c++20", "-O3", "-Xptxas", "-v", abi, *cpp_extension.COMMON_NVCC_FLAGS, *gencode, *includes]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _kernels(report: str):
    """(arch, mangled kernel name, registers, spill stores, spill loads) per compiled function."""
    out, name, arch = [], None, None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
            name, arch = m.group(1), m.group(2)
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and name:
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            out.append((arch, name, int(m.group(1)), *spills))
            name = None
    return out


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is a CPU-only build: no CUDA headers to compile against")
@pytest.mark.skipif(_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_kernels_have_no_spills_and_keep_occupancy(tmp_path):
    kernels = _kernels(_ptxas_report(tmp_path))
    for arch in ARCHS:
        names = [k for k in kernels if k[0] == arch]
        # 4 dtypes × (2 vector widths) × 4 forms of the partials, 4 × 2 of the backward, 2 finalize
        assert len(names) >= 20, kernels
    # fp64 (template argument "d") is not a training dtype: its finalize calls fp64 libdevice
    # functions whose call frames ptxas counts as spill stores (24 bytes on sm_80); not held to it
    spilled = [k for k in kernels if (k[3] or k[4]) and not re.search(r"kernelIdE", k[1])]
    assert not spilled, spilled
    limit = 65536 // (DESIGN_BLOCKS_PER_SM * THREADS)
    # the streaming kernels in the training dtypes (fp64 needs two registers a value: not held to it)
    streaming = [k for k in kernels if re.search(r"pair_err_\w+_kernelI(f|N3c104HalfE|N3c108BFloat16E)", k[1])]
    assert streaming, kernels
    hungry = [k for k in streaming if k[2] > limit]
    assert not hungry, f"streaming kernels above {limit} registers (fewer than {DESIGN_BLOCKS_PER_SM} blocks/SM): {hungry}"
