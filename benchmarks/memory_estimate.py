"""GPU memory of SDXL and Flux preference training at 1024² in bf16 on an 80 GB GPU — computed, not measured.

    python -m benchmarks.memory --estimate          # prints the tables of benchmarks/RESULTS.md ("Trainer memory")

Nothing here needs a GPU or the weights. Each architecture is built from its published configuration on
PyTorch's **meta device** (shapes and dtypes, no storage) with diffusers / transformers / peft — the classes the
trainer loads — and then:

* **parameters** are counted (denoiser, text encoders, VAE; LoRA rank 8 on ``to_q/to_k/to_v/to_out.0``, the
  trainer's targets);
* **activations** are counted by running one training forward of the denoiser at 1024² for one pair (2 images)
  in bf16 on the meta device, with every tensor autograd keeps for backward recorded once
  (``torch.autograd.graph.saved_tensors_hooks``; a view counts as its base; weights excluded). Attention is
  counted as a fused (flash / memory-efficient) kernel keeps it — q, k, v, the output and an fp32 log-sum-exp
  per query — not as an s × s matrix: ``scaled_dot_product_attention`` is replaced by a stand-in that saves
  exactly those. LoRA runs (frozen base weights) keep fewer activations than a full fine-tune (a frozen
  linear layer does not keep its input), so both are counted.
* **with gradient checkpointing** the model's own checkpoint calls are instrumented: what the no-checkpoint
  forward saves inside checkpointed blocks is replaced by the blocks' inputs (what a non-reentrant checkpoint
  keeps), plus the largest block's own activations (recomputed in backward, one block at a time).

Bytes per parameter (the trainer's mixed precision, as the diffusers scripts place models):

* LoRA: base weights bf16 (2 B); LoRA weights fp32 (4) + gradients fp32 (4) + AdamW moments (8; 8-bit: 2).
* full fine-tune: fp32 master weights (4) + fp32 gradients (4) + AdamW moments (8; ``--use_8bit_adam``: 2)
  + the bf16 copy autocast makes of each weight, kept for backward (2); the frozen ``copy`` reference in bf16
  (2), or none with ``--reference_mode cache``.
* text encoders bf16, VAE fp32 (diffusers' SDXL DPO script keeps it in fp32); neither is on the GPU with
  ``--cache_latents``.

Fits: the sum within 80 GB minus 8 GB (10 %) for the CUDA context, the allocator's fragmentation and
transient buffers (the reference forward under ``no_grad``, optimizer temporaries) — an assumption, stated.

Sources of the architectures (parameter counts are counted from these configs, and printed):
SDXL — Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis",
arXiv:2307.01952 (Table 1: 2.6 B UNet parameters; text encoders CLIP ViT-L and OpenCLIP ViT-bigG, 817 M);
configs as in the ``stabilityai/stable-diffusion-xl-base-1.0`` diffusers folder.
Flux — Black Forest Labs, FLUX.1 [dev] model card (2024): "a 12 billion parameter rectified flow transformer";
19 double-stream + 38 single-stream blocks, width 3072, T5-XXL and CLIP-L text encoders, a 16-channel VAE
(configs as in the ``black-forest-labs/FLUX.1-dev`` diffusers folder).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

GB = 1e9
GPU_GB, MARGIN_GB = 80.0, 8.0
LORA_RANK = 8


# ----------------------------------------------------------------------------------------------
# The architectures on the meta device
# ----------------------------------------------------------------------------------------------


def _clip(hidden, layers, heads, inter, projection=None, act="quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(latent_channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)


def sdxl():
    """SDXL base 1.0: the UNet, CLIP ViT-L + OpenCLIP ViT-bigG text encoders, the VAE; and one pair's
    forward inputs at 1024² (128² latents, 77 tokens)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    )
    text = [_clip(768, 12, 12, 3072), _clip(1280, 32, 20, 5120, projection=1280, act="gelu")]

    def inputs(n, dtype):
        return dict(sample=torch.empty(n, 4, 128, 128, dtype=dtype), timestep=torch.zeros(n, dtype=torch.long),
                    encoder_hidden_states=torch.empty(n, 77, 2048, dtype=dtype),
                    added_cond_kwargs={"text_embeds": torch.empty(n, 1280, dtype=dtype),
                                       "time_ids": torch.empty(n, 6, dtype=dtype)}, return_dict=False)

    return unet, text, _vae(4), inputs


def flux():
    """FLUX.1 [dev]: the transformer (guidance-distilled), T5-XXL encoder + CLIP ViT-L, the 16-channel VAE; one
    pair's forward inputs at 1024² (128² × 16 latents packed 2 × 2 → 4096 tokens of 64; 512 T5 tokens)."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    text = [_clip(768, 12, 12, 3072), t5]

    def inputs(n, dtype):
        return dict(hidden_states=torch.empty(n, 4096, 64, dtype=dtype),
                    encoder_hidden_states=torch.empty(n, 512, 4096, dtype=dtype),
                    pooled_projections=torch.empty(n, 768, dtype=dtype), timestep=torch.empty(n, dtype=dtype),
                    guidance=torch.empty(n, dtype=dtype), img_ids=torch.zeros(4096, 3, dtype=dtype),
                    txt_ids=torch.zeros(512, 3, dtype=dtype), return_dict=False)

    return transformer, text, _vae(16), inputs


# ----------------------------------------------------------------------------------------------
# Counting what autograd keeps
# ----------------------------------------------------------------------------------------------


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


class _FlashAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` on the meta device, saving what a fused kernel keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run: only the forward's saved tensors are counted
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@dataclass
class Activations:
    total: int  # bytes autograd keeps, no checkpointing
    checkpointed: int  # with gradient checkpointing (inputs of the blocks + outside + the largest block)
    largest_block: int


def count_activations(model, inputs: dict) -> Activations:
    """Run ``model(**inputs)`` on the meta device and count the bytes kept for backward (see the module doc)."""
    weights = {id(p) for p in model.parameters()}
    saved: dict[int, tuple[torch.Tensor, int]] = {}
    blocks: list[tuple[int, set, set]] = []  # per checkpointed call: bytes saved inside, its input roots, the saved
    calls: list = []  # attention calls through the stand-in

    def pack(t):
        r = _root(t)
        if id(r) not in weights and id(r) not in saved:
            saved[id(r)] = (r, r.numel() * r.element_size())
        return t

    def block_call(module, *args, **kwargs):
        before = set(saved)
        out = module(*args, **kwargs)
        inside = set(saved) - before
        ids = {id(_root(a)) for a in args if isinstance(a, torch.Tensor)}
        for a in args:
            if isinstance(a, torch.Tensor):
                saved.setdefault(-id(_root(a)), (_root(a), 0))  # keep it alive: ids stay unique
        blocks.append((sum(saved[i][1] for i in inside), ids, inside))
        return out

    import torch.nn.functional as F

    real_sdpa = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("the stand-in counts unmasked attention only")
        calls.append(query.shape)
        return _FlashAttention.apply(query, key, value)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=block_call)
    F.scaled_dot_product_attention = sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)[0]
        assert out.requires_grad and calls and blocks, "no attention through the stand-in, or no checkpointed block"
    finally:
        F.scaled_dot_product_attention = real_sdpa
        model.disable_gradient_checkpointing()
    total = sum(b for _, b in saved.values())
    inside_all = set().union(*(inside for _, _, inside in blocks))
    outside_ids = {i for i in saved if i > 0} - inside_all  # kept for backward outside every block
    outside = sum(saved[i][1] for i in outside_ids)
    # a block's inputs are what the checkpoint keeps of it (unless already kept outside the blocks)
    block_inputs = set().union(*(ids for _, ids, _ in blocks)) - outside_ids
    input_bytes = sum(saved[-i][0].numel() * saved[-i][0].element_size() for i in block_inputs)
    largest = max(b for b, _, _ in blocks)
    return Activations(total, outside + input_bytes + largest, largest)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_params(model) -> int:
    """LoRA rank ``LORA_RANK`` on every Linear named to_q/to_k/to_v/to_out.0: r × (in + out) each."""
    from fastpref.train.models import LORA_TARGET_MODULES

    return sum(LORA_RANK * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in LORA_TARGET_MODULES))


@dataclass
class Estimate:
    name: str
    denoiser: int
    text: int
    vae: int
    lora: int
    act_full: Activations
    act_lora: Activations


def estimate(name: str) -> Estimate:
    from peft import LoraConfig

    from fastpref.train.models import LORA_TARGET_MODULES

    build = {"SDXL": sdxl, "Flux": flux}[name]
    with torch.device("meta"):
        model, text, vae, inputs = build()
        model.to(torch.bfloat16).train()
        lora = _lora_params(model)
        act_full = count_activations(model.requires_grad_(True), inputs(2, torch.bfloat16))
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGET_MODULES))
        model.to(torch.bfloat16)
        act_lora = count_activations(model, inputs(2, torch.bfloat16))
        base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        counted_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counted_lora == lora, (counted_lora, lora)
    return Estimate(name, base, sum(_params(t) for t in text), _params(vae), lora, act_full, act_lora)


def count_tiny(name: str, pairs: int) -> Activations:
    """The same count for an embedded tiny model as ``benchmarks.memory`` runs it (fp32, LoRA rank 8, ``pairs``
    pairs, on the CPU): set beside that measured step peak, it shows how much of a step the count covers."""
    from peft import LoraConfig

    from fastpref.train.models import LORA_TARGET_MODULES, load_model

    model = load_model(name)
    model.denoiser.requires_grad_(False).train()
    model.denoiser.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                          target_modules=LORA_TARGET_MODULES))
    n, size = 2 * pairs, model.denoiser.config.sample_size
    cond = model.encode_prompts(["a red disc"] * n, "cpu")
    kw = {"hidden_states" if model.family == "sd3" else "sample": torch.zeros(n, model.latent_channels, size, size),
          "timestep": torch.zeros(n, dtype=torch.long), "return_dict": False, **cond}
    return count_activations(model.denoiser, kw)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GB:.1f}"


def report() -> str:
    ests = [estimate("SDXL"), estimate("Flux")]
    lines = ["Parameters (counted from the configs on the meta device):", "",
             "| model | denoiser | text encoders | VAE | LoRA r=8 (to_q/k/v/out.0) |", "| --- | ---: | ---: | ---: | ---: |"]
    for e in ests:
        lines.append(f"| {e.name} | {e.denoiser / 1e9:.3f} B | {e.text / 1e9:.3f} B | {e.vae / 1e6:.1f} M "
                     f"| {e.lora / 1e6:.2f} M |")
    lines += ["", "Activations kept for backward, one pair (2 images) at 1024², bf16 (counted on the meta device):", "",
              "| model | training | no checkpointing | `--gradient_checkpointing` | of which the largest block |",
              "| --- | --- | ---: | ---: | ---: |"]
    for e in ests:
        for label, a in (("LoRA", e.act_lora), ("full", e.act_full)):
            lines.append(f"| {e.name} | {label} | {_gb(a.total)} GB | {_gb(a.checkpointed)} GB | {_gb(a.largest_block)} GB |")
    lines += ["", f"Memory on one {GPU_GB:.0f} GB GPU, one pair per micro-batch (GB; fits: total ≤ {GPU_GB:.0f} − "
              f"{MARGIN_GB:.0f}); text encoders (bf16) and VAE (fp32) on the GPU, i.e. without `--cache_latents` "
              "(with it, subtract the text + VAE column):", "",
              "| model | training | reference | weights + states | text + VAE | activations (off / on) | total, no "
              "checkpointing | total, checkpointing | fits (off / on) | pairs that fit (off / on) |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    budget = (GPU_GB - MARGIN_GB) * GB
    for e in ests:
        text_vae = 2 * e.text + 4 * e.vae
        rows = [
            ("LoRA, AdamW", "adapter_off", f"2×{_gb(e.denoiser)}B + 16×{e.lora / 1e6:.1f}M",
             2 * e.denoiser + 16 * e.lora, e.act_lora),
            ("full, AdamW", "copy (bf16)", f"(4+4+8+2)×{_gb(e.denoiser)}B + 2×{_gb(e.denoiser)}B",
             20 * e.denoiser, e.act_full),
            ("full, 8-bit AdamW", "copy (bf16)", f"(4+4+2+2)×{_gb(e.denoiser)}B + 2×{_gb(e.denoiser)}B",
             14 * e.denoiser, e.act_full),
            ("full, 8-bit AdamW", "cache", f"(4+4+2+2)×{_gb(e.denoiser)}B", 12 * e.denoiser, e.act_full),
        ]
        for training, ref, arithmetic, fixed, act in rows:
            tot = [fixed + text_vae + a for a in (act.total, act.checkpointed)]
            fits = ["yes" if t <= budget else "no" for t in tot]
            pairs = [max(0, int((budget - fixed - text_vae) // a)) for a in (act.total, act.checkpointed)]
            lines.append(f"| {e.name} | {training} | {ref} | {arithmetic} = {_gb(fixed)} | {_gb(text_vae)} "
                         f"| {_gb(act.total)} / {_gb(act.checkpointed)} | {_gb(tot[0])} | {_gb(tot[1])} "
                         f"| {fits[0]} / {fits[1]} | {pairs[0]} / {pairs[1]} |")
    from fastpref.train.models import TINY_MODELS

    lines += ["", "The same count on the embedded models as `python -m benchmarks.memory` runs them (fp32, LoRA r=8, "
              "8 pairs; compare with that table's LoRA `adapter_off` step peak):", "",
              "| model | counted, no checkpointing | counted, checkpointing |", "| --- | ---: | ---: |"]
    for name in TINY_MODELS:
        a = count_tiny(name, 8)
        lines.append(f"| {name} | {a.total / 2**20:.1f} MiB | {a.checkpointed / 2**20:.1f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        print(report())
