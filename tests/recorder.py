"""A velocity model that records how it is called, and the tiny DiT it wraps in tests/test_dit.py and
tests/test_sample.py (the time shift the DiT stage trains with and the one a bundle samples with)."""
from __future__ import annotations

import torch
from torch import nn

from fae.models.dit import DiT, DiTConfig

TRAINED_SHIFT = 0.3   # neither 1 (no shift) nor the paper's 0.4 (a default): only the configured value gives it


class Recorder(nn.Module):
    """Wraps a velocity model and records, per call, the time, the batch size and the autocast state."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append({"t": t.detach().clone(), "batch": x.shape[0], "y": y,
                           "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")})
        return self.inner(x, t, y)


def tiny_dit() -> DiT:
    return DiT(DiTConfig(input_size=(2, 2), in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3))
