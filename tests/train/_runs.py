"""The short trainer run the trainer tests start from (any key overrides it)."""

from fastpref.train import TrainConfig


def run_config(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=2, synthetic_size=24,
                eval_pairs=2, num_inference_steps=2, checkpointing_steps=1000, report_to="csv", learning_rate=1e-3,
                validation_prompts=["a red disc"])
    base.update(kw)
    return TrainConfig(**base)
