"""Fixtures of the trainer tests: tiny models built from configs (nothing downloaded) and a fast run."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from fastpref.train import TrainConfig
from fastpref.train.models import build_tiny_model


def tiny_model(name: str = "fastpref:tiny-unet", *, vae: bool = False, lora: int = 0, lora_b: float = 0.0):
    """A tiny pixel-space model (8×8), or with ``vae=True`` a latent one (a tiny AutoencoderKL: 16×16 images,
    8×8×3 latents, with scaling and shift). ``lora``: add adapters of that rank; ``lora_b``: random
    B matrices of that scale, so the policy differs from the reference (peft starts B at zero)."""
    model = build_tiny_model(name, sample_size=8)
    if vae:
        from diffusers import AutoencoderKL

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=3,
                norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1,
            ).eval()
    if lora:
        from peft import LoraConfig

        model.denoiser.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model.denoiser.add_adapter(LoraConfig(r=lora, lora_alpha=lora, init_lora_weights="gaussian",
                                                  target_modules=model.lora_target_modules))
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in model.denoiser.named_parameters():
                if "lora_B" in n:
                    p.copy_(lora_b * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tiny():
    return tiny_model


@pytest.fixture
def run_config(tmp_path):
    """``run_config(**overrides)``: a 2-step LoRA run on 12 synthetic pairs that evaluates once, fast."""

    def make(**kw) -> TrainConfig:
        base = dict(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=2, synthetic_size=12,
                    eval_pairs=2, num_inference_steps=2, checkpointing_steps=1000, report_to="csv", learning_rate=1e-2,
                    loss="dpo", lora_rank=4, seed=3, validation_prompts=["a red disc"])
        base.update(kw)
        return TrainConfig(**base)

    return make


@pytest.fixture
def cpu_accelerator():
    """What compute_loss needs of an Accelerator: the device and a (no-op) autocast."""
    return SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)


@pytest.fixture
def fresh_accelerate_state():
    """These tests build an Accelerator in the test process: leave no process-wide state behind."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
