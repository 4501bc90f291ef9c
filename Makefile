# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (pinned CPU-capable install, see requirements.txt) on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastpref-installed

export HF_HUB_OFFLINE := 1

.PHONY: install test demo clean

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

# DMPO's 2-D study (seed 002 §5.1) on the CPU: table, CSV and PNG; the last line names the folder.
demo: $(STAMP)
	$(PY) -m fastpref.demos.toy2d

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
