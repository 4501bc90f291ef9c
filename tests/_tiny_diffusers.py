"""Tiny diffusers models built from configs (no download) for the trainer-side tests."""

from __future__ import annotations

import torch

LATENT_SHAPE = (4, 8, 8)
TEXT_DIM, TEXT_LEN, POOLED_DIM = 16, 5, 8


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=4,
    )


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=8, pooled_projection_dim=POOLED_DIM, out_channels=4,
        pos_embed_max_size=16,
    )


def scheduler_for(model):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        return DDPMScheduler(num_train_timesteps=1000)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def add_lora(model, rank: int = 4, seed: int = 1):
    """LoRA on the attention projections, with lora_B randomised so the adapter changes the output
    (peft initialises B = 0: policy = reference, which would make every equality test vacuous)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def random_pairs(model, num_pairs: int, seed: int = 0, dtype=torch.float32):
    """Pairs in the latent-cache format: {"latents": (2, C, h, w), "cond": {...}}."""
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(num_pairs):
        cond = {"encoder_hidden_states": torch.randn(TEXT_LEN, TEXT_DIM, generator=g, dtype=dtype)}
        if not isinstance(model, UNet2DConditionModel):
            cond["pooled_projections"] = torch.randn(POOLED_DIM, generator=g, dtype=dtype)
        pairs.append({"latents": torch.randn(2, *LATENT_SHAPE, generator=g, dtype=dtype), "cond": cond})
    return pairs
