"""``--reference_mode cache`` in the trainer: the loop draws each pair's noise and timestep as
``precompute_reference_errors`` did, uses the cached errors, and refuses a cache made for another run."""

from __future__ import annotations

import pytest
import torch

from fastpref.reference import pair_errors
from fastpref.train import TrainConfig, train
from fastpref.train.data import SyntheticPreferences, collate_pairs
from fastpref.train.loop import compute_loss
from fastpref.train.models import LORA_TARGET_MODULES, build_tiny_model
from fastpref.train.objectives import get_objective
from fastpref.train.ref import REFERENCE_MODES, precompute_for_training


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path="fastpref:tiny-unet", output_dir=str(tmp_path / "run"), max_train_steps=2,
                train_batch_size=2, synthetic_size=12, eval_pairs=2, num_inference_steps=2, checkpointing_steps=1000,
                report_to="csv", lora_rank=4, loss="dpo", seed=3, validation_prompts=["a red disc"],
                reference_mode="cache", ref_cache=str(tmp_path / "ref.safetensors"))
    base.update(kw)
    return TrainConfig(**base)


def tiny(name="fastpref:tiny-unet"):
    return build_tiny_model(name, sample_size=8)


@pytest.mark.parametrize("name", ["fastpref:tiny-unet", "fastpref:tiny-sd3"])
def test_cache_step_equals_adapter_off_step(tmp_path, name):
    from accelerate import Accelerator
    from peft import LoraConfig

    cfg = config(tmp_path, pretrained_model_name_or_path=name, beta=100.0)
    torch.manual_seed(0)  # LoRA A's gaussian init
    data = SyntheticPreferences(12, 8, seed=3)
    precompute_for_training(cfg, cfg.ref_cache, epochs=2, model=tiny(name), dataset=data)

    model = tiny(name)
    model.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                          target_modules=LORA_TARGET_MODULES))
    with torch.no_grad():  # a policy that differs from the reference (LoRA B starts at zero)
        g = torch.Generator().manual_seed(0)
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # an earlier train() in this process may have left bf16 autocast set
    GradientState._reset_state()
    acc = Accelerator(cpu=True, mixed_precision="no")
    cached = REFERENCE_MODES["cache"](cfg, model, acc, None)
    two_calls = REFERENCE_MODES["adapter_off"](cfg, model, acc, None)
    two_calls.per_pair_noise = True  # the same per-(pair, epoch) draw the cache was computed with
    batch = collate_pairs([data[i] for i in (7, 2, 5)])
    batch["epoch"] = 1
    objective = get_objective("dpo")
    a = compute_loss(model, model.denoiser, cached, objective, batch, torch.Generator(), cfg, acc)
    b = compute_loss(model, model.denoiser, two_calls, objective, batch, torch.Generator(), cfg, acc)
    assert set(a.ref) == {"ref_err"} and set(b.ref) == {"ref_pred"}
    torch.testing.assert_close(a.timesteps, b.timesteps)
    torch.testing.assert_close(a.model_pred, b.model_pred)
    # The cached reference errors are the two-call path's, to fp32 rounding (the cache ran the
    # reference at batch 8, the step at batch 3: other kernels, other summation order).
    target = a.target if a.target.shape[0] == a.model_pred.shape[0] else torch.cat([a.target, a.target])
    torch.testing.assert_close(a.ref["ref_err"], pair_errors(b.ref["ref_pred"], target), rtol=2e-6, atol=1e-7)
    # The loss scales error differences by β (β = 100 here), so the fp32 rounding above moves it ≲ 1e-5.
    torch.testing.assert_close(a.loss, b.loss.detach(), rtol=1e-5, atol=1e-5)
    assert abs(a.loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-4  # policy ≠ reference: a real comparison


def test_cache_mode_trains_and_refuses_another_run(tmp_path):
    cfg = config(tmp_path)
    precompute_for_training(cfg, cfg.ref_cache, model=tiny())
    steps = []
    result = train(cfg, model=tiny(), on_step=lambda step, out: steps.append(out))
    assert result.global_step == 2 and len(steps) == 2
    assert all(set(out.ref) == {"ref_err"} for out in steps)

    with pytest.raises(ValueError, match=r"different .*seed"):
        train(config(tmp_path, seed=4), model=tiny())
    with pytest.raises(ValueError, match=r"different .*model"):
        train(cfg, model=build_tiny_model("fastpref:tiny-unet", sample_size=8, seed=1))
    with pytest.raises(ValueError, match="epochs"):
        train(config(tmp_path, max_train_steps=50), model=tiny())
    with pytest.raises(ValueError, match="--ref_cache"):
        train(config(tmp_path, ref_cache=str(tmp_path / "missing.safetensors")), model=tiny())


def test_precompute_command_writes_the_cache_a_run_accepts(tmp_path):
    from fastpref.train.ref import epochs_needed, main, training_ref_fingerprint
    from fastpref.train.ref_cache import RefErrorCache

    toml = tmp_path / "run.toml"
    toml.write_text('pretrained_model_name_or_path = "fastpref:tiny-sd3"\nloss = "dmpo"\nlora_rank = 2\n'
                    'synthetic_size = 8\neval_pairs = 2\ntrain_batch_size = 2\nmax_train_steps = 7\nseed = 5\n')
    out = tmp_path / "ref.safetensors"
    assert main(["--config", str(toml), "--output", str(out), "--device", "cpu"]) == 0
    cfg = TrainConfig(pretrained_model_name_or_path="fastpref:tiny-sd3", loss="dmpo", lora_rank=2, synthetic_size=8,
                      eval_pairs=2, train_batch_size=2, max_train_steps=7, seed=5)
    model = build_tiny_model("fastpref:tiny-sd3")
    cache = RefErrorCache.load(out, training_ref_fingerprint(cfg, model))
    # 8 rows, 2 held out → 6 training pairs → 3 batches per epoch → 7 steps need 3 epochs
    assert (cache.num_pairs, cache.num_epochs) == (8, 3) == (8, epochs_needed(cfg, 6))
    assert torch.isfinite(cache.ref_err).all() and (cache.ref_err > 0).all()
