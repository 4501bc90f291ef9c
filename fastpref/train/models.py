"""Diffusion models for the trainer: load a diffusers pipeline's parts, encode images and prompts, predict, sample.

Three families:

* ``unet`` — ``UNet2DConditionModel`` + CLIP text encoder + DDPM scheduler (SD1.5-style), ε- or
  v-prediction (the scheduler config's ``prediction_type``);
* ``sdxl`` — the same with SDXL's two CLIP encoders and added conditioning (``addition_embed_type =
  "text_time"``: pooled text and the per-image size/crop ``time_ids``; :mod:`fastpref.train.sdxl`);
* ``sd3`` — ``SD3Transformer2DModel`` + CLIP (+ CLIP-2, + T5) encoders + ``FlowMatchEulerDiscreteScheduler``:
  ``x_t = (1 − σ)·x0 + σ·ε`` and the target ``ε − x0`` (rectified flow, the SD3 recipe). SD3.5's
  transformers (``dual_attention_layers``, ``qk_norm="rms_norm"``) are configs of the same class;
* ``flux`` — ``FluxTransformer2DModel`` + CLIP (pooled) + T5 (sequence) encoders, the same flow matching
  on 2×2-packed latents, with the guidance embedding of distilled checkpoints (:mod:`fastpref.train.flux`).

The transformer families sample through their own diffusers pipeline (:mod:`fastpref.train.pipelines`).

A VAE is optional: without one the model works on pixels — that is how
the embedded tiny models (``fastpref:tiny-unet``, ``fastpref:tiny-unet-v``, ``fastpref:tiny-sdxl``,
``fastpref:tiny-sd3``, ``fastpref:tiny-sd35``, ``fastpref:tiny-flux``, built from configs with a fixed seed,
nothing downloaded) stay fast on a CPU.

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

TINY_MODELS = ("fastpref:tiny-unet", "fastpref:tiny-unet-v", "fastpref:tiny-sdxl", "fastpref:tiny-sd3",
               "fastpref:tiny-sd35", "fastpref:tiny-flux")
#: DiffusionModel.family → what a pipeline of that family holds (``fastpref-train --help`` lists them)
FAMILIES = {
    "unet": "UNet2DConditionModel + CLIP text encoder, DDPM, ε- or v-prediction (SD1.5-style)",
    "sdxl": "UNet2DConditionModel with text_time conditioning + two CLIP encoders, DDPM (StableDiffusionXLPipeline)",
    "sd3": "SD3Transformer2DModel + CLIP (+ CLIP-2, + T5) encoders, flow matching (SD3, SD3.5)",
    "flux": "FluxTransformer2DModel + CLIP + T5 encoders, packed latents, flow matching (FluxPipeline)",
}
SD3_T5_TOKENS = 256  # without a T5 encoder the SD3 pipeline feeds this many zero tokens; training matches it
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers DPO script's choice (UNets)
# train_dreambooth_lora_sd3.py's list without its "attn." prefix, so that SD3.5's second attention
# (attn2.to_q …, dual_attention_layers) is adapted too
SD3_LORA_TARGET_MODULES = [*LORA_TARGET_MODULES, "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
# the diffusers training scripts' defaults per family (--weighting_scheme unset)
DEFAULT_WEIGHTING_SCHEME = {"sd3": "logit_normal", "flux": "none"}


@dataclass
class DiffusionModel:
    family: str  # "unet" | "sdxl" | "sd3" | "flux"
    denoiser: nn.Module
    scheduler: object
    tokenizers: list
    text_encoders: list
    vae: nn.Module | None = None
    weighting_scheme: str = "logit_normal"
    # the flow-matching timestep density's parameters (diffusers' compute_density_for_timestep_sampling)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5  # Flux's distilled guidance embedding (train_dreambooth_lora_flux.py's default)
    sample_size: int | None = None  # latent size when the denoiser's config has none (Flux)
    vae_encode_batch_size: int | None = None  # images per VAE encode call (None: all at once)
    latents_dtype: torch.dtype | None = None  # encoded latents cast to this (None: the VAE's dtype)

    def options(self) -> dict:
        """The :func:`load_model` keywords that reproduce this model's settings."""
        return {"weighting_scheme": self.weighting_scheme, "logit_mean": self.logit_mean, "logit_std": self.logit_std,
                "mode_scale": self.mode_scale, "guidance_scale": self.guidance_scale}

    # -- shapes ------------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        if self.family in ("sd3", "flux"):
            return "flow_matching"
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def resolution(self) -> int:
        return (self.sample_size or self.denoiser.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        channels = self.denoiser.config.in_channels
        return channels // 4 if self.family == "flux" else channels  # Flux's input: packed 2×2 patches

    @property
    def lora_target_modules(self) -> list[str]:
        from fastpref.train import flux

        targets = {"sd3": SD3_LORA_TARGET_MODULES, "flux": flux.LORA_TARGET_MODULES}
        return targets.get(self.family, LORA_TARGET_MODULES)

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
        if self.family == "sdxl":
            from fastpref.train.sdxl import encode_prompts

            return encode_prompts(self.tokenizers, self.text_encoders, prompts, device)
        if self.family == "flux":
            from fastpref.train import flux

            return flux.encode_prompts(self, prompts, device)
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

    def image_conditioning(self, batch: dict, device) -> dict[str, torch.Tensor]:
        """Conditioning that depends on the pair's images, not its prompt: SDXL's ``time_ids`` (original
        size, crop top-left, target size); ``{}`` for the other families."""
        if self.family != "sdxl":
            return {}
        from fastpref.train.sdxl import batch_time_ids

        return {"time_ids": batch_time_ids(batch).to(device)}

    # -- latents -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Pixels (N, C, H, W) in [−1, 1] → scaled latents: ``(mean + std·z − shift)·scale`` with ``z`` of
        image k drawn from the CPU generator ``generators[k]`` (so the sample does not depend on the
        device or on which other images are encoded with it). The VAE sees ``vae_encode_batch_size``
        images per call (diffusers' ``--vae_encode_batch_size``: bounds its activation memory). The result is
        cast to ``latents_dtype`` when set (the run's weight dtype: a VAE kept in fp32 under fp16 still hands
        the denoiser fp16 latents, as diffusers' SDXL scripts do). No VAE: the pixels themselves."""
        if self.vae is None:
            return pixels
        chunk = self.vae_encode_batch_size or pixels.shape[0]
        dists = [self.vae.encode(pixels[i: i + chunk].to(self.vae.dtype)).latent_dist
                 for i in range(0, pixels.shape[0], chunk)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
        z = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
        latents = mean + std * z.to(mean.device, mean.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * self.vae.config.scaling_factor
        return latents if self.latents_dtype is None else latents.to(self.latents_dtype)

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
        if self.family == "sdxl":
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            return denoiser(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                            added_cond_kwargs=added, return_dict=False)[0]
        if self.family == "flux":
            from fastpref.train import flux

            return flux.predict(self, denoiser, noisy, timesteps, cond)
        return denoiser(noisy, timesteps, return_dict=False, **cond)[0]

    # -- sampling (evaluation grids) ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, denoiser: nn.Module, prompts: list[str], seeds: list[int], num_inference_steps: int, device) -> torch.Tensor:
        """Images in [−1, 1] for ``prompts`` from fixed ``seeds`` (no classifier-free guidance: the
        tiny models are trained without an empty prompt), through the family's own diffusers pipeline
        (:func:`fastpref.train.pipelines.sample`): DDIM for the DDPM families, Euler for flow."""
        from fastpref.train.pipelines import sample

        return sample(self, denoiser, prompts, seeds, num_inference_steps, device)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_model(name_or_path: str, *, revision: str | None = None, weighting_scheme: str | None = None,
               variant: str | None = None, vae: str | None = None, **options) -> DiffusionModel:
    """A :class:`DiffusionModel` from a hub id, a local diffusers folder or an embedded tiny model.
    ``weighting_scheme`` None: the family's diffusers training script default (SD3 ``logit_normal``, Flux
    ``none``); ``options``: ``logit_mean``, ``logit_std``, ``mode_scale``, ``guidance_scale``.
    ``variant``: diffusers' weight variant (``fp16`` → ``*.fp16.safetensors``) of every component with
    weights; ``vae``: a separate VAE folder or hub id (``--pretrained_vae_model_name_or_path``) instead of the
    pipeline's own, loaded with ``variant`` and its own default revision."""
    unknown = set(options) - {"logit_mean", "logit_std", "mode_scale", "guidance_scale"}
    if unknown:
        raise TypeError(f"load_model: unknown options {sorted(unknown)}")
    model = _load_pipeline(name_or_path, revision=revision, variant=variant, with_vae=vae is None)
    model.weighting_scheme = weighting_scheme or DEFAULT_WEIGHTING_SCHEME.get(model.family, "logit_normal")
    for name, value in options.items():
        setattr(model, name, float(value))
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


def _load_pipeline(name_or_path: str, *, revision: str | None, variant: str | None, with_vae: bool) -> DiffusionModel:
    if name_or_path in TINY_MODELS:
        return build_tiny_model(name_or_path)
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
        sched = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
        added = unet.config.addition_embed_type
        if added == "text_time":  # SDXL: both CLIP encoders, pooled text + size/crop time ids
            if not (has("text_encoder") and has("text_encoder_2")):
                raise ValueError(f"{name_or_path!r}: an SDXL UNet needs text_encoder and text_encoder_2 (the SDXL "
                                 "refiner, with text_encoder_2 only and aesthetic-score time ids, is not supported)")
            return DiffusionModel("sdxl", unet, sched, [component("tokenizer"), component("tokenizer_2")],
                                  [component("text_encoder"), component("text_encoder_2")], vae)
        if added not in (None, "text"):  # "text" reads encoder_hidden_states only
            raise ValueError(f"{name_or_path!r}: UNets with addition_embed_type={added!r} are not supported; use an "
                             "SD1.5-style UNet, an SDXL UNet (text_time) or an SD3-style transformer")
        return DiffusionModel("unet", unet, sched, [component("tokenizer")], [component("text_encoder")], vae)
    if has("transformer") and index["transformer"][1] == "SD3Transformer2DModel":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        transformer = SD3Transformer2DModel.from_pretrained(name_or_path, subfolder="transformer", **kw)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
        names = [s for s in ("", "_2", "_3") if has(f"text_encoder{s}")]
        return DiffusionModel(
            "sd3", transformer, sched, [component(f"tokenizer{s}") for s in names],
            [component(f"text_encoder{s}") for s in names], vae,
        )
    if has("transformer") and index["transformer"][1] == "FluxTransformer2DModel":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        from fastpref.train.flux import DEFAULT_SAMPLE_SIZE

        transformer = FluxTransformer2DModel.from_pretrained(name_or_path, subfolder="transformer", **kw)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
        return DiffusionModel("flux", transformer, sched, [component("tokenizer"), component("tokenizer_2")],
                              [component("text_encoder"), component("text_encoder_2")], vae,
                              sample_size=index.get(_SAMPLE_SIZE_KEY, DEFAULT_SAMPLE_SIZE))
    found = [k for k in index if not k.startswith("_")]
    raise ValueError(f"{name_or_path!r}: expected a pipeline with a UNet2DConditionModel 'unet', or an "
                     f"SD3Transformer2DModel or FluxTransformer2DModel 'transformer', found components {found}")


_SAMPLE_SIZE_KEY = "_fastpref_sample_size"  # private ("_") model_index.json key: pipelines ignore it


def save_model(model: DiffusionModel, folder: str) -> None:
    """Write ``model`` as a diffusers folder (``model_index.json`` + one subfolder per component)."""
    os.makedirs(folder, exist_ok=True)
    parts = {"scheduler": model.scheduler}
    parts["unet" if model.family in ("unet", "sdxl") else "transformer"] = model.denoiser
    suffixes = ["", "_2", "_3"]
    for i, (tok, enc) in enumerate(zip(model.tokenizers, model.text_encoders)):
        parts[f"tokenizer{suffixes[i]}"] = tok
        parts[f"text_encoder{suffixes[i]}"] = enc
    pipeline = {"unet": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
                "flux": "FluxPipeline"}
    index = {"_class_name": pipeline[model.family], "vae": [None, None]}
    if model.sample_size is not None:  # a Flux transformer's config has no size: keep a non-default one here
        index[_SAMPLE_SIZE_KEY] = model.sample_size
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
    """A randomly initialised pixel-space pipeline (3 channels, ``sample_size``², no VAE).
    ``tiny-sd35`` is ``tiny-sd3`` with SD3.5's dual attention in its first block and RMS qk-norm;
    ``tiny-flux``: :func:`fastpref.train.flux.build_tiny_flux`."""
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
        if name == "fastpref:tiny-sdxl":
            # tiny-unet's layout with SDXL's conditioning: the penultimate states of two CLIP encoders side by
            # side (16 + 16 = cross_attention_dim), and text_time: text_encoder_2's pooled projection (16) and
            # 6 time ids × 8 Fourier features enter the time embedding (16 + 48 = 64 inputs)
            unet = UNet2DConditionModel(
                sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=16, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=16 + 6 * 8,
            )
            sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
            encoders = [CLIPTextModel(text_config(16)), CLIPTextModelWithProjection(text_config(16))]
            return DiffusionModel("sdxl", unet, sched, [_tiny_tokenizer(max_length) for _ in range(2)], encoders)
        if name == "fastpref:tiny-flux":
            from fastpref.train.flux import build_tiny_flux

            tokenizers = [_tiny_tokenizer(max_length) for _ in range(2)]
            transformer, sched, encoders = build_tiny_flux(sample_size, tokenizers[1], max_length)
            return DiffusionModel("flux", transformer, sched, tokenizers, encoders, sample_size=sample_size,
                                  weighting_scheme=DEFAULT_WEIGHTING_SCHEME["flux"])
        sd35 = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if name == "fastpref:tiny-sd35" else {}
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=3, out_channels=3, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
            pos_embed_max_size=sample_size, **sd35,
        )
        encoders = [CLIPTextModelWithProjection(text_config(16)) for _ in range(2)]
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        return DiffusionModel("sd3", transformer, sched, [_tiny_tokenizer(max_length) for _ in range(2)], encoders)

