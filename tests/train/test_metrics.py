"""curves.png: per-step values are drawn faint with an exponential moving average on top."""

from __future__ import annotations

import pytest
import torch

from fastpref.train.metrics import ema


def test_ema_is_a_bias_corrected_running_mean():
    assert ema([3.0] * 7, span=5) == pytest.approx([3.0] * 7)  # no pull towards 0 at the start
    assert ema([1.0, 0.0], span=3) == pytest.approx([1.0, 1 / 3])  # decay 0.5: (0.25·1 + 0.5·0) / (0.25 + 0.5)
    g = torch.Generator().manual_seed(0)
    noisy = (torch.randn(400, generator=g) + torch.linspace(0, 4, 400)).tolist()
    smooth = torch.tensor(ema(noisy, span=40))
    assert smooth.diff().std() < 0.1 * torch.tensor(noisy).diff().std()  # far less jitter
    assert abs(smooth[-1].item() - 4.0) < 0.6  # and it follows the trend (lag ≈ span/2 · slope = 0.2)
