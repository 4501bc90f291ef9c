"""CLIP embeddings of each pair for ``--loss rpo`` / ``--loss orrpo`` (Diffusion-RPO, Gu et al., 2024,
arXiv:2406.06382): ``f(winner image, prompt)`` and ``f(loser image, prompt)`` from an open_clip model.

* per step (default): from the batch's pixels and captions, under ``torch.no_grad()``;
* with ``--cache_latents`` (the batch then holds no pixels): once for every dataset row the run reads,
  into a file next to the latent cache (``clip-<fingerprint>.safetensors`` in ``--latent_cache_dir``,
  :func:`clip_cache_for_run`) that the step looks up by row. Its fingerprint is the latent cache's (the
  data, rows, resolution) and the CLIP model's (:func:`clip_fingerprint`: ``--clip_model``,
  ``--clip_pretrained`` — a tag, or a file by path, size and time — ``--clip_combiner`` and the
  open_clip version); a run that finds the file loads no CLIP model.

The model is ``--clip_model`` (an open_clip name such as ``ViT-H-14``, or ``fastpref:tiny-clip``, a small
randomly initialised CLIP built from a config, nothing downloaded) with ``--clip_pretrained`` (an
open_clip tag or a local checkpoint file; ``None``: random initialisation). Pixels in [−1, 1] are mapped to
[0, 1], resized to the model's input size and normalised with its mean and std, as its ``preprocess``
does for a square image. Embeddings combine as :func:`fastpref.clip.rpo_embeddings` (``--clip_combiner``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastpref.clip import COMBINERS, rpo_embeddings

__all__ = ["TINY_CLIP", "RPO_TAU", "CLIP_FORMAT", "check_clip_flags", "default_tau", "ClipEmbedder",
           "build_clip_embedder", "clip_fingerprint", "ClipTable", "clip_cache_for_run"]

TINY_CLIP = "fastpref:tiny-clip"
#: Diffusion-RPO's τ per base model (Gu et al., 2024, Table 1): 0.01 on SD1.5, 0.5 on SDXL.
RPO_TAU = {"sd15": 0.01, "sdxl": 0.5}


def _open_clip():
    try:
        import open_clip
    except ImportError:  # pragma: no cover - open_clip is a dependency of the trainer extra
        raise ValueError("--loss rpo/orrpo needs open_clip: pip install open_clip_torch") from None
    return open_clip


def check_clip_flags(clip_model, clip_pretrained, clip_combiner, pretrained_model_name_or_path) -> None:
    """Refuse bad CLIP flags before anything is loaded (one ValueError naming the flag)."""
    if clip_model is None:
        if not str(pretrained_model_name_or_path).startswith("fastpref:"):
            raise ValueError("--loss rpo/orrpo needs --clip_model: an open_clip model name, e.g. --clip_model ViT-H-14 "
                             "--clip_pretrained laion2b_s32b_b79k (the default fastpref:tiny-clip is only for the "
                             "embedded tiny models)")
        clip_model = TINY_CLIP
    if not isinstance(clip_model, str):
        raise ValueError(f"--clip_model must be an open_clip model name or {TINY_CLIP}, got {clip_model!r}")
    if clip_model == TINY_CLIP:
        if clip_pretrained is not None:
            raise ValueError(f"--clip_model {TINY_CLIP} is randomly initialised: leave --clip_pretrained unset, "
                             f"got {clip_pretrained!r}")
    else:
        open_clip = _open_clip()
        if clip_model not in open_clip.list_models():
            raise ValueError(f"--clip_model must be an open_clip model name (open_clip.list_models(), e.g. ViT-B-32, "
                             f"ViT-H-14) or {TINY_CLIP}, got {clip_model!r}")
        if clip_pretrained is not None:
            tags = open_clip.list_pretrained_tags_by_model(clip_model)
            if not isinstance(clip_pretrained, str) or not (clip_pretrained in tags or os.path.isfile(clip_pretrained)):
                raise ValueError(f"--clip_pretrained must be one of {clip_model}'s open_clip tags "
                                 f"({', '.join(tags) or 'none'}) or an existing checkpoint file, got {clip_pretrained!r}")
    if clip_combiner not in COMBINERS:
        raise ValueError(f"--clip_combiner must be one of {', '.join(COMBINERS)}, got {clip_combiner!r}")


def default_tau(model) -> float:
    """τ of the paper for the base model: 0.5 for SDXL (the ``sdxl`` family: added ``text_time``
    conditioning), else 0.01 (SD1.5; the paper gives no value for SD3-style transformers, and 0.01 is also
    the best of its τ ablation)."""
    if model.family == "sdxl":
        return RPO_TAU["sdxl"]
    return RPO_TAU["sd15"]


def _tiny_clip():
    open_clip = _open_clip()
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
            text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
        )
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return model, None  # tokenizer None: open_clip.tokenize at the model's context length


class ClipEmbedder:
    """``(win_emb, lose_emb)`` ``(B, K)`` fp32 unit rows for a batch of pairs; no gradient.

    ``table``: ``{row: (2, K)}`` filled by :meth:`fill` (``--cache_latents``): the batch is then looked up
    by ``batch["index"]`` instead of being encoded."""

    def __init__(self, model, tokenizer=None, combiner: str = "mean"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.combiner = tokenizer, combiner
        size = model.visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
        self.table: dict[int, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [−1, 1] → the model's input: [0, 1], resized (bicubic), normalised."""
        x = (pixels.float().to(self.device) + 1) / 2
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """From pixels ``(B, 2, 3, H, W)`` (winner first) and the B captions."""
        win, lose = self.preprocess(pixel_values[:, 0]), self.preprocess(pixel_values[:, 1])
        return rpo_embeddings(self.model, win, lose, list(captions), tokenizer=self.tokenizer, combiner=self.combiner)

    @torch.no_grad()
    def fill(self, dataset, rows, batch_size: int = 32) -> None:
        """Encode every readable row of ``dataset`` (a pixel dataset) once into the table."""
        from fastpref.train.data import CorruptPair

        self.table = {}
        rows = list(rows)
        for start in range(0, len(rows), batch_size):
            items = [it for it in (dataset[i] for i in rows[start: start + batch_size])
                     if it is not None and not isinstance(it, CorruptPair)]
            if not items:
                continue
            win, lose = self.encode(torch.stack([it["pixel_values"] for it in items]), [it["caption"] for it in items])
            for k, it in enumerate(items):
                self.table[int(it["index"])] = torch.stack([win[k], lose[k]]).cpu()

    def __call__(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        if "pixel_values" in batch and batch["pixel_values"] is not None:
            win, lose = self.encode(batch["pixel_values"], batch["caption"])
        elif self.table is not None:
            pairs = torch.stack([self.table[int(i)] for i in batch["index"]])
            win, lose = pairs[:, 0], pairs[:, 1]
        else:
            raise ValueError("a latent-cache batch holds no pixels: fill the CLIP embedding table first")
        return win.to(device), lose.to(device)


def build_clip_embedder(cfg, device) -> ClipEmbedder:
    """The embedder of ``cfg`` (flags already checked), in fp32 on ``device``."""
    name = cfg.clip_model or TINY_CLIP
    if name == TINY_CLIP:
        model, tokenizer = _tiny_clip()
    else:
        open_clip = _open_clip()
        model = open_clip.create_model(name, pretrained=cfg.clip_pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    return ClipEmbedder(model.to(device), tokenizer, cfg.clip_combiner)


# ----------------------------------------------------------------------------------------------
# --cache_latents: the embeddings on disk, next to the latent cache
# ----------------------------------------------------------------------------------------------

CLIP_FORMAT = "fastpref-clip-embeddings-v1"


def clip_fingerprint(cfg) -> dict[str, str]:
    """What the embeddings depend on besides the images and captions, known without loading the model:
    the model name, its weights (an open_clip tag, or a checkpoint file by path, size and modification
    time; ``none`` for random initialisation), the combiner and the open_clip version (its model
    definitions and preprocessing)."""
    from fastpref.train.cache import files_fingerprint

    pretrained = cfg.clip_pretrained
    if pretrained is not None and os.path.isfile(pretrained):
        pretrained = f"file {files_fingerprint([pretrained])}"
    return {"clip_model": cfg.clip_model or TINY_CLIP, "clip_pretrained": str(pretrained or "none"),
            "clip_combiner": cfg.clip_combiner, "open_clip": _open_clip().__version__}


class ClipTable:
    """The embeddings of :func:`clip_cache_for_run`'s file: ``(win_emb, lose_emb)`` of a batch by
    ``batch["index"]``, like :class:`ClipEmbedder` (no model in memory)."""

    def __init__(self, emb: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor):
        from fastpref.train.cache import _positions

        self.emb, self.rows, self.valid = emb, rows, valid  # (R, 2, K), (R,), (R,)
        self._pos = _positions(rows)

    def __call__(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        from fastpref.train.cache import _lookup

        k = _lookup(self._pos, batch["index"], "CLIP embedding cache")
        if not bool(self.valid[k].all()):
            raise ValueError(f"rows {batch['index'][~self.valid[k]].tolist()} were unreadable when the CLIP "
                             "embedding cache was built")
        pairs = self.emb[k]
        return pairs[:, 0].to(device), pairs[:, 1].to(device)


def clip_cache_for_run(cfg, latents, dataset, rows, device, *, build: bool = True, wait=None) -> ClipTable:
    """``--loss rpo/orrpo --cache_latents``: the rows' embeddings from ``clip-<fingerprint>.safetensors``
    in the latent cache's folder; computed first (loading the CLIP model) when the file is not there and
    ``build`` (the main process; the others ``wait()`` for it). ``latents``: the run's
    :class:`~fastpref.train.cache.LatentCache`, whose fingerprint names the data."""
    from safetensors.torch import load_file

    from fastpref.train.cache import _check, _read_fingerprint, _save, _sha256

    fingerprint = {"format": CLIP_FORMAT, **{f"latents.{k}": v for k, v in latents.fingerprint.items()},
                   **clip_fingerprint(cfg)}
    path = os.path.join(os.path.dirname(os.path.abspath(latents.path)),
                        f"clip-{_sha256(fingerprint)[:16]}.safetensors")
    if build and not os.path.isfile(path):
        rows = [int(i) for i in rows]
        print(f"--cache_latents: CLIP embeddings of {len(rows)} pairs once into {path}")
        embedder = build_clip_embedder(cfg, device)
        embedder.fill(dataset, rows)
        table = embedder.table
        if not table:
            raise ValueError("the CLIP embedding cache: no row of the dataset could be read")
        blank = torch.zeros_like(next(iter(table.values())))
        _save(path, {"rows": torch.tensor(rows, dtype=torch.long),
                     "valid": torch.tensor([i in table for i in rows]),
                     "emb": torch.stack([table.get(i, blank) for i in rows])}, CLIP_FORMAT, fingerprint)
        del embedder
    if wait is not None:
        wait()
    fix = "delete it to rebuild it for this run"
    _check(_read_fingerprint(path, CLIP_FORMAT, "CLIP embedding cache", fix), fingerprint, path,
           "CLIP embedding cache", fix)
    tensors = load_file(path)
    return ClipTable(tensors["emb"], tensors["rows"], tensors["valid"])
