"""fastpref's trainer: ``fastpref-train`` / ``python -m fastpref.train`` (docs/trainer.md; several processes:
docs/trainer-launch.md).

>>> from fastpref.train import TrainConfig, train
>>> train(TrainConfig(loss="dmpo", max_train_steps=50, output_dir="out"))
"""

from fastpref.train.config import TrainConfig, parse_args
from fastpref.train.loop import StepOutput, TrainResult, compute_loss, train

__all__ = ["TrainConfig", "parse_args", "train", "compute_loss", "StepOutput", "TrainResult", "main"]


def main(argv: list[str] | None = None) -> int:
    """Console entry point: parse flags (and ``--config``), train, return the exit status."""
    import sys

    try:
        cfg = parse_args(argv)
        train(cfg)
    except ValueError as exc:  # a bad flag, config or dataset: say what to fix, no traceback
        print(f"fastpref-train: error: {exc}", file=sys.stderr)
        return 2
    finally:  # train() keeps the process group (a job may train several times); the job ends here
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
