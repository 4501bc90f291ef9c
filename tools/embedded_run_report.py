"""Read the sample grids of embedded runs (``fastpref-train --config examples/tiny.toml``) and print, per
run, the mean sample reward at the first and last evaluation, their paired difference with a 95 %
confidence interval, the share of samples whose disc has the prompt's colour, and the held-out
accuracy from ``logs/eval.csv``; then the same over all runs given.

    python tools/embedded_run_report.py outputs/tiny-s0 outputs/tiny-s1 outputs/tiny-s2

The grids are 8-bit PNGs (one column per prompt, one row per noise seed, each cell nearest-upscaled):
the cells are cut out, downscaled back and scored with ``SyntheticPreferences.reward``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastpref.train.data import PALETTE, SyntheticPreferences  # noqa: E402

PAD = 2  # torchvision.utils.save_image's padding


def read_grid(path: str, columns: int, resolution: int = 16) -> torch.Tensor:
    """The cells of a sample grid as images (rows·columns, 3, r, r) in [−1, 1], row by row."""
    from PIL import Image

    im = torch.from_numpy(__import__("numpy").asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
    cell = (im.shape[2] - PAD) // columns - PAD
    rows = (im.shape[1] - PAD) // (cell + PAD)
    scale = cell // resolution
    out = []
    for r in range(rows):
        for c in range(columns):
            y, x = PAD + r * (cell + PAD), PAD + c * (cell + PAD)
            out.append(im[:, y: y + cell: scale, x: x + cell: scale])
    return torch.stack(out) / 127.5 - 1


def dominant(images: torch.Tensor) -> torch.Tensor:
    """Per image, the index of the palette colour most of its pixels are near, or −1 when under 5 %."""
    pix = images.flatten(2).transpose(1, 2)
    table = torch.tensor(list(PALETTE.values()))
    near = (torch.cdist(pix, table.expand(pix.shape[0], -1, -1)) < SyntheticPreferences.NEAR).float().mean(1)
    return torch.where(near.max(1).values >= 0.05, near.argmax(1), torch.full_like(near.argmax(1), -1))


def ci(x: torch.Tensor) -> tuple[float, float, float]:
    m, se = x.mean().item(), (x.std() / math.sqrt(x.numel())).item()
    return m, m - 1.96 * se, m + 1.96 * se


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output_dir of each run")
    a = p.parse_args(argv)
    prompts = SyntheticPreferences().prompts()
    names = list(PALETTE)
    asked = torch.tensor([names.index(SyntheticPreferences.prompt_colour(q)) for q in prompts])
    diffs, print_rows = [], []
    print("| run | step | held-out accuracy | mean sample reward | prompt's colour | next colour | no disc |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in a.runs:
        grids = sorted(glob.glob(os.path.join(run, "samples", "step-*.png")))
        acc = {}
        with open(os.path.join(run, "logs", "eval.csv")) as fh:
            for row in csv.DictReader(fh):
                acc[int(row["step"])] = float(row["heldout_accuracy"])
        rewards = []
        for path in (grids[0], grids[-1]):
            step = int(os.path.basename(path)[5:11])
            images = read_grid(path, len(prompts))
            cols = asked.repeat(images.shape[0] // len(prompts))
            r = SyntheticPreferences.reward(images, prompts * (images.shape[0] // len(prompts)))
            d = dominant(images)
            rewards.append(r)
            m, lo, hi = ci(r)
            print(f"| {run} | {step} | {acc.get(step, float('nan')):.3f} | {m:.3f} [{lo:.3f}, {hi:.3f}] | "
                  f"{(d == cols).float().mean():.2f} | {(d == (cols + 1) % len(names)).float().mean():.2f} | "
                  f"{(d < 0).float().mean():.2f} |")
        diffs.append(rewards[1] - rewards[0])
        m, lo, hi = ci(diffs[-1])
        print_rows.append(f"{run}: reward(last) − reward(first), paired over {diffs[-1].numel()} cells: "
                          f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if len(diffs) > 1:
        m, lo, hi = ci(torch.cat(diffs))
        print_rows.append(f"all runs: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired, {torch.cat(diffs).numel()} cells)")
    print("\n".join(print_rows))


if __name__ == "__main__":
    main()
