"""The short trainer run the trainer tests start from (any key overrides it), and what the multi-process
tests share: a free port for the launcher, a 2-process ``torchrun`` of a worker script, a worker script
loaded as a module, the rows of a run's train log."""

import csv
import importlib.util
import os
import socket
import subprocess
import sys

from fastpref.train import TrainConfig


def run_config(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=2, synthetic_size=24,
                eval_pairs=2, num_inference_steps=2, checkpointing_steps=1000, report_to="csv", learning_rate=1e-3,
                validation_prompts=["a red disc"])
    base.update(kw)
    return TrainConfig(**base)


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of a torchrun launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rows(run_dir) -> list[dict]:
    """The rows of ``run_dir/logs/train.csv``."""
    with open(os.path.join(run_dir, "logs", "train.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_module(name: str):
    """``tests/train/<name>.py`` as a module (the test process runs its functions too)."""
    spec = importlib.util.spec_from_file_location(name, worker_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_path(name: str) -> str:
    return os.path.join(ROOT, "tests", "train", f"{name}.py")


def torchrun_two(name: str, *args, timeout: int = 600) -> None:
    """``torchrun --nproc_per_node 2 tests/train/<name>.py ARGS…`` (gloo on the CPU, one thread each, offline);
    fails the test with the end of its output unless both processes exit 0."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), worker_path(name), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


class WriteAudit:
    """Every file this process writes, renames or removes under ``root`` (relative paths in ``written``), for
    the multi-process workers' "only process 0 writes" checks. :meth:`install` (once per process) adds a
    Python audit hook, which sees every ``open()``, rename and removal, and wraps ``torch.save`` and
    safetensors' ``save_file``, whose C++/Rust writers open their files out of the hook's sight."""

    def __init__(self, root: str = ""):
        self.root = root
        self.written: list[str] = []

    def _under_root(self, path) -> str | None:
        if isinstance(path, int) or not self.root:
            return None
        full = os.path.abspath(os.fsdecode(path))
        return os.path.relpath(full, self.root) if full.startswith(self.root + os.sep) else None

    def _audit(self, event: str, args) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        elif event in ("os.rename", "os.remove", "shutil.rmtree"):
            path, writes = args[0], True
        else:
            return
        rel = self._under_root(path) if writes else None
        if rel is not None:
            self.written.append(rel)

    def _recording(self, save, path_arg: int):
        def wrapper(*args, **kwargs):
            path = args[path_arg]
            rel = self._under_root(path) if isinstance(path, (str, os.PathLike)) else None
            if rel is not None:
                self.written.append(rel)
            return save(*args, **kwargs)

        return wrapper

    def install(self) -> "WriteAudit":
        import safetensors.torch
        import torch

        sys.addaudithook(self._audit)
        safetensors.torch.save_file = self._recording(safetensors.torch.save_file, 1)
        torch.save = self._recording(torch.save, 1)
        return self
