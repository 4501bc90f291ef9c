"""Training configuration: one dataclass, the diffusers-style command line, and a TOML equivalent.

Every field is a flag of the same name (``--learning_rate 1e-4``) and a key of the same name in a
TOML file (``learning_rate = 1e-4``); flags given on the command line override the file, which
overrides the defaults. :meth:`TrainConfig.validate` refuses a bad value before anything is loaded,
with a message that says what to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field

from fastpref.train.models import TINY_MODELS
from fastpref.train.noise import WEIGHTING_SCHEMES
from fastpref.train.reference import REFERENCE_MODES
from fastpref.train.transforms import check_transform_flags

__all__ = ["TrainConfig", "build_parser", "parse_args", "config_from_values", "load_toml", "catalogue"]

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class TrainConfig:
    """All settings of one ``fastpref-train`` run (flag = field name)."""

    # -- model: a hub id, a local diffusers folder, or an embedded tiny model built from configs
    pretrained_model_name_or_path: str = "fastpref:tiny-unet"
    revision: str | None = None
    variant: str | None = None  # diffusers' weight variant (fp16, …) of every component with weights
    pretrained_vae_model_name_or_path: str | None = None  # a separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
    # -- data: "synthetic", a Pick-a-Pic-style parquet file or folder of them, or a metadata.jsonl folder
    dataset: str = "synthetic"
    synthetic_size: int = 512
    max_train_pairs: int | None = None
    eval_pairs: int = 32
    resolution: int | None = None  # default: the model's native resolution
    # -- the pair's image transform (diffusers' DPO scripts): shorter side to --resolution, then a crop,
    #    the same for both images; the crop's top-left and the original size are SDXL's time ids
    center_crop: bool = False  # the default crop; named for the diffusers flag
    random_crop: bool = False
    random_flip: bool = False  # horizontal flip with probability ½
    dataloader_num_workers: int = 0
    # -- objective
    loss: str = "dmpo"
    beta: float | None = None  # None: the loss's default (dpo 5000, dmpo 2000, ipo 0.1, …)
    alpha: float = 0.01  # DMPO's α
    reference_mode: str = "auto"
    ref_cache: str | None = None  # --reference_mode cache: the file fastpref-precompute wrote
    # -- flow matching (SD3, Flux): the timestep density of diffusers' scripts; None: the family's script
    #    default (SD3 logit_normal, Flux none)
    weighting_scheme: str | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5  # Flux guidance-distilled checkpoints (FLUX.1-dev): the guidance embedding's value
    # -- --loss rpo / orrpo: CLIP embeddings of each pair's images with its prompt (open_clip)
    clip_model: str | None = None  # an open_clip name (ViT-H-14, …); None: fastpref:tiny-clip (tiny models only)
    clip_pretrained: str | None = None  # an open_clip tag or a checkpoint file; None: random initialisation
    clip_combiner: str = "mean"  # mean | image | text: how image and prompt embeddings combine
    rpo_tau: float | None = None  # τ of the weights; None: the paper's per model (0.01 SD1.5, 0.5 SDXL)
    # -- --loss dro: the online half from a lagged policy's sampling trajectories (fastpref.train.dro);
    #    defaults of basiclab/DiffusionDRO train.py (--margin, --buffer_size, --buffer_num_inference_steps,
    #    --buffer_update_steps 16 micro-batches = 1 update at their gradient accumulation 16)
    dro_margin: float = 0.001  # m of relu(d + m)
    dro_refresh_steps: int = 1  # optimizer steps between refreshes of the lagged copy from the policy
    dro_buffer_size: int = 4  # trajectories kept (the newest); each micro-batch adds one per pair
    dro_num_inference_steps: int = 20  # sampling steps of each trajectory (DPM-Solver++ / Euler)
    # -- VAE latents and text embeddings computed once and read by every step (diffusers' flag name)
    cache_latents: bool = False
    latent_cache_dir: str | None = None  # None: OUTPUT_DIR/cache; share one folder between runs to reuse it
    # -- optional supervised warm-up: plain diffusion loss on both images of each pair, then the
    #    preference loss starts from (and uses as its reference) the warmed-up model
    sft_steps: int = 0
    sft_learning_rate: float | None = None  # None: --learning_rate
    # -- what is trained
    lora_rank: int = 8  # 0 = full fine-tune
    lora_alpha: int | None = None  # None: = lora_rank
    # -- memory and speed (the diffusers SDXL DPO script's flags; fastpref/train/memory.py)
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False  # bitsandbytes.optim.AdamW8bit
    allow_tf32: bool = False
    vae_encode_batch_size: int = 8  # images per VAE encode call (in the step and the latent-cache build)
    # -- optimisation
    mixed_precision: str = "no"
    train_batch_size: int = 4  # pairs per device per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_train_steps: int = 100
    seed: int = 0
    # -- checkpoints and outputs
    output_dir: str = "fastpref-output"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    # -- logging and evaluation
    logging_steps: int = 1
    validation_steps: int = 0  # evaluate every K optimizer steps (0: only at the end)
    validation_prompts: list[str] = field(default_factory=list)  # empty: the dataset's own
    validation_seed: int = 0
    num_inference_steps: int = 20
    report_to: str = "csv,tensorboard,png"  # png: curves.png at the end

    # ------------------------------------------------------------------------------------------
    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0

    def split_rows(self, num_rows: int) -> tuple[list[int], list[int]]:
        """``(train rows, held-out rows)`` of a dataset of ``num_rows``: the last ``eval_pairs`` rows (at
        most a quarter) are held out and never trained on; ``max_train_pairs`` caps the rest."""
        n_eval = min(self.eval_pairs, num_rows // 4)
        train_idx = list(range(num_rows - n_eval))
        if self.max_train_pairs is not None:
            train_idx = train_idx[: self.max_train_pairs]
        return train_idx, list(range(num_rows - n_eval, num_rows))

    def validate(self, *, require_caches: bool = True) -> "TrainConfig":
        """Refuse bad values before anything is built. Returns ``self``. ``require_caches=False``:
        ``--ref_cache`` need not exist yet (``fastpref-precompute`` writes it)."""
        from fastpref.train.objectives import OBJECTIVES, loss_choices_error

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
            need(ok, f"--{name} must be an integer {'≥ 0' if allow_zero else '≥ 1'}, got {v!r}")

        def finite(name: str, lo: float | None = None, strict: bool = True) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok and lo is not None:
                ok = v > lo if strict else v >= lo
            bound = "" if lo is None else f" {'>' if strict else '≥'} {lo:g}"
            need(ok, f"--{name} must be a finite number{bound}, got {v!r}")

        need(
            isinstance(self.pretrained_model_name_or_path, str) and self.pretrained_model_name_or_path != "",
            "--pretrained_model_name_or_path is required: a hub id (stabilityai/stable-diffusion-3.5-medium), a "
            f"local diffusers folder, or {' / '.join(TINY_MODELS)}",
        )
        need(self.pretrained_vae_model_name_or_path is None or (
            isinstance(self.pretrained_vae_model_name_or_path, str) and self.pretrained_vae_model_name_or_path != ""),
             "--pretrained_vae_model_name_or_path must be a VAE folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix), "
             f"got {self.pretrained_vae_model_name_or_path!r}")
        need(self.variant is None or (isinstance(self.variant, str) and self.variant.isidentifier()),
             f"--variant must be a weight variant name such as fp16 (files *.fp16.safetensors), got {self.variant!r}")
        for name in ("gradient_checkpointing", "use_8bit_adam", "allow_tf32"):
            need(isinstance(getattr(self, name), bool), f"--{name} must be true or false, got {getattr(self, name)!r}")
        need(self.loss in OBJECTIVES, loss_choices_error(self.loss))
        if OBJECTIVES[self.loss].needs_clip:
            from fastpref.train.clip_embed import check_clip_flags

            check_clip_flags(self.clip_model, self.clip_pretrained, self.clip_combiner,
                             self.pretrained_model_name_or_path)
            if self.rpo_tau is not None:
                finite("rpo_tau", 0.0)
        if self.beta is not None:
            finite("beta", 0.0)
        if self.loss == "dro":
            from fastpref.train.dro import refuse_reference_mode

            refuse_reference_mode(self.reference_mode)
            finite("dro_margin", 0.0, strict=False)
            for name in ("dro_refresh_steps", "dro_buffer_size", "dro_num_inference_steps"):
                positive_int(name)
        need(
            isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0,
            f"--alpha must lie strictly between 0 and 1 (DMPO's α; published 0.01 or 0.1), got {self.alpha!r}",
        )
        modes = ("auto", *REFERENCE_MODES)
        need(self.reference_mode in modes, f"--reference_mode must be one of {', '.join(modes)}, got {self.reference_mode!r}")
        if self.reference_mode == "cache":
            need(isinstance(self.ref_cache, str) and (os.path.isfile(self.ref_cache) or not require_caches),
                 f"--reference_mode cache needs --ref_cache PATH of an existing file (write it with "
                 f"fastpref-precompute and the run's flags, e.g. --config RUN.toml), got {self.ref_cache!r}")
        need(isinstance(self.cache_latents, bool), f"--cache_latents must be true or false, got {self.cache_latents!r}")
        need(self.latent_cache_dir is None or (isinstance(self.latent_cache_dir, str) and self.latent_cache_dir != ""),
             f"--latent_cache_dir must be a folder path, got {self.latent_cache_dir!r}")
        need(self.mixed_precision in MIXED_PRECISION, f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        need(self.lr_scheduler in LR_SCHEDULERS, f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        need(self.weighting_scheme is None or self.weighting_scheme in WEIGHTING_SCHEMES,
             f"--weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {self.weighting_scheme!r}")
        for name in ("logit_mean", "mode_scale", "guidance_scale"):
            finite(name)
        finite("logit_std", 0.0)
        positive_int("lora_rank", allow_zero=True)
        if self.lora_alpha is not None:
            positive_int("lora_alpha")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                     "logging_steps", "num_inference_steps", "synthetic_size", "vae_encode_batch_size"):
            positive_int(name)
        for name in ("sft_steps", "lr_warmup_steps", "validation_steps", "eval_pairs", "dataloader_num_workers", "seed",
                     "validation_seed"):
            positive_int(name, allow_zero=True)
        check_transform_flags(self.resolution, self.center_crop, self.random_crop, self.random_flip)
        for name in ("max_train_pairs", "checkpoints_total_limit"):
            if getattr(self, name) is not None:
                positive_int(name)
        finite("learning_rate", 0.0)
        if self.sft_learning_rate is not None:
            finite("sft_learning_rate", 0.0)
        finite("adam_weight_decay", 0.0, strict=False)
        finite("adam_epsilon", 0.0)
        finite("max_grad_norm", 0.0)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and 0.0 <= v < 1.0, f"--{name} must lie in [0, 1), got {v!r}")
        need(
            isinstance(self.validation_prompts, list) and all(isinstance(p, str) and p.strip() for p in self.validation_prompts),
            f"--validation_prompts must be a list of non-empty strings, got {self.validation_prompts!r}",
        )
        unknown = set(filter(None, self.report_to.split(","))) - {"csv", "tensorboard", "png"}
        need(not unknown, f"--report_to takes a comma-separated subset of csv,tensorboard,png, got {self.report_to!r}")
        need(isinstance(self.output_dir, str) and self.output_dir != "", "--output_dir must be a folder path")
        if self.resume_from_checkpoint not in (None, "latest"):
            need(
                os.path.isdir(self.resume_from_checkpoint),
                f"--resume_from_checkpoint must be 'latest' or an existing checkpoint folder, got {self.resume_from_checkpoint!r}",
            )
        return self

    def model_options(self) -> dict:
        """The :func:`~fastpref.train.models.load_model` keywords of this run."""
        return {"weighting_scheme": self.weighting_scheme, "logit_mean": self.logit_mean, "logit_std": self.logit_std,
                "mode_scale": self.mode_scale, "guidance_scale": self.guidance_scale}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Command line and TOML
# ----------------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _loss_help() -> str:
    from fastpref.train.objectives import OBJECTIVES

    return "one of " + ", ".join(f"{n} ({o.doc})" for n, o in sorted(OBJECTIVES.items()))


_HELP = {
    "loss": _loss_help,
    "resolution": lambda: "training image size: the shorter side is resized to it, then a square crop",
    "center_crop": lambda: "crop the centre of both images of a pair (the default crop)",
    "random_crop": lambda: "crop both images of a pair at one random top-left (drawn per pair and --seed)",
    "random_flip": lambda: "flip both images of a pair horizontally with probability 1/2 (drawn per pair and --seed)",
}


def catalogue() -> str:
    """What ``--help`` lists after the flags: the model families, the embedded models and the losses
    (generated from :data:`~fastpref.train.models.FAMILIES`, :data:`~fastpref.train.models.TINY_MODELS` and
    the ``--loss`` registry, so a new entry there appears here)."""
    import textwrap

    from fastpref.train.models import FAMILIES, TINY_MODELS
    from fastpref.train.objectives import OBJECTIVES

    def para(text: str) -> str:
        return textwrap.fill(text, width=100, subsequent_indent="  ", break_on_hyphens=False)

    lines = ["model families (--pretrained_model_name_or_path: a hub id or a local diffusers folder):"]
    lines += [para(f"  {name}: {text}") for name, text in FAMILIES.items()]
    lines.append(para("embedded models (random init from configs, nothing downloaded): " + ", ".join(TINY_MODELS)))
    lines.append(para("losses (--loss): " + ", ".join(sorted(OBJECTIVES))))
    return "\n".join(lines)


def _field_type(f: dataclasses.Field) -> str:
    return str(f.type).replace(" ", "")


def _parse_bool_none(kind: str):
    base = kind.split("|")[0]

    def convert(text: str):
        if "None" in kind and text.lower() in ("none", "null", ""):
            return None
        return {"int": int, "float": float, "str": str}[base](text)

    convert.__name__ = base  # argparse names the type in its error message
    return convert


def build_parser(prog: str = "fastpref-train", description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description or "Preference fine-tuning (Diffusion-DPO, DMPO, …) of diffusers UNet and SD3-style "
        "models with fastpref's fused losses. Every flag is also a key of --config FILE.toml.",
        epilog=catalogue(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="TOML file with any of the flags below as keys")
    for name, f in _FIELDS.items():
        kind = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{_HELP[name]()} (default: {default!r})" if name in _HELP else f"(default: {default!r})"
        if kind.startswith("list"):
            p.add_argument(f"--{name}", nargs="+", default=None, help=help_text)
        elif kind == "bool":
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(f"--{name}", type=_parse_bool_none(kind), default=None, help=help_text)
    return p


def load_toml(path: str) -> dict:
    """Read a TOML config; unknown keys are refused (a typo must not silently fall back to a default)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} does not exist")
    with open(path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {path!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"--config {path!r} has unknown keys {unknown}; valid keys are the flag names, e.g. learning_rate")
    return data


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < TOML file < command-line flags; then :meth:`TrainConfig.validate`."""
    return config_from_values(build_parser().parse_args(argv))


def config_from_values(ns: argparse.Namespace, *, require_caches: bool = True) -> TrainConfig:
    """The config of parsed flags (``ns.config``: a TOML file under them); extra parser arguments that are
    not training options are ignored."""
    values: dict = {}
    if ns.config is not None:
        values.update(load_toml(ns.config))
    values.update({k: v for k, v in vars(ns).items() if k in _FIELDS and v is not None})
    return config_from_dict(values).validate(require_caches=require_caches)


def config_from_dict(values: dict) -> TrainConfig:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown training options {unknown}")
    cfg = TrainConfig(**values)
    # TOML integers where floats are expected are fine; floats where integers are expected are not.
    for name, f in _FIELDS.items():
        v = getattr(cfg, name)
        if _field_type(f).startswith("float") and isinstance(v, int) and not isinstance(v, bool):
            setattr(cfg, name, float(v))
    return cfg
