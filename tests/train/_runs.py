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
