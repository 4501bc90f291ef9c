"""Diffusion models for the trainer: load a diffusers pipeline's parts, encode images and prompts, predict, sample.

Two families:

* ``unet`` — ``UNet2DConditionModel`` + CLIP text encoder + DDPM scheduler (SD1.5-style), ε- or
  v-prediction (the scheduler config's ``prediction_type``);
* ``sd3`` — ``SD3Transformer2DModel`` + CLIP (+ CLIP-2, + T5) encoders + ``FlowMatchEulerDiscreteScheduler``:
  ``x_t = (1 − σ)·x0 + σ·ε`` and the target ``ε − x0`` (rectified flow, the SD3 recipe).

A VAE is optional: without one the model works on pixels — that is how
the embedded tiny models (``fastpref:tiny-unet``, ``fastpref:tiny-unet-v``, ``fastpref:tiny-sd3``,
built from configs with a fixed seed, nothing downloaded) stay fast on a CPU.

Noising a batch of pairs is :mod:`fastpref.train.noise`; rows are stacked ``[w_0 … w_{B−1}, l_0 … l_{B−1}]``.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["DiffusionModel", "load_model", "load_vae", "build_tiny_model", "save_model", "TINY_MODELS", "FAMILIES"]

TINY_MODELS = ("fastpref:tiny-unet", "fastpref:tiny-unet-v", "fastpref:tiny-sd3")
#: DiffusionModel.family → what a pipeline of that family holds (``fastpref-train --help`` lists them)
FAMILIES = {
    "unet": "UNet2DConditionModel + CLIP text encoder, DDPM, ε- or v-prediction (SD1.5-style)",
    "sd3": "SD3Transformer2DModel + CLIP (+ CLIP-2, + T5) encoders, flow matching (SD3, SD3.5)",
}
SD3_T5_TOKENS = 256  # without a T5 encoder the SD3 pipeline feeds this many zero tokens; training matches it
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers DPO / SD3 LoRA scripts' choice


@dataclass
class DiffusionModel:
    family: str  # "unet" | "sd3"
    denoiser: nn.Module
    scheduler: object
    tokenizers: list
    text_encoders: list
    vae: nn.Module | None = None
    weighting_scheme: str = "logit_normal"
    vae_encode_batch_size: int | None = None  # images per VAE encode call (None: all at once)

    # -- shapes ------------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        if self.family == "sd3":
            return "flow_matching"
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def resolution(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in [*self.text_encoders, self.vae] if m is not None]

    # -- conditioning --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """The denoiser's text conditioning for ``prompts`` (keyword arguments of its forward)."""

        def ids(tok):
            return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)

        if self.family == "unet":  # SD1.5: last hidden state of the CLIP text encoder
            return {"encoder_hidden_states": self.text_encoders[0](ids(self.tokenizers[0]))[0]}
        # SD3: penultimate hidden states of the CLIP encoders side by side, padded to the joint width,
        # then the T5 tokens (zeros without a T5, as the SD3 pipeline does); pooled = the CLIP projections.
        joint = self.denoiser.config.joint_attention_dim
        clip_hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2]):
            out = enc(ids(tok), output_hidden_states=True)
            pooled.append(out[0])
            clip_hidden.append(out.hidden_states[-2])
        clip = torch.cat(clip_hidden, dim=-1)
        clip = nn.functional.pad(clip, (0, joint - clip.shape[-1]))
        if len(self.text_encoders) > 2:
            t5 = self.text_encoders[2](ids(self.tokenizers[2]))[0]
        else:
            t5 = clip.new_zeros(clip.shape[0], SD3_T5_TOKENS, joint)
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}

    # -- latents -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Pixels (N, C, H, W) in [−1, 1] → scaled latents: ``(mean + std·z − shift)·scale`` with ``z`` of
        image k drawn from the CPU generator ``generators[k]`` (so the sample does not depend on the
        device or on which other images are encoded with it). The VAE sees ``vae_encode_batch_size``
        images per call (diffusers' ``--vae_encode_batch_size``: bounds its activation memory). No VAE: the
        pixels themselves."""
        if self.vae is None:
            return pixels
        chunk = self.vae_encode_batch_size or pixels.shape[0]
        dists = [self.vae.encode(pixels[i: i + chunk].to(self.vae.dtype)).latent_dist
                 for i in range(0, pixels.shape[0], chunk)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
        z = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
        latents = mean + std * z.to(mean.device, mean.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents).sample.clamp(-1, 1)

    # -- forward -----------------------------------------------------------------------------------
    def predict(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """One forward of ``denoiser`` (the policy, its frozen copy, or the policy with adapters off)."""
        if self.family == "sd3":
            return denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]
        return denoiser(noisy, timesteps, return_dict=False, **cond)[0]

    # -- sampling (evaluation grids) ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, denoiser: nn.Module, prompts: list[str], seeds: list[int], num_inference_steps: int, device) -> torch.Tensor:
        """Images in [−1, 1] for ``prompts`` from fixed ``seeds`` (no classifier-free guidance: the
        tiny models are trained without an empty prompt). DDIM for the DDPM family, Euler for flow."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        if self.family == "sd3":
            sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        else:
            sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(num_inference_steps, device=device)
        size = self.denoiser.config.sample_size
        x = torch.stack([
            torch.randn((self.latent_channels, size, size), generator=torch.Generator().manual_seed(s)) for s in seeds
        ]).to(device)
        x = x * getattr(sched, "init_noise_sigma", 1.0)
        cond = self.encode_prompts(prompts, device)
        for t in sched.timesteps:
            pred = self.predict(denoiser, x, t.expand(x.shape[0]).to(device), cond).float()
            x = sched.step(pred, t, x).prev_sample
        return self.decode_latents(x).float()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_model(name_or_path: str, *, revision: str | None = None, weighting_scheme: str = "logit_normal",
               variant: str | None = None, vae: str | None = None) -> DiffusionModel:
    """A :class:`DiffusionModel` from a hub id, a local diffusers folder or an embedded tiny model.
    ``variant``: diffusers' weight variant (``fp16`` → ``*.fp16.safetensors``) of every component with
    weights; ``vae``: a separate VAE folder or hub id (``--pretrained_vae_model_name_or_path``) instead of the
    pipeline's own, loaded with ``variant`` and its own default revision."""
    model = _load_pipeline(name_or_path, revision=revision, weighting_scheme=weighting_scheme, variant=variant,
                           with_vae=vae is None)
    if vae is not None:
        model.vae = load_vae(vae, model, variant=variant)
    return model


def load_vae(name_or_path: str, model: DiffusionModel, *, variant: str | None = None) -> nn.Module:
    """``--pretrained_vae_model_name_or_path``: an ``AutoencoderKL`` folder or hub id (diffusers' SDXL scripts:
    e.g. madebyollin/sdxl-vae-fp16-fix, whose decoder does not overflow in fp16) for ``model``."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, variant=variant)
    except Exception as exc:  # noqa: BLE001 - hub/OS errors come in many types; one message for all
        raise ValueError(f"--pretrained_vae_model_name_or_path {name_or_path!r}: no AutoencoderKL found there (a "
                         f"folder with config.json and the weights{f' of variant {variant!r}' if variant else ''}, "
                         f"or a hub id reachable with HF_HUB_OFFLINE unset): {exc}") from None
    if vae.config.latent_channels != model.latent_channels:
        raise ValueError(f"--pretrained_vae_model_name_or_path {name_or_path!r}: the VAE has "
                         f"{vae.config.latent_channels} latent channels, the denoiser expects {model.latent_channels}")
    return vae


def _load_pipeline(name_or_path: str, *, revision: str | None, weighting_scheme: str, variant: str | None,
                   with_vae: bool) -> DiffusionModel:
    if name_or_path in TINY_MODELS:
        model = build_tiny_model(name_or_path)
        model.weighting_scheme = weighting_scheme
        return model
    if name_or_path.startswith("fastpref:"):
        raise ValueError(f"--pretrained_model_name_or_path: unknown embedded model {name_or_path!r}; "
                         f"choose one of {', '.join(TINY_MODELS)}")
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except Exception as exc:  # noqa: BLE001 - hub/OS errors come in many types; one message for all
        raise ValueError(
            f"--pretrained_model_name_or_path {name_or_path!r}: no diffusers pipeline found there "
            f"(a folder with model_index.json, or a hub id reachable with HF_HUB_OFFLINE unset): {exc}"
        ) from None

    def has(name):
        entry = index.get(name)
        return isinstance(entry, (list, tuple)) and entry[0] is not None

    kw = {"revision": revision, "variant": variant}  # variant: diffusers reads it for weights (tokenizers: not passed)
    import transformers
    from diffusers import AutoencoderKL

    def component(name):
        lib, cls = index[name]
        cls = getattr(transformers if lib == "transformers" else __import__(lib, fromlist=[cls]), cls)
        weights = isinstance(cls, type) and issubclass(cls, nn.Module)
        return cls.from_pretrained(name_or_path, subfolder=name, **(kw if weights else {"revision": revision}))

    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **kw) if has("vae") and with_vae else None
    if has("unet"):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kw)
        if unet.config.addition_embed_type not in (None, "text"):  # "text" reads encoder_hidden_states only
            raise ValueError(f"{name_or_path!r}: UNets with added conditioning (SDXL's text_time) are not supported yet; "
                             "use an SD1.5-style UNet or an SD3-style transformer")
        sched = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
        return DiffusionModel("unet", unet, sched, [component("tokenizer")], [component("text_encoder")], vae)
    if has("transformer") and index["transformer"][1] == "SD3Transformer2DModel":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        transformer = SD3Transformer2DModel.from_pretrained(name_or_path, subfolder="transformer", **kw)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
        names = [s for s in ("", "_2", "_3") if has(f"text_encoder{s}")]
        return DiffusionModel(
            "sd3", transformer, sched, [component(f"tokenizer{s}") for s in names],
            [component(f"text_encoder{s}") for s in names], vae, weighting_scheme,
        )
    found = [k for k in index if not k.startswith("_")]
    raise ValueError(f"{name_or_path!r}: expected a pipeline with a UNet2DConditionModel 'unet' or an "
                     f"SD3Transformer2DModel 'transformer', found components {found}")


def save_model(model: DiffusionModel, folder: str) -> None:
    """Write ``model`` as a diffusers folder (``model_index.json`` + one subfolder per component)."""
    os.makedirs(folder, exist_ok=True)
    parts = {"scheduler": model.scheduler}
    parts["unet" if model.family == "unet" else "transformer"] = model.denoiser
    suffixes = ["", "_2", "_3"]
    for i, (tok, enc) in enumerate(zip(model.tokenizers, model.text_encoders)):
        parts[f"tokenizer{suffixes[i]}"] = tok
        parts[f"text_encoder{suffixes[i]}"] = enc
    index = {"_class_name": "StableDiffusionPipeline" if model.family == "unet" else "StableDiffusion3Pipeline",
             "vae": [None, None]}
    if model.vae is not None:
        parts["vae"] = model.vae
    for name, part in parts.items():
        part.save_pretrained(os.path.join(folder, name))
        lib = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
        index[name] = [lib, type(part).__name__]
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=2)


# ----------------------------------------------------------------------------------------------
# Embedded tiny models (random init from configs, fixed seed: identical on every machine)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _clip_vocab_files() -> tuple[str, str]:
    """CLIP's BPE vocabulary, written in the Hugging Face format from the copy open_clip ships — so a
    ``CLIPTokenizer`` builds with nothing downloaded (ids equal open_clip's and OpenAI's)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [v + "</w>" for v in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tempfile.mkdtemp(prefix="fastpref-clip-vocab-")
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w") as fh:
        json.dump({tok: i for i, tok in enumerate(vocab)}, fh)
    with open(merges_file, "w") as fh:
        fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def _tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(*_clip_vocab_files(), model_max_length=max_length)


def build_tiny_model(name: str = "fastpref:tiny-unet", *, sample_size: int = 16, seed: int = 0) -> DiffusionModel:
    """A randomly initialised pixel-space pipeline (3 channels, ``sample_size``², no VAE)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    max_length = 16

    def text_config(hidden):
        return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=max_length, projection_dim=hidden)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name.startswith("fastpref:tiny-unet"):
            unet = UNet2DConditionModel(
                sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                # cross-attention only at the coarser level: at 16×16 it would cost 2× the whole step on a CPU
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=16,
                # the prompt also enters every ResNet block through the time embedding (attention-pooled text,
                # diffusers' addition_embed_type="text"): a global property such as the colour is then learnt
                # in a few hundred steps, where cross-attention alone at 8×8 had not picked it up after 400
                addition_embed_type="text", addition_embed_type_num_heads=4,
            )
            pred = "v_prediction" if name.endswith("-v") else "epsilon"
            sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=pred)
            return DiffusionModel("unet", unet, sched, [_tiny_tokenizer(max_length)], [CLIPTextModel(text_config(32))])
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=3, out_channels=3, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
            pos_embed_max_size=sample_size,
        )
        encoders = [CLIPTextModelWithProjection(text_config(16)) for _ in range(2)]
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        return DiffusionModel("sd3", transformer, sched, [_tiny_tokenizer(max_length) for _ in range(2)], encoders)

