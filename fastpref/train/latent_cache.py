"""Latent and text-embedding cache: run the VAE and the text encoders once, not every step.

Every public preference trainer encodes both images of every pair with the VAE and the caption with
the text encoder(s) on every step, although neither is trained. :func:`build_latent_cache` does it
once and stores, in one safetensors file, per pair (row ``i`` of the dataset):

* ``latents``  ``(N, 2, C, h, w)`` — winner, loser: ``(latent_dist.sample(g) − shift) · scale``
  with one generator per (seed, row, image), so a row's latents do not depend on the batch size or
  on which other rows were encoded with it;
* ``cond.<name>`` — whatever ``encode_prompt(captions)`` returns per row
  (``encoder_hidden_states``, ``pooled_projections``, …), named as the model's keyword arguments.

The file's metadata holds a fingerprint (VAE and text-encoder config and weight hashes, dataset
fingerprint, seed, format version); :meth:`LatentCache.load` refuses a file whose fingerprint differs
from the one expected, naming what changed. The fingerprint helpers here are shared with the
reference-error cache (:mod:`fastpref.train.ref_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "derive_seed",
    "config_fingerprint",
    "weights_fingerprint",
    "module_fingerprint",
    "files_fingerprint",
    "check_fingerprint",
    "latent_cache_fingerprint",
    "encode_latents",
    "build_latent_cache",
    "LatentCache",
    "stack_pairs",
]

LATENT_CACHE_FORMAT = "fastpref-latent-cache-v1"
_META_KIND = "fastpref.kind"
_META_FINGERPRINT = "fastpref.fingerprint"


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, row, …): sha256, so nearby tuples give unrelated streams
    (``seed + row`` would make row r of seed s equal row r−1 of seed s+1)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of a diffusers/transformers config, without the bookkeeping keys (``_name_or_path``,
    ``_diffusers_version`` …) that do not change what the model computes."""
    if hasattr(config, "to_dict"):  # transformers PretrainedConfig
        config = config.to_dict()
    clean = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return _sha256(json.dumps(clean, sort_keys=True, default=str))


def weights_fingerprint(module: nn.Module, *, include_adapters: bool = False) -> str:
    """sha256 over every tensor of ``module.state_dict()`` (name, dtype, shape, bytes).

    peft adapters are left out by default and peft's ``.base_layer`` renaming is undone, so a model
    with LoRA adapters has the fingerprint of its base model — the reference the caches are built
    from. Hashes ~1 GB/s on a CPU: seconds for SD1.5.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not include_adapters and "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """Config and weights of a model in one hash (the config alone misses fine-tuned weights)."""
    base = module
    while hasattr(base, "module") and isinstance(base.module, nn.Module):  # DDP / accelerate wrappers
        base = base.module
    config = getattr(base, "config", None)
    cfg = config_fingerprint(config) if config is not None else type(base).__qualname__
    return _sha256(f"{cfg}|{weights_fingerprint(base)}")


def files_fingerprint(paths: Iterable[str | os.PathLike], **settings) -> str:
    """A dataset fingerprint from its files (name, size, modification time — not their bytes, so
    it is instant) and the settings that change what is read (resolution, crop, …)."""
    entries = []
    for p in sorted(map(os.fspath, paths)):
        st = os.stat(p)
        entries.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return _sha256(json.dumps({"files": entries, "settings": settings}, sort_keys=True, default=str))


def check_fingerprint(stored: Mapping[str, str], expected: Mapping[str, str], path, what: str) -> None:
    """Refuse a cache built for something else: one ValueError naming every field that differs."""
    wrong = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    if wrong:
        details = "; ".join(f"{k}: file has {stored.get(k)!r}, expected {expected.get(k)!r}" for k in wrong)
        raise ValueError(
            f"{path} is a {what} built for a different {', '.join(wrong)} ({details}). "
            "Rebuild it for this model, dataset and seed, or point to the right file."
        )


def _read_metadata(path, kind: str, what: str) -> dict[str, str]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"{what} file {os.fspath(path)!r} does not exist")
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(_META_KIND) != kind:
        raise ValueError(f"{path} is not a {what} (format {meta.get(_META_KIND)!r}, expected {kind!r})")
    return json.loads(meta[_META_FINGERPRINT])


# ----------------------------------------------------------------------------------------------
# The latent cache
# ----------------------------------------------------------------------------------------------


def latent_cache_fingerprint(
    *, vae: nn.Module, text_encoders: Sequence[nn.Module] = (), dataset_fingerprint: str, seed: int
) -> dict[str, str]:
    """What a latent cache depends on. ``dataset_fingerprint`` must change whenever the rows or the
    image transform (resolution, crop) change — e.g. :func:`files_fingerprint`."""
    if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
        raise TypeError("dataset_fingerprint must be a non-empty string (e.g. files_fingerprint(paths, resolution=…))")
    return {
        "format": LATENT_CACHE_FORMAT,
        "vae": module_fingerprint(vae),
        "text_encoders": _sha256("|".join(module_fingerprint(m) for m in text_encoders)),
        "dataset": dataset_fingerprint,
        "seed": str(int(seed)),
    }


def _pair_pixels(item: Mapping[str, Any], row: int) -> torch.Tensor:
    px = item.get("pixel_values") if isinstance(item, Mapping) else None
    if not isinstance(px, torch.Tensor):
        raise TypeError(f"dataset row {row} must be a mapping with a 'pixel_values' tensor and a 'caption'")
    if px.dim() == 3 and px.shape[0] % 2 == 0:  # diffusers DPO layout: (2·3, H, W), winner channels first
        px = px.reshape(2, px.shape[0] // 2, *px.shape[1:])
    if px.dim() != 4 or px.shape[0] != 2:
        raise ValueError(f"dataset row {row}: pixel_values must be (2, C, H, W) or (2·C, H, W), got {tuple(px.shape)}")
    return px


@torch.no_grad()
def encode_latents(vae: nn.Module, pixel_values: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``(latent_dist.sample(generator) − shift_factor) · scaling_factor``, one generator per image
    (SD1.5/SDXL have no shift; SD3/Flux do)."""
    dist = vae.encode(pixel_values).latent_dist
    latents = dist.sample(generator=list(generators))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def build_latent_cache(
    path: str | os.PathLike,
    *,
    vae: nn.Module,
    encode_prompt: Callable[[list[str]], Mapping[str, torch.Tensor]],
    dataset: Sequence[Mapping[str, Any]],
    dataset_fingerprint: str,
    seed: int,
    text_encoders: Sequence[nn.Module] = (),
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> "LatentCache":
    """Encode every pair of ``dataset`` once and write the cache to ``path``.

    Args:
        vae: a diffusers ``AutoencoderKL`` (its device and dtype are used as they are).
        encode_prompt: captions → per-row conditioning tensors named as the model's keyword arguments,
            e.g. ``{"encoder_hidden_states": (n, 77, 768)}`` or, for SD3, also ``pooled_projections``.
        dataset: ``dataset[i]`` is ``{"pixel_values": (2, 3, H, W) winner/loser in [−1, 1], "caption": str}``
            (or ``(6, H, W)``, the diffusers DPO layout).
        dataset_fingerprint: changes whenever the rows or the image transform change.
        seed: latents of row i, image j are drawn with ``derive_seed(seed, i, j)``.
        text_encoders: the modules ``encode_prompt`` uses, for the fingerprint.
        dtype: storage dtype of the tensors.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to cache")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    fingerprint = latent_cache_fingerprint(
        vae=vae, text_encoders=text_encoders, dataset_fingerprint=dataset_fingerprint, seed=seed
    )
    vae_param = next(vae.parameters())
    latents, cond = [], {}
    for start in tqdm(range(0, n, batch_size), desc="latent cache", disable=not progress):
        rows = range(start, min(start + batch_size, n))
        items = [dataset[i] for i in rows]
        px = torch.stack([_pair_pixels(item, i) for item, i in zip(items, rows)])  # (b, 2, C, H, W)
        captions = [item.get("caption") for item in items]
        for i, c in zip(rows, captions):
            if not isinstance(c, str):
                raise ValueError(f"dataset row {i}: caption must be a string, got {type(c).__name__}")
        generators = [torch.Generator().manual_seed(derive_seed(seed, i, j)) for i in rows for j in (0, 1)]
        lat = encode_latents(vae, px.flatten(0, 1).to(vae_param.device, vae_param.dtype), generators)
        latents.append(lat.reshape(len(rows), 2, *lat.shape[1:]).to("cpu", dtype))
        with torch.no_grad():
            encoded = encode_prompt(captions)
        for name, value in encoded.items():
            if not isinstance(value, torch.Tensor) or value.shape[0] != len(rows):
                raise ValueError(f"encode_prompt must return one tensor row per caption; {name!r} does not")
            cond.setdefault(name, []).append(value.detach().to("cpu", dtype))
    tensors = {"latents": torch.cat(latents)}
    tensors.update({f"cond.{name}": torch.cat(values).contiguous() for name, values in cond.items()})
    metadata = {_META_KIND: LATENT_CACHE_FORMAT, _META_FINGERPRINT: json.dumps(fingerprint, sort_keys=True)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=metadata)
    return LatentCache(path, fingerprint)


class LatentCache:
    """A latent cache on disk, read row by row (``safe_open`` slices: a 10⁶-pair cache is not loaded
    into memory). ``cache[i]`` is ``{"latents": (2, C, h, w), "cond": {name: tensor}}`` — the pair
    format :func:`stack_pairs` and ``fastpref-precompute-ref`` read."""

    def __init__(self, path, fingerprint: Mapping[str, str]):
        from safetensors import safe_open

        self.path = os.fspath(path)
        self.fingerprint = dict(fingerprint)
        self._file = safe_open(self.path, framework="pt")
        keys = list(self._file.keys())
        self._latents = self._file.get_slice("latents")
        self._cond = {k[len("cond.") :]: self._file.get_slice(k) for k in keys if k.startswith("cond.")}
        self._len = self._latents.get_shape()[0]

    @classmethod
    def load(cls, path, expected: Mapping[str, str]) -> "LatentCache":
        """Open ``path``; ValueError if it was built for another VAE, text encoder, dataset or seed
        (``expected``: :func:`latent_cache_fingerprint` of the current ones)."""
        stored = _read_metadata(path, LATENT_CACHE_FORMAT, "latent cache")
        check_fingerprint(stored, expected, path, "latent cache")
        return cls(path, stored)

    @property
    def dataset_fingerprint(self) -> str:
        """One hash of everything the rows depend on — the dataset fingerprint of a reference-error
        cache built from this latent cache."""
        return _sha256(json.dumps(self.fingerprint, sort_keys=True))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"row {i} out of range for a latent cache of {self._len} pairs")
        return {
            "latents": self._latents[i : i + 1][0],
            "cond": {name: s[i : i + 1][0] for name, s in self._cond.items()},
        }


def stack_pairs(items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, dict]:
    """Pairs ``{"latents": (2, C, h, w), "cond": {...}}`` → the stacked batch: latents ``(2B, C, h, w)``
    winners first then losers, and each conditioning tensor repeated for the losers (both images of
    a pair share the caption)."""
    latents = torch.stack([item["latents"] for item in items])  # (B, 2, …)
    x0 = torch.cat([latents[:, 0], latents[:, 1]])
    cond = {}
    for name in items[0]["cond"]:
        c = torch.stack([item["cond"][name] for item in items])
        cond[name] = torch.cat([c, c])
    return x0, cond
