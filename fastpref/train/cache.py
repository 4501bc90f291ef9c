"""The trainer's caches: latents + text embeddings (``--cache_latents``) and reference errors
(``--reference_mode cache``), one fingerprint scheme, one precompute (``fastpref-precompute``).

Neither the VAE, the text encoders nor a frozen reference model is trained, so what they compute for a
pair is fixed once the per-pair draws are (:mod:`fastpref.train.noise`):

* the **latent cache** holds, per dataset row, the two VAE latents (the posterior sample drawn with
  ``(seed, row, image)``) and the caption's conditioning tensors, in the dtype the encoders run in.
  With ``--cache_latents`` the step reads them and runs no VAE and no text encoder; the numbers are
  those of an uncached run.
* the **reference-error cache** holds ``ref_err[epoch, row] = (e_ref[winner], e_ref[loser])`` for the
  noise and timestep the step draws for that (row, epoch); with ``--reference_mode cache`` the step
  runs no reference model.

Both are computed by :func:`precompute`, which runs the step's own :func:`encode`,
:func:`~fastpref.train.noise.noise_pairs` and :func:`~fastpref.train.reference.reference_prediction`,
and stored as safetensors with a fingerprint in the metadata; a cache whose fingerprint differs from
the run's is refused with the fields that differ. ``fastpref-train --cache_latents`` builds its latent
cache on first use (``--latent_cache_dir``, default ``OUTPUT_DIR/cache``, one file per fingerprint, so
runs with the same data and encoders share it); ``fastpref-precompute`` takes the training run's flags
and writes both caches that run reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from fastpref.reference import pair_errors
from fastpref.train.data import CorruptPair
from fastpref.train.noise import noise_pairs, vae_generators
from fastpref.train.reference import reference_prediction

__all__ = ["LATENTS_FORMAT", "REF_ERR_FORMAT", "module_fingerprint", "files_fingerprint", "latents_fingerprint",
           "reference_fingerprint", "encode", "LatentCache", "collate_cached", "RefErrorCache", "precompute",
           "epochs_needed", "latent_cache_for_run", "ref_cache_for_run", "main"]

LATENTS_FORMAT = "fastpref-latents-v3"
REF_ERR_FORMAT = "fastpref-ref-err-v3"
_KIND, _FINGERPRINT = "fastpref.kind", "fastpref.fingerprint"


# ----------------------------------------------------------------------------------------------
# Fingerprints: what a cache's numbers depend on
# ----------------------------------------------------------------------------------------------


def _sha256(obj) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _config_fingerprint(config) -> str:
    """A diffusers/transformers config without the bookkeeping keys (``_name_or_path`` …)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return _sha256({k: v for k, v in dict(config).items() if not str(k).startswith("_")})


def module_fingerprint(module: nn.Module, dtype: torch.dtype | None = None) -> str:
    """Config and every weight (name, dtype, shape, bytes; in ``dtype`` if given) of a model. peft
    adapters are left out and peft's ``.base_layer`` renaming undone, so a LoRA model has its base
    model's fingerprint. Hashes ~1 GB/s on a CPU."""
    config = getattr(module, "config", None)
    h = hashlib.sha256((_config_fingerprint(config) if config is not None else type(module).__qualname__).encode())
    for name, tensor in sorted(module.state_dict().items()):
        if "lora_" in name:
            continue
        t = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous().reshape(-1)
        h.update(f"{name.replace('.base_layer.', '.')}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """Files by path, size and modification time (not their bytes: instant for any dataset)."""
    entries = []
    for p in sorted(map(os.fspath, paths)):
        st = os.stat(p)
        entries.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return _sha256(entries)


_TRANSFORM_KEYS = ("resolution", "random_flip", "random_crop")  # fingerprinted as such, not as the data


def _dataset_source(dataset) -> Any:
    """Files for the file-backed datasets; the class and its plain settings for generated ones."""
    files = getattr(dataset, "files", None)
    if files is None and isinstance(getattr(dataset, "root", None), str):
        files = [os.path.join(r, f) for r, _, fs in os.walk(dataset.root) for f in fs]
    if files is not None:
        return files_fingerprint(files)
    plain = (int, float, str, bool, type(None))
    settings = {k: v for k, v in vars(dataset).items() if not k.startswith("_") and k not in _TRANSFORM_KEYS and (
        isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v)))}
    return {"class": type(dataset).__qualname__, **settings}


def _text_fingerprint(model) -> str:
    """The text conditioning: how it is assembled (family, SD3's joint width) and every tokenizer and
    encoder."""
    tokenizers = [[type(t).__name__, t.model_max_length, _sha256(sorted(t.get_vocab().items()))]
                  for t in model.tokenizers]
    joint = getattr(model.denoiser.config, "joint_attention_dim", None)  # SD3 pads the CLIP states to it
    return _sha256({"family": model.family, "joint_attention_dim": joint, "tokenizers": tokenizers,
                    "encoders": [module_fingerprint(m) for m in model.text_encoders]})


def latents_fingerprint(model, dataset, rows: Sequence[int], seed: int) -> dict[str, str]:
    """What the latent cache depends on: the dataset (files, or a generated set's settings), the image
    resolution and transform (flip, crop), which rows, the VAE (config and weights, in its dtype — the
    pipeline's own or the one ``--pretrained_vae_model_name_or_path`` / ``--variant`` loaded), the tokenizers
    and text encoders, and the seed of the VAE samples. Not ``--vae_encode_batch_size``: chunking does not
    change the latents."""
    return {
        "format": LATENTS_FORMAT,
        "dataset": _sha256(_dataset_source(dataset)),
        "resolution": str(dataset.resolution),
        "image_transform": (f"random_flip={bool(getattr(dataset, 'random_flip', False))} "
                            f"random_crop={bool(getattr(dataset, 'random_crop', False))}"),
        "rows": _sha256(list(map(int, rows))),
        "vae": module_fingerprint(model.vae) if model.vae is not None else "none (pixel space)",
        "text": _text_fingerprint(model),
        "seed": str(int(seed)),
    }


def reference_fingerprint(model, latents: Mapping[str, str], seed: int, dtype: torch.dtype) -> dict[str, str]:
    """What the reference errors depend on: the latents (their whole fingerprint), the reference model
    (the denoiser's base weights — adapters excluded — in the dtype the reference runs in), the noise
    scheduler, the timestep density, the seed of the noise draws and the precision."""
    flow = not hasattr(model.scheduler, "alphas_cumprod")
    return {
        "format": REF_ERR_FORMAT,
        "latents": _sha256(dict(latents)),
        "model": module_fingerprint(model.denoiser, dtype),
        "scheduler": _config_fingerprint(model.scheduler.config),
        "timestep_sampling": _timestep_sampling(model) if flow else "uniform",
        "seed": str(int(seed)),
        "precision": str(dtype).replace("torch.", ""),
    }


def _timestep_sampling(model) -> str:
    """The flow-matching timestep density with the parameters it reads, and Flux's guidance value (an
    input of the reference's prediction) when the transformer has the embedding."""
    scheme = model.weighting_scheme
    text = {"logit_normal": f"logit_normal(mean={model.logit_mean}, std={model.logit_std})",
            "mode": f"mode(scale={model.mode_scale})"}.get(scheme, scheme)
    if getattr(model.denoiser.config, "guidance_embeds", False):
        text += f", guidance={model.guidance_scale}"
    return text


def _check(stored: Mapping[str, str], expected: Mapping[str, str], path, what: str, fix: str) -> None:
    wrong = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    if wrong:
        details = "; ".join(f"{k}: file {stored.get(k)!r}, run {expected.get(k)!r}" for k in wrong)
        raise ValueError(f"{os.fspath(path)} is a {what} for a different {', '.join(wrong)} than this run "
                         f"({details}); {fix}")


def _read_fingerprint(path, kind: str, what: str, fix: str) -> dict[str, str]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"{what} file {os.fspath(path)!r} does not exist; {fix}")
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(_KIND) != kind:
        raise ValueError(f"{os.fspath(path)} is not a {what} (format {meta.get(_KIND)!r}, expected {kind!r}); {fix}")
    return json.loads(meta[_FINGERPRINT])


def _save(path, tensors: dict, kind: str, fingerprint: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"  # a run killed while writing leaves no half file behind
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
              metadata={_KIND: kind, _FINGERPRINT: json.dumps(dict(fingerprint), sort_keys=True)})
    os.replace(tmp, path)


def _positions(rows: torch.Tensor) -> torch.Tensor:
    """Dense map dataset row → position in a cache (−1: not cached)."""
    pos = torch.full((int(rows.max()) + 1 if rows.numel() else 0,), -1, dtype=torch.long)
    pos[rows] = torch.arange(rows.numel())
    return pos


def _lookup(pos: torch.Tensor, pair_indices, what: str) -> torch.Tensor:
    idx = torch.as_tensor(pair_indices).reshape(-1).to("cpu", torch.long)
    inside = (idx >= 0) & (idx < len(pos))
    where = torch.full_like(idx, -1)
    where[inside] = pos[idx[inside]]
    if (where < 0).any():
        raise ValueError(f"rows {idx[where < 0].tolist()} are not in the {what}")
    return where


# ----------------------------------------------------------------------------------------------
# The step's encode: VAE + text encoders, or the latent cache
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode(model, batch: dict, seed: int, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stacked latents ``(2B, C, h, w)`` (winners, then losers) and conditioning ``{name: (2B, …)}``
    of a batch: read from ``batch["latents"]``/``batch["cond"]`` (a latent-cache batch,
    :func:`collate_cached`), else the VAE (posterior sample of row i, image j drawn with
    ``(seed, i, j, −2)``), the text encoders and the images' own conditioning (SDXL's time ids). An unpaired
    batch (one image per row) gives ``(B, …)``."""
    if "latents" in batch:  # --cache_latents: no VAE, no text encoder
        rows = batch["latents"].to(device)  # (B, images, C, h, w)
        latents = torch.cat(rows.unbind(1))
        cond = {k: v.to(device) for k, v in batch["cond"].items()}
    else:
        pixels = batch["pixel_values"].to(device)  # (B, images, C, H, W)
        latents = model.encode_images(torch.cat(pixels.unbind(1)),
                                      vae_generators(seed, batch["index"], images=pixels.shape[1]))
        cond = {**model.encode_prompts(batch["caption"], device), **model.image_conditioning(batch, device)}
    images = latents.shape[0] // len(batch["index"])
    return latents, {k: torch.cat([v] * images) for k, v in cond.items()}  # a pair shares its prompt


class LatentCache(torch.utils.data.Dataset):
    """A latent cache on disk, read row by row (``safe_open`` slices: a large cache is not loaded into
    memory). ``cache[i]`` (dataset row i) is ``{"latents": (2, C, h, w), "cond": {name: tensor},
    "index": i}`` (an unpaired dataset: ``(1, C, h, w)`` and its ``"label"``), or a
    :class:`~fastpref.train.data.CorruptPair` for a row that could not be read when the cache was built."""

    def __init__(self, path, fingerprint: Mapping[str, str]):
        from safetensors import safe_open

        self.path, self.fingerprint = os.fspath(path), dict(fingerprint)
        self._file = safe_open(self.path, framework="pt")
        self.rows = self._file.get_tensor("rows")
        self.valid = self._file.get_tensor("valid")
        self._pos = _positions(self.rows)
        self._latents = self._file.get_slice("latents")
        self._cond = {k[len("cond."):]: self._file.get_slice(k) for k in self._file.keys() if k.startswith("cond.")}
        self.labels = self._file.get_tensor("labels") if "labels" in self._file.keys() else None

    @classmethod
    def load(cls, path, expected: Mapping[str, str]) -> "LatentCache":
        """Open ``path``; ValueError if its fingerprint is not ``expected`` (:func:`latents_fingerprint`)."""
        fix = "delete it, or point --latent_cache_dir elsewhere, to rebuild it for this run"
        stored = _read_fingerprint(path, LATENTS_FORMAT, "latent cache", fix)
        _check(stored, expected, path, "latent cache", fix)
        return cls(path, stored)

    def __getstate__(self):  # DataLoader workers started by spawn: reopen the file there
        return {"path": self.path, "fingerprint": self.fingerprint}

    def __setstate__(self, state):
        self.__init__(state["path"], state["fingerprint"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        k = int(_lookup(self._pos, [i], "latent cache")[0])
        if not self.valid[k]:
            return CorruptPair(int(i), f"row {int(i)} (unreadable when the latent cache was built)")
        item = {"latents": self._latents[k: k + 1][0], "cond": {n: s[k: k + 1][0] for n, s in self._cond.items()},
                "index": int(i)}
        if self.labels is not None:
            item["label"] = int(self.labels[k])
        return item


def collate_cached(items: list) -> dict:
    """:func:`fastpref.train.data.collate_pairs` for latent-cache rows: ``latents`` (B, 2, C, h, w),
    ``cond``, ``index``; :class:`~fastpref.train.data.CorruptPair` rows are dropped and handed on in
    ``corrupt`` (``{index: where}``), as ``collate_pairs`` does."""
    good = [it for it in items if not isinstance(it, CorruptPair)]
    batch = {"index": torch.tensor([it["index"] for it in good], dtype=torch.long),
             "corrupt": {it.index: it.where for it in items if isinstance(it, CorruptPair)}}
    if good:
        batch["latents"] = torch.stack([it["latents"] for it in good])
        batch["cond"] = {n: torch.stack([it["cond"][n] for it in good]) for n in good[0]["cond"]}
        if "label" in good[0]:
            batch["labels"] = torch.tensor([it["label"] for it in good], dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------
# The reference-error cache
# ----------------------------------------------------------------------------------------------


class RefErrorCache:
    """Reference errors ``ref_err`` (epochs, R, 2) of the dataset rows ``rows`` (R,) (an unpaired
    dataset: (epochs, R, 1)); :meth:`lookup` gives the ``(2B,)`` ``ref_err`` of a batch (winners first;
    unpaired: ``(B,)``) for the losses' ``ref_err=``."""

    def __init__(self, ref_err: torch.Tensor, rows: torch.Tensor, fingerprint: Mapping[str, str]):
        if ref_err.dim() != 3 or ref_err.shape[1] != rows.numel() or ref_err.shape[2] not in (1, 2):
            raise ValueError(f"ref_err must be (epochs, {rows.numel()}, 2) or (epochs, {rows.numel()}, 1), "
                             f"got {tuple(ref_err.shape)}")
        self.ref_err, self.rows, self.fingerprint = ref_err, rows, dict(fingerprint)
        self._pos = _positions(rows)

    @property
    def num_epochs(self) -> int:
        return self.ref_err.shape[0]

    @classmethod
    def load(cls, path, expected: Mapping[str, str]) -> "RefErrorCache":
        """Read ``path``; ValueError if its fingerprint is not ``expected`` (:func:`reference_fingerprint`)."""
        from safetensors.torch import load_file

        fix = "write it for this run with: fastpref-precompute --config RUN.toml (the run's flags)"
        stored = _read_fingerprint(path, REF_ERR_FORMAT, "reference-error cache", fix)
        _check(stored, expected, path, "reference-error cache", fix)
        tensors = load_file(os.fspath(path))
        return cls(tensors["ref_err"], tensors["rows"], stored)

    def save(self, path) -> None:
        _save(path, {"ref_err": self.ref_err, "rows": self.rows}, REF_ERR_FORMAT, self.fingerprint)

    def check_covers(self, rows: Sequence[int], num_epochs: int) -> None:
        """Refuse, before training starts, a run the cache does not cover."""
        missing = sorted(set(map(int, rows)) - set(self.rows.tolist()))
        if missing or num_epochs > self.num_epochs:
            raise ValueError(f"the reference-error cache holds {self.rows.numel()} rows × {self.num_epochs} epochs; "
                             f"this run needs {len(rows)} rows × {num_epochs} epochs: rerun fastpref-precompute with "
                             f"--epochs {num_epochs}")

    def lookup(self, pair_indices, epoch: int) -> torch.Tensor:
        """``(2B,)`` reference errors of the pairs at ``epoch``: winners, then losers (unpaired: ``(B,)``)."""
        if not 0 <= int(epoch) < self.num_epochs:
            raise ValueError(f"epoch {epoch} is not in the reference-error cache (epochs 0…{self.num_epochs - 1})")
        rows = self.ref_err[int(epoch)][_lookup(self._pos, pair_indices, "reference-error cache")]  # (B, images)
        return torch.cat(rows.unbind(1))


# ----------------------------------------------------------------------------------------------
# One precompute for both caches
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def precompute(model, dataset, rows: Sequence[int], *, seed: int, device, latents_path=None, ref_path=None,
               epochs: int = 0, dtype: torch.dtype = torch.float32, batch_size: int = 8,
               latents: LatentCache | None = None, progress: bool = True):
    """Run the step's encode → noise → reference predict over ``rows`` of ``dataset`` once, and write the
    latent cache to ``latents_path`` and/or the reference errors of ``epochs`` epochs to ``ref_path``.

    ``model``: a DiffusionModel placed as the run places it (encoders in the run's dtype; the denoiser —
    its adapters, if any, are switched off here — in ``dtype``, the dtype the run keeps the reference in,
    predicting under autocast to ``dtype``). ``latents``: read the rows from this latent cache instead of
    encoding them. Returns ``(LatentCache or None, RefErrorCache or None)``.
    """
    from tqdm.auto import tqdm

    from fastpref.train.data import collate_pairs

    rows = [int(i) for i in rows]
    if not rows:
        raise ValueError("precompute: no rows to cache")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name} must be an integer ≥ {1 if name == 'batch_size' else 0}, got {value!r}")
    device = torch.device(device)
    lat_fp = latents_fingerprint(model, dataset, rows, seed)
    source, collate = (latents, collate_cached) if latents is not None else (dataset, collate_pairs)
    stored: dict[int, tuple] = {}  # position → (latents (images, …), cond, label) of the readable rows
    images = 1 if getattr(dataset, "unpaired", False) else 2  # per row: a pair, or one labelled image
    # errors in fp32 as pair_errors gives them (fp64 for an fp64 reference); NaN: an unreadable row
    err_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref_err = torch.full((epochs, len(rows), images), float("nan"), dtype=err_dtype)
    was_training = model.denoiser.training
    model.denoiser.eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="precompute", unit="batch", disable=not progress):
            items = [source[i] for i in rows[start: start + batch_size]]
            batch = collate(items)  # unreadable rows dropped (their errors stay NaN)
            if not len(batch["index"]):
                continue
            pos = [start + k for k, it in enumerate(items) if not isinstance(it, CorruptPair)]
            x0, cond = encode(model, batch, seed, device)
            b = len(pos)
            if latents_path is not None:
                labels = batch.get("labels")
                for k, p in enumerate(pos):
                    stored[p] = (torch.stack([x0[j * b + k] for j in range(images)]).cpu(),
                                 {n: v[k].to("cpu", copy=True) for n, v in cond.items()},  # not a view of the batch
                                 None if labels is None else int(labels[k]))
            for epoch in range(epochs):
                noised = noise_pairs(model, x0, batch["index"], epoch, seed)
                with autocast:
                    pred = reference_prediction(model, model.denoiser, noised, cond)
                err = pair_errors(pred, noised.target).cpu()
                ref_err[epoch, pos] = err.view(images, b).T.to(err_dtype)
    finally:
        model.denoiser.train(was_training)
    rows_t = torch.tensor(rows, dtype=torch.long)
    lat_cache = ref_cache = None
    if latents_path is not None:
        if not stored:
            raise ValueError("precompute: no row of the dataset could be read")
        lat0, cond0, label0 = next(iter(stored.values()))
        tensors = {"rows": rows_t, "valid": torch.tensor([p in stored for p in range(len(rows))]),
                   "latents": torch.stack([stored[p][0] if p in stored else torch.zeros_like(lat0)
                                           for p in range(len(rows))])}
        if label0 is not None:  # unpaired: each row's label (an unreadable row: −1)
            tensors["labels"] = torch.tensor([stored[p][2] if p in stored else -1 for p in range(len(rows))])
        for n, v in cond0.items():
            tensors[f"cond.{n}"] = torch.stack([stored[p][1][n] if p in stored else torch.zeros_like(v)
                                                for p in range(len(rows))])
        _save(latents_path, tensors, LATENTS_FORMAT, lat_fp)
        lat_cache = LatentCache(latents_path, lat_fp)
    if ref_path is not None:
        ref_cache = RefErrorCache(ref_err, rows_t, reference_fingerprint(model, lat_fp, seed, dtype))
        ref_cache.save(ref_path)
    return lat_cache, ref_cache


def epochs_needed(cfg, num_train_pairs: int, world: int = 1) -> int:
    """Epochs a run of ``cfg.max_train_steps`` optimiser steps reads (drop_last batches)."""
    batches = max(1, num_train_pairs // (cfg.train_batch_size * world))
    return math.ceil(cfg.max_train_steps / math.ceil(batches / cfg.gradient_accumulation_steps))


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen parts under ``--mixed_precision`` (fp32 for ``no``)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def vae_dtype(vae, mixed_precision: str) -> torch.dtype:
    """The VAE's dtype under ``--mixed_precision``: that of the other frozen parts, except under fp16 when
    the VAE's config sets ``force_upcast`` (the SD 1.5, SDXL, SD3 and Flux VAEs; ``madebyollin/sdxl-vae-fp16-fix``
    clears it): then fp32, because their activations overflow fp16 — the rule diffusers' pipelines apply
    before decoding and its SDXL training scripts apply to the whole VAE. bf16 has fp32's range: no upcast."""
    dtype = weight_dtype(mixed_precision)
    if dtype == torch.float16 and getattr(getattr(vae, "config", None), "force_upcast", False):
        return torch.float32
    return dtype


def latent_cache_for_run(cfg, model, dataset, rows, device, *, build: bool = True, wait=None) -> LatentCache:
    """``--cache_latents``: open ``latents-<fingerprint>.safetensors`` in ``--latent_cache_dir`` (default
    ``OUTPUT_DIR/cache``), building it first (with a progress bar) if it is not there and ``build``
    (the main process; the others ``wait()`` for it)."""
    fingerprint = latents_fingerprint(model, dataset, rows, cfg.seed)
    folder = cfg.latent_cache_dir or os.path.join(cfg.output_dir, "cache")
    path = os.path.join(folder, f"latents-{_sha256(fingerprint)[:16]}.safetensors")
    if build and not os.path.isfile(path):
        print(f"--cache_latents: encoding {len(rows)} pairs once into {path}")
        precompute(model, dataset, rows, seed=cfg.seed, device=device, latents_path=path,
                   batch_size=cfg.train_batch_size)
    if wait is not None:
        wait()
    return LatentCache.load(path, fingerprint)


def ref_cache_for_run(cfg, model, dataset, rows) -> RefErrorCache:
    """``--reference_mode cache``: ``--ref_cache``, checked against this run's fingerprint."""
    fingerprint = reference_fingerprint(model, latents_fingerprint(model, dataset, rows, cfg.seed), cfg.seed,
                                        weight_dtype(cfg.mixed_precision))
    return RefErrorCache.load(cfg.ref_cache, fingerprint)


def main(argv: list[str] | None = None) -> int:
    """``fastpref-precompute``: the caches a ``fastpref-train`` run with the same flags reads —
    the latent cache (``--cache_latents``) and/or the reference errors (``--reference_mode cache
    --ref_cache PATH``) — computed once, e.g. on a bigger machine."""
    import sys

    from fastpref.train.config import build_parser

    parser = build_parser(prog="fastpref-precompute", description=main.__doc__)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of reference errors (default: what --max_train_steps reads on one process)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        _precompute_for_run(args)
    except ValueError as exc:  # a bad flag, config or dataset: say what to fix, no traceback
        print(f"fastpref-precompute: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _precompute_for_run(args) -> None:
    from fastpref.train.config import config_from_values
    from fastpref.train.data import build_dataset
    from fastpref.train.models import load_model

    cfg = config_from_values(args, require_caches=False)
    if not (cfg.cache_latents or cfg.reference_mode == "cache"):
        raise ValueError("nothing to precompute: give --cache_latents and/or --reference_mode cache --ref_cache PATH")
    if cfg.reference_mode == "cache" and not cfg.ref_cache:
        raise ValueError("--reference_mode cache needs --ref_cache PATH (the file to write)")
    if cfg.reference_mode == "cache" and cfg.sft_steps:
        raise ValueError("--sft_steps: the run's reference is the warmed-up model, which exists only after the "
                         "warm-up; precompute with --pretrained_model_name_or_path OUTPUT_DIR/sft_model --sft_steps 0")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be an integer ≥ 1, got {args.epochs}")
    model = load_model(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant,
                       vae=cfg.pretrained_vae_model_name_or_path, **cfg.model_options())
    model.vae_encode_batch_size = cfg.vae_encode_batch_size
    dataset = build_dataset(cfg.dataset, resolution=cfg.resolution or 0, synthetic_size=cfg.synthetic_size,
                            seed=cfg.seed, random_flip=cfg.random_flip, random_crop=cfg.random_crop)
    dataset.resolution = cfg.resolution or model.resolution
    train_idx, eval_idx = cfg.split_rows(len(dataset))
    rows = sorted(train_idx + eval_idx)
    dtype = weight_dtype(cfg.mixed_precision)
    for m in [*model.frozen_modules(), model.denoiser]:  # as the run places them (its reference: in the run's dtype)
        m.requires_grad_(False).eval().to(args.device)
        m_dtype = vae_dtype(m, cfg.mixed_precision) if m is model.vae else dtype
        if m_dtype != torch.float32:
            m.to(m_dtype)
    model.latents_dtype = dtype
    latents = None
    if cfg.cache_latents:
        latents = latent_cache_for_run(cfg, model, dataset, rows, args.device)
        print(f"latent cache: {latents.path}")
    if cfg.reference_mode == "cache":
        epochs = args.epochs or epochs_needed(cfg, len(train_idx))
        precompute(model, dataset, rows, seed=cfg.seed, device=args.device, ref_path=cfg.ref_cache, epochs=epochs,
                   dtype=dtype, batch_size=cfg.train_batch_size, latents=latents)
        print(f"wrote {cfg.ref_cache}: reference errors of {len(rows)} pairs × {epochs} epochs")

if __name__ == "__main__":
    raise SystemExit(main())
