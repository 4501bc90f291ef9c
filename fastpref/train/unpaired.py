"""Unpaired data for ``--loss kto``: single images, each labelled desirable (1) or undesirable (0).

Diffusion-KTO ("Aligning Diffusion Models by Optimizing Human Utility", Li et al., 2024,
arXiv:2404.04465) needs no pairs: a per-image like or dislike is enough. Three layouts are read:

* **a folder with a table** — ``metadata.jsonl`` (one JSON object per line) or ``metadata.csv``, with
  ``file_name`` (a path relative to the folder), ``caption`` and ``label``. This is the layout of the
  diffusion-kto training script (``metadata.csv`` with ``file_name``/``caption``; its processed
  Pick-a-Pic tables ``*_processed_v3.csv`` give the label in a ``split`` column, which is read too:
  ``exclusive_win`` desirable, ``exclusive_lose`` undesirable, ``intersections`` — images that both won
  and lost a comparison — skipped, as its default ``gt_label_w_l`` policy does).
* **two subfolders** ``desirable/`` and ``undesirable/``, each with a ``metadata.jsonl`` or
  ``metadata.csv`` of ``file_name`` and ``caption``: the folder gives the label.
* **parquet**: columns ``image`` (the encoded image's bytes, or a ``{"bytes": …}`` struct as 🤗 datasets'
  ``Image`` feature stores it), ``caption`` and ``label``; a file or a folder of files.

A ``label`` is 1/0, true/false, or one of the words ``desirable``/``undesirable``, ``exclusive_win``/
``exclusive_lose``. Bad rows are skipped and counted like the pair datasets' (``missing_caption``,
``missing_label``, ``bad_label``, ``intersection``, ``bad_metadata_line``; ``dataset.problems`` says
where), and an unreadable image comes back as :class:`~fastpref.train.data.CorruptPair`.

Every item is ``{"pixel_values": (1, 3, H, W), "caption", "index", "label"}``: a row of one image where
a pair dataset has two. The trainer runs such a batch through the same steps as a pair batch
(:func:`fastpref.train.cache.encode` stacks the images of a row, whatever their number, and
:func:`fastpref.train.noise.add_noise` gives a one-image row its own ε and t), and hands
``batch["labels"]`` to the loss.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os

import torch

from fastpref.train.data import CorruptPair, _decode, _PairIndex, _usable_caption, parquet_files

__all__ = ["LABEL_WORDS", "parse_label", "UnpairedFolder", "UnpairedParquet", "SplitPairs", "is_unpaired_folder",
           "is_unpaired_parquet"]

#: label words → 1 (desirable) / 0 (undesirable); ``None``: an image diffusion-kto's default leaves out
LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "desirable": 1, "undesirable": 0,
               "exclusive_win": 1, "exclusive_lose": 0, "intersections": None}
_LABEL_HELP = "1/0, true/false, desirable/undesirable or exclusive_win/exclusive_lose"
_TABLES = ("metadata.jsonl", "metadata.csv")


def parse_label(value) -> int | None | str:
    """``value`` → 1 or 0; ``None`` for diffusion-kto's ``intersections``; ``"missing"`` / ``"bad"``
    when there is no label or it is not one."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "missing"
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if value in (0, 1) else "bad"
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1.0", "0.0"):
            word = word[0]
        return LABEL_WORDS.get(word, "bad")
    return "bad"


def _table(folder: str) -> str | None:
    for name in _TABLES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _records(path: str):
    """``(line number, record or None, error)`` of a ``metadata.jsonl`` or ``metadata.csv``."""
    if path.endswith(".csv"):
        with open(path, newline="") as fh:
            for n, rec in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
                yield n, rec, None
        return
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"not JSON ({exc.msg})"
                continue
            yield n, (rec if isinstance(rec, dict) else None), None if isinstance(rec, dict) else "not an object"


def _first_record(path: str) -> dict:
    for _, rec, _ in _records(path):
        if rec is not None:
            return rec
    return {}


def is_unpaired_folder(path: str) -> bool:
    """A folder in one of the unpaired layouts (a pair table, with ``image_0``, is not)."""
    if not os.path.isdir(path):
        return False
    if all(os.path.isdir(os.path.join(path, d)) for d in ("desirable", "undesirable")):
        return True
    table = _table(path) or next(iter(sorted(glob.glob(os.path.join(path, "*_processed_v3.csv")))), None)
    if table is None:
        return False
    rec = _first_record(table)
    return "file_name" in rec and "image_0" not in rec


def is_unpaired_parquet(spec: str) -> bool:
    """A parquet file (or the first of a folder's) with ``image`` and ``label`` columns."""
    import pyarrow.parquet as pq

    files = parquet_files(spec)
    if not files:
        return False
    try:
        names = pq.ParquetFile(files[0]).schema_arrow.names
    except Exception:  # noqa: BLE001 - not parquet: the pair reader says so
        return False
    return "image" in names and "label" in names and "jpg_0" not in names


class _SampleIndex(_PairIndex):
    """Rows ``(source, label, caption, where)`` of single labelled images; skips counted and located."""

    unpaired = True

    def _add_sample(self, ref, label, caption, where: str) -> None:
        parsed = parse_label(label)
        if not _usable_caption(caption):
            self._skip("missing_caption", f"{where}: caption {caption!r}")
        elif parsed == "missing":
            self._skip("missing_label", f"{where}: no label")
        elif parsed == "bad":
            self._skip("bad_label", f"{where}: label {label!r} is not one of {_LABEL_HELP}")
        elif parsed is None:
            self._skip("intersection", f"{where}: label {label!r} (the image both won and lost a comparison)")
        else:
            self.rows.append((ref, parsed, caption, where))

    def labels(self) -> torch.Tensor:
        """The label of every row, ``(len(self),)``."""
        return torch.tensor([r[1] for r in self.rows], dtype=torch.long)

    def _sample(self, i: int, raw: bytes):
        from torchvision.transforms.functional import to_tensor

        _, label, caption, where = self.rows[i]
        image = _decode(raw)
        if image is None:
            return CorruptPair(int(i), f"{where}: image cannot be decoded")
        pixels, original, crop = self.transform(to_tensor(image)[None], int(i))  # the pairs' resize, flip, crop
        return {"pixel_values": pixels * 2 - 1, "caption": caption, "index": int(i), "label": label,
                "original_size": original, "crop_top_left": crop}


class UnpairedFolder(_SampleIndex):
    """A folder of labelled images (module docstring: a ``metadata.jsonl``/``metadata.csv`` table with
    ``file_name``, ``caption``, ``label``; diffusion-kto's ``*_processed_v3.csv``; or ``desirable/``
    and ``undesirable/`` subfolders with their own tables)."""

    def __init__(self, path: str, resolution: int):
        super().__init__(resolution)
        self.root = path
        if all(os.path.isdir(os.path.join(path, d)) for d in ("desirable", "undesirable")):
            for sub, label in (("desirable", 1), ("undesirable", 0)):
                table = _table(os.path.join(path, sub))
                if table is None:
                    raise ValueError(f"--dataset {path!r}: {sub}/ has no metadata.jsonl or metadata.csv "
                                     "(file_name and caption of each image)")
                self._read(table, sub, label)
        else:
            table = _table(path) or sorted(glob.glob(os.path.join(path, "*_processed_v3.csv")))[0]
            self._read(table, "", None)

    def _read(self, table: str, sub: str, folder_label) -> None:
        for n, rec, error in _records(table):
            where = f"{table} line {n}"
            if rec is None or not isinstance(rec.get("file_name"), str) or not rec["file_name"]:
                self._skip("bad_metadata_line", f"{where}: {error or 'expected file_name, caption and label'}")
                continue
            label = folder_label if folder_label is not None else rec.get("label", rec.get("split"))
            self._add_sample(os.path.join(sub, rec["file_name"]), label, rec.get("caption"), where)

    def __getitem__(self, i: int):
        path = self.rows[i][0]
        try:
            with open(os.path.join(self.root, path), "rb") as fh:
                raw = fh.read()
        except OSError:
            raw = b""
        return self._sample(i, raw)


class UnpairedParquet(_SampleIndex):
    """Parquet shards of labelled images: ``image`` (bytes or ``{"bytes": …}``), ``caption``, ``label``.
    The index reads ``caption`` and ``label``; image bytes are read per row group when asked for."""

    COLUMNS = ("image", "caption", "label")

    def __init__(self, path: str, resolution: int):
        super().__init__(resolution)
        self._index_parquet(path, "unpaired", "label", self._add_sample)

    def __getitem__(self, i: int):
        group, k = self._row_group(i, ["image"])
        raw = group["image"][k]
        if isinstance(raw, dict):  # 🤗 datasets' Image feature: {"bytes": …, "path": …}
            raw = raw.get("bytes")
        return self._sample(i, raw if isinstance(raw, (bytes, bytearray)) else b"")


class SplitPairs(torch.utils.data.Dataset):
    """A pair dataset read as unpaired labelled images: row ``2i`` is pair i's winner (desirable), row
    ``2i + 1`` its loser (undesirable). Unlike a pair batch under ``--loss kto`` (whose two images share
    their ε and t and always land in one batch), each image then gets its own draws and place in the
    shuffle, as in the diffusion-kto training script. Anything else (``resolution``, ``skipped``,
    ``prompts``, ``reward``, …) is the pair dataset's."""

    unpaired = True

    def __init__(self, pairs):
        self.pairs = pairs
        plain = (int, float, str, bool, type(None))  # the pair set's settings, for the caches' fingerprints
        for k, v in vars(pairs).items():
            if not k.startswith("_") and k != "resolution" and isinstance(v, plain):
                setattr(self, f"pairs_{k}", v)

    @property
    def resolution(self):
        return self.pairs.resolution

    @resolution.setter
    def resolution(self, value):
        self.pairs.resolution = value

    def __getattr__(self, name):  # only called for what this class does not have
        if name == "pairs":
            raise AttributeError(name)
        return getattr(self.pairs, name)

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, i: int):
        item = self.pairs[int(i) // 2]
        if isinstance(item, CorruptPair):
            return CorruptPair(int(i), item.where)
        j = int(i) % 2
        return {"pixel_values": item["pixel_values"][j: j + 1], "caption": item["caption"], "index": int(i),
                "label": 1 - j}
