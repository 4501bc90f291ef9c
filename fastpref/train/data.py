"""Preference-pair datasets: Pick-a-Pic v2 parquet, a ``metadata.jsonl`` folder, and an embedded
synthetic set generated on the fly.

Every dataset yields ``{"pixel_values": (2, 3, H, W) in [−1, 1], winner first; "caption": str;
"index": int; "original_size": (h, w); "crop_top_left": (y, x)}`` — the last two for SDXL's
micro-conditioning, from the pair's transform (:class:`fastpref.train.transforms.PairTransform`: resize,
``--random_flip``, ``--center_crop`` / ``--random_crop``, the same for both images).

Rows that cannot be used are skipped and counted once in ``dataset.skipped`` (a dict
``reason → count`` the trainer logs), and where they are is kept in ``dataset.problems`` (``reason →
["file line N: what is wrong", …]``, the first few per reason): ties (``label_0 = 0.5``), missing
captions and labels that are not numbers in [0, 1] when the index is built; corrupt images when they
are decoded — the item then comes back as :class:`CorruptPair`, which :func:`collate_pairs` drops and
hands to the trainer (``batch["corrupt"]``, index → where) so that each bad row is counted once
however many epochs read it. A dataset with no usable pair is refused with a message that says what
was found and where.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from fastpref.train.transforms import PairTransform

__all__ = [
    "SyntheticPreferences",
    "CorruptPair",
    "PickAPicParquet",
    "FolderPairs",
    "build_dataset",
    "describe_skips",
    "collate_pairs",
    "EpochSampler",
]


# ----------------------------------------------------------------------------------------------
# Embedded synthetic set: a coloured disc on a grey background. For the prompt "a red disc" the
# preferred image has a red disc, the rejected one a disc in red's neighbour on the palette ring
# (green). A model warmed up on both images of every pair therefore draws two colours for each prompt
# (its own and its neighbour) and the preference has to select the prompt's one — a change anyone can
# see in a sample grid and measure with the reward below.
# ----------------------------------------------------------------------------------------------

PALETTE = {  # in ring order: each colour's rejected partner is the next one
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.8, -0.8),
    "blue": (-0.8, -0.8, 0.9),
    "yellow": (0.9, 0.9, -0.8),
    "magenta": (0.9, -0.8, 0.9),
    "cyan": (-0.8, 0.9, 0.9),
}


class SyntheticPreferences(Dataset):
    """``size`` pairs, item i generated from seed ``(seed, i)``: prompt "a {colour} disc"; both images
    hold a disc near the centre (random offset and radius) on a flat grey background, the winner's in
    the prompt's colour (± jitter), the loser's in the next palette colour (red → green → blue → yellow
    → magenta → cyan → red). :meth:`reward` scores any image for a prompt — the winner always scores
    higher, so the preference follows the reward."""

    def __init__(self, size: int = 512, resolution: int = 16, seed: int = 0, random_flip: bool = False):
        self.size, self.resolution, self.seed, self.random_flip = size, resolution, seed, random_flip
        self.skipped: Counter = Counter()
        self.colors = list(PALETTE)

    def __len__(self) -> int:
        return self.size

    def prompts(self) -> list[str]:
        return [f"a {c} disc" for c in self.colors]

    def _image(self, g: torch.Generator, rgb) -> torch.Tensor:
        r = self.resolution
        yy, xx = torch.meshgrid(torch.arange(r, dtype=torch.float32), torch.arange(r, dtype=torch.float32), indexing="ij")
        cy, cx = (0.4 + 0.2 * torch.rand(2, generator=g)) * r
        radius = (0.28 + 0.08 * torch.rand(1, generator=g)) * r
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).float()
        # a flat grey background with a little pixel noise: simple enough for a tiny model to learn in a
        # minute, so that what the warm-up has left to decide is the colour
        background = (0.3 * torch.rand(1, generator=g) - 0.15) + 0.02 * torch.randn(3, r, r, generator=g)
        color = torch.tensor(rgb) + 0.05 * torch.randn(3, generator=g)
        return (mask * color[:, None, None] + (1 - mask) * background).clamp(-1, 1)

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        c = int(torch.randint(len(self.colors), (1,), generator=g))
        other = (c + 1) % len(self.colors)
        win = self._image(g, PALETTE[self.colors[c]])
        lose = self._image(g, PALETTE[self.colors[other]])
        # generated at the resolution: nothing to resize or crop; --random_flip flips the pair
        pair, original, crop = PairTransform(self.resolution, random_flip=self.random_flip, seed=self.seed)(
            torch.stack([win, lose]), int(i))
        return {"pixel_values": pair, "caption": f"a {self.colors[c]} disc", "index": int(i),
                "original_size": original, "crop_top_left": crop}

    @staticmethod
    def prompt_colour(prompt: str) -> str | None:
        """The palette colour ``prompt`` asks for: the one palette name among its words (case-insensitive),
        or ``None`` when it names none or several — such a prompt cannot be scored."""
        named = [c for c in PALETTE if c in prompt.lower().split()]
        return named[0] if len(named) == 1 else None

    @classmethod
    def unscorable(cls, prompts: list[str]) -> list[str]:
        """The prompts :meth:`reward` cannot score (checked before training, so none reaches it)."""
        return [p for p in prompts if cls.prompt_colour(p) is None]

    # the smallest disc the set draws covers π·0.28² of the image: a sample needs at least that many
    # palette-coloured pixels to score 1
    DISC_AREA = math.pi * 0.28**2
    NEAR = 0.6  # a pixel is "of" a palette colour within this RGB distance (palette colours are ≥ 1.7 apart)

    @classmethod
    def reward(cls, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per image, in [0, 1]: the share of its palette-coloured pixels that have the prompt's colour,
        counting at least a smallest disc's worth of pixels — ``own / max(own + other, DISC_AREA·H·W)``
        with ``own`` / ``other`` the pixels within :attr:`NEAR` of the prompt's / another palette colour.
        1 = a disc (or more) all in the prompt's colour; 0 = a disc in other colours, or no disc at all —
        a blank or faded sample is never scored above a wrong-coloured disc; a half-size disc of the
        right colour scores about ½."""
        bad = cls.unscorable(prompts)
        if bad:
            raise ValueError(f"the synthetic reward cannot score {bad!r}: a prompt must name exactly one of the "
                             f"colours {', '.join(PALETTE)} as a word, e.g. 'a red disc'")
        own, other = cls.colour_pixels(images, prompts)
        floor = cls.DISC_AREA * images.shape[-1] * images.shape[-2]
        return own / torch.clamp(own + other, min=floor)

    @classmethod
    def colour_pixels(cls, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image (N, 3, H, W) in [−1, 1]: the number of pixels within :attr:`NEAR` of the prompt's
        palette colour, and of any other palette colour."""
        images = images.float().clamp(-1, 1)
        pix = images.flatten(2).transpose(1, 2)  # (N, HW, 3)
        table = torch.tensor(list(PALETTE.values()))  # (K, 3)
        near = (torch.cdist(pix, table.expand(pix.shape[0], -1, -1)) < cls.NEAR).float().sum(1)  # (N, K)
        names = list(PALETTE)
        idx = torch.tensor([names.index(cls.prompt_colour(p)) for p in prompts])
        own = near.gather(1, idx[:, None]).squeeze(1)
        return own, near.sum(1) - own


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------


def _decode(data: bytes):
    """The RGB image in ``data`` (a loaded PIL image), or ``None`` when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")  # a decoded copy: usable after the file is closed
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


MAX_PROBLEMS = 5  # locations kept per skip reason (the counts are complete)


@dataclass(frozen=True)
class CorruptPair:
    """What a dataset returns for a pair whose image cannot be read: its index and where it is."""

    index: int
    where: str


def _usable_caption(caption) -> bool:
    return isinstance(caption, str) and caption.strip() != ""


def _label(value) -> float | None:
    """``label_0`` as a float in [0, 1], or ``None`` when it is not one (a string, a bool, 2, …)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0.0 <= value <= 1.0 else None


def parquet_files(spec: str) -> list[str]:
    """The ``.parquet`` files of ``spec``: the file itself, or every one below a folder (sorted)."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True))
    return [spec] if os.path.isfile(spec) and spec.endswith(".parquet") else []


class _PairIndex(Dataset):
    """Shared bookkeeping: rows ``(source, winner_is_0, caption, where)``, skip counts and locations."""

    def __init__(self, resolution: int):
        self.resolution = resolution  # the trainer sets it to the model's once the model is loaded
        self.random_flip, self.random_crop, self.seed = False, False, 0  # build_dataset sets them
        self._transform = (None, None)
        self.skipped: Counter = Counter()
        self.problems: dict[str, list[str]] = {}
        self.rows: list = []

    @property
    def transform(self) -> PairTransform:
        key = (self.resolution, self.random_crop, self.random_flip, self.seed)
        if self._transform[0] != key:
            self._transform = (key, PairTransform(*key))
        return self._transform[1]

    def _skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        kept = self.problems.setdefault(reason, [])
        if len(kept) < MAX_PROBLEMS:
            kept.append(where)

    def _index_parquet(self, path: str, kind: str, label_column: str, add) -> None:
        """Index parquet shards (``path``: a file, or a folder searched recursively) by their label and
        caption columns only: ``add((file, row group, k), label, caption, "FILE row N")`` per row; image
        bytes are read per row group when an item is asked for (:meth:`_row_group`)."""
        import pyarrow.parquet as pq

        self.files = parquet_files(path)
        if not self.files:
            raise ValueError(f"--dataset {path!r}: no .parquet files found there")
        for fi, f in enumerate(self.files):
            try:
                pf = pq.ParquetFile(f)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise ValueError(f"--dataset: {f} is not a readable parquet file: {exc}") from None
            missing = [c for c in self.COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"--dataset {f!r} lacks the {kind} columns {missing} "
                                 f"(has {pf.schema_arrow.names}); expected {list(self.COLUMNS)}")
            row = 0
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=[label_column, "caption"]).to_pydict()
                for k, (label, caption) in enumerate(zip(t[label_column], t["caption"])):
                    add((fi, rg, k), label, caption, f"{f} row {row}")
                    row += 1
        self._cache_key, self._cache = None, None

    def _row_group(self, i: int, columns: list[str]) -> tuple[dict, int]:
        """``(columns of row i's row group, i's position in it)``: one row group in memory at a time (per
        DataLoader worker)."""
        import pyarrow.parquet as pq

        (fi, rg, k), _, _, _ = self.rows[i]
        if self._cache_key != (fi, rg, tuple(columns)):
            self._cache = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=columns).to_pydict()
            self._cache_key = (fi, rg, tuple(columns))
        return self._cache, k

    def _add(self, ref, label_0, caption, where: str) -> None:
        """Index one row; ``where`` names it for messages ("metadata.jsonl line 7", "x.parquet row 12")."""
        if not _usable_caption(caption):
            self._skip("missing_caption", f"{where}: caption {caption!r}")
        elif label_0 is None or (isinstance(label_0, float) and math.isnan(label_0)):
            self._skip("missing_label", f"{where}: no label_0")
        elif _label(label_0) is None:
            self._skip("bad_label", f"{where}: label_0 {label_0!r} is not a number in [0, 1] (1, 0 or 0.5 for a tie)")
        elif float(label_0) == 0.5:
            self._skip("tie", f"{where}: label_0 0.5")
        else:
            self.rows.append((ref, float(label_0) > 0.5, caption, where))

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, i, raw0: bytes, raw1: bytes):
        from torchvision.transforms.functional import to_tensor

        _, winner_is_0, caption, where = self.rows[i]
        a, b = _decode(raw0), _decode(raw1)
        if a is None or b is None:
            which = " and ".join(n for n, x in (("image_0", a), ("image_1", b)) if x is None)
            return CorruptPair(int(i), f"{where}: {which} cannot be decoded")
        if b.size != a.size:  # as diffusers' SDXL DPO script: image_1 to image_0's size, then one transform
            b = b.resize(a.size)
        win, lose = (a, b) if winner_is_0 else (b, a)
        pair, original, crop = self.transform(torch.stack([to_tensor(win), to_tensor(lose)]), int(i))
        return {"pixel_values": pair * 2 - 1, "caption": caption, "index": int(i), "original_size": original,
                "crop_top_left": crop}


class PickAPicParquet(_PairIndex):
    """Pick-a-Pic v2 parquet shards (columns ``jpg_0``, ``jpg_1``, ``label_0``, ``caption``).

    ``label_0 = 1`` → image 0 preferred, ``0`` → image 1, ``0.5`` → tie (dropped, counted). The index
    reads only ``label_0`` and ``caption``; image bytes are read per row group when an item is asked for.
    Rows are named by file and row number (0-based, counted over the file's row groups).
    """

    COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")

    def __init__(self, path: str, resolution: int):
        super().__init__(resolution)
        self._index_parquet(path, "Pick-a-Pic", "label_0", self._add)

    def __getitem__(self, i: int):
        group, k = self._row_group(i, ["jpg_0", "jpg_1"])
        return self._item(i, group["jpg_0"][k], group["jpg_1"][k])


class FolderPairs(_PairIndex):
    """A folder with ``metadata.jsonl``: one JSON object per line with ``image_0``, ``image_1`` (paths
    relative to the folder), ``label_0`` (1, 0 or 0.5, as Pick-a-Pic) and ``caption``."""

    def __init__(self, path: str, resolution: int):
        super().__init__(resolution)
        self.root = path
        meta = os.path.join(path, "metadata.jsonl")
        with open(meta) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{meta} line {n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    self._skip("bad_metadata_line", f"{where}: not JSON ({exc.msg})")
                    continue
                if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("image_0", "image_1")):
                    self._skip("bad_metadata_line", f"{where}: expected an object with image_0 and image_1 paths")
                    continue
                self._add((rec["image_0"], rec["image_1"]), rec.get("label_0"), rec.get("caption"), where)

    def __getitem__(self, i: int):
        (p0, p1), _, _, _ = self.rows[i]

        def read(p):
            try:
                with open(os.path.join(self.root, p), "rb") as fh:
                    return fh.read()
            except OSError:
                return b""

        return self._item(i, read(p0), read(p1))


def describe_skips(dataset, limit: int = 2) -> str:
    """``"2 tie, 1 bad_label (…/metadata.jsonl line 3: label_0 'yes' is not …)"`` or ``"none"``."""
    problems = getattr(dataset, "problems", {})
    parts = []
    for reason, count in dataset.skipped.items():
        where = problems.get(reason, [])[:limit]
        more = ", …" if count > len(where) and where else ""
        parts.append(f"{count} {reason}" + (f" ({'; '.join(where)}{more})" if where else ""))
    return ", ".join(parts) or "none"


def build_dataset(spec: str, *, resolution: int, synthetic_size: int = 512, seed: int = 0, random_flip: bool = False,
                  random_crop: bool = False) -> Dataset:
    """``"synthetic"``, a parquet file or a folder of parquet files, or a folder with ``metadata.jsonl``;
    or unpaired labelled images for ``--loss kto`` (:mod:`fastpref.train.unpaired`).
    ``random_flip`` / ``random_crop`` (else centred): the pairs' transform, its draws seeded per
    ``(seed, pair)`` (:mod:`fastpref.train.transforms`); the synthetic set is generated at the resolution
    and only flips."""
    from fastpref.train import unpaired

    if spec == "synthetic":
        ds = SyntheticPreferences(synthetic_size, resolution, seed, random_flip)
    elif unpaired.is_unpaired_folder(spec):
        ds = unpaired.UnpairedFolder(spec, resolution)
    elif unpaired.is_unpaired_parquet(spec):
        ds = unpaired.UnpairedParquet(spec, resolution)
    elif os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "metadata.jsonl")):
        ds = FolderPairs(spec, resolution)
    elif (os.path.isfile(spec) and spec.endswith(".parquet")) or os.path.isdir(spec):
        ds = PickAPicParquet(spec, resolution)
    else:
        raise ValueError(f"--dataset {spec!r}: expected 'synthetic', a Pick-a-Pic .parquet file, a folder of them, "
                         "or a folder with metadata.jsonl (image_0, image_1, label_0, caption per line); for --loss kto "
                         "also unpaired labelled images (a folder with metadata.jsonl/metadata.csv of file_name, "
                         "caption, label; desirable/ and undesirable/ subfolders; or parquet with image, caption, "
                         "label)")
    if len(ds) == 0 and getattr(ds, "unpaired", False):
        raise ValueError(f"--dataset {spec!r} has no usable labelled image ({describe_skips(ds)}); rows without a "
                         "caption, without a label or with a label that is not 1/0, true/false, desirable/undesirable "
                         "or exclusive_win/exclusive_lose are dropped")
    if isinstance(ds, _PairIndex):
        ds.random_flip, ds.random_crop, ds.seed = random_flip, random_crop, seed
    if len(ds) == 0:
        raise ValueError(f"--dataset {spec!r} has no usable preference pair ({describe_skips(ds)}); ties "
                         "(label_0 = 0.5), rows without a caption and labels that are not numbers in [0, 1] "
                         "are dropped — point --dataset at data with decided pairs")
    return ds


def collate_pairs(items: list) -> dict:
    """Stack items; :class:`CorruptPair` items are dropped and handed on in ``batch["corrupt"]``
    (``{index: where}``), so that the trainer counts each unreadable row once across epochs. Unpaired
    items (one image and a ``label`` each) also give ``batch["labels"]``."""
    good = [it for it in items if not isinstance(it, CorruptPair)]
    corrupt = {it.index: it.where for it in items if isinstance(it, CorruptPair)}
    if not good:
        return {"pixel_values": None, "caption": [], "index": torch.empty(0, dtype=torch.long), "corrupt": corrupt}
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in good]),
        "caption": [it["caption"] for it in good],
        "index": torch.tensor([it["index"] for it in good]),
        "corrupt": corrupt,
    }
    for key in ("original_size", "crop_top_left"):  # (B, 2): SDXL's time ids; absent if a dataset lacks them
        if all(key in it for it in good):
            batch[key] = torch.tensor([list(it[key]) for it in good], dtype=torch.long)
    if "label" in good[0]:
        batch["labels"] = torch.tensor([it["label"] for it in good], dtype=torch.long)
    return batch


class EpochSampler(Sampler):
    """A seeded shuffle of ``indices``, a new permutation per epoch (``set_epoch``): the order of any
    epoch can be rebuilt from (seed, epoch) alone, which makes the data position resumable."""

    def __init__(self, indices: list[int], seed: int):
        self.indices, self.seed, self.epoch = list(indices), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter([self.indices[j] for j in torch.randperm(len(self.indices), generator=g).tolist()])

    def __len__(self) -> int:
        return len(self.indices)
