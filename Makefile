# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (pinned CPU-capable install, see requirements.txt) on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastpref-installed

export HF_HUB_OFFLINE := 1

.PHONY: install test demo demo-toy2d demo-train clean

$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

# The Triton kernels run on the CPU through the interpreter when no GPU is present
# (tests/conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported).
# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m pytest -q tests

# The mutation check of the tests (tools/mutants.py): realistic one-line bugs in the kernels, the C++ op,
# the API and the trainer, each applied to a scratch copy; every one must make its tests fail. Not part
# of `make test` (tens of minutes on 2 cores). MUTANTS_ARGS="--only T1 C2" runs some, "--list" lists them.
.PHONY: mutants
mutants: $(STAMP)
	$(PY) tools/mutants.py $(MUTANTS_ARGS)

# `make demo`: both embedded jobs on the CPU, nothing downloaded. `demo-toy2d`: DMPO's 2-D study (Li et
# al., 2025, arXiv:2507.07510, §5.1): table, CSV and PNG. `demo-train`: the trainer on its embedded tiny
# text-to-image run (examples/tiny.toml, docs/embedded-run.md): a warm-up, then preference steps whose
# samples learn to follow their prompts; eval lines, a summary, sample grids and curves. Each names its folder.
demo: demo-toy2d demo-train

demo-toy2d: $(STAMP)
	$(PY) -m fastpref.demos.toy2d

demo-train: $(STAMP)
	$(PY) -m fastpref.train --config examples/tiny.toml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Benchmarks (results and commands: benchmarks/RESULTS.md). `make bench`: the CPU sweep — eager
# reference vs torch.compile vs every fastpref backend that runs here (the Triton interpreter is
# never timed) — a few minutes on a quiet 2-core CPU; BENCH_ARGS passes options to the sweep
# (e.g. BENCH_ARGS="--threads 1" on a shared machine, "--shapes sd15,sdxl").
.PHONY: bench bench-gpu bench-gpu-quick
bench: $(STAMP)
	$(PY) -m benchmarks.sweep --preset cpu $(BENCH_ARGS)

# `make bench-gpu`: on a CUDA machine, the GPU sweep (Triton/CUDA rows vs eager vs torch.compile,
# bf16 and fp32, every latent shape, RPO M = 8…4096) and the pytest-benchmark view. It does not
# install anything: where no package registry is reachable, run it with that machine's Python,
# `make bench-gpu PY=python3`. Long on a first run (one torch.compile per case); split it with
# BENCH_ARGS="--shapes sd15,sdxl" etc. Writes benchmarks/results/gpu-<device>.{csv,md,png,json}.
bench-gpu:
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make bench-gpu needs a CUDA device (torch sees none); on a CPU run make bench')"
	$(PY) -m benchmarks.sweep --preset gpu $(BENCH_ARGS)
	if $(PY) -c "import pytest_benchmark" 2>/dev/null; then \
	  $(PY) -m pytest benchmarks -q --benchmark-only --benchmark-json benchmarks/results/pytest-benchmark-gpu.json; \
	else echo "pytest-benchmark not installed: skipped the pytest-benchmark view"; fi

# `make bench-gpu-quick`: the first look at a GPU, one command, meant to fit in ten minutes: the GPU
# parity tests, the sweep's gpu-quick preset (SD1.5/SDXL/SD3 × 1 and 8 pairs, bf16; RPO M = 64 and
# 1024) and the roofline table (benchmarks/gpu_quick.py). Runs with .venv's Python when there is one,
# else the machine's python3 (a GPU image with torch and triton; diffusers/open_clip not needed).
# Writes benchmarks/results/gpu-quick-<device>.{csv,md,json,png} and ...-roofline.md.
QUICK_PY = $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu-quick:
	$(QUICK_PY) -m benchmarks.gpu_quick $(BENCH_ARGS)
