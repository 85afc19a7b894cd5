"""Paper fidelity (issue 14): the paper configs train what the paper and its anchors train (docs/fidelity.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fae.stages import load_stage_config

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


# ------------------------------------------------------------------------------------- item 3: LightningDiT setting
def test_lightningdit_config_trains_with_lightningdits_setting_and_sit_keeps_its_own():
    _, ldit = load_stage_config(PAPER / "dit_lightningdit_xl1.yaml")
    assert ldit.transport.time_dist == "logit_normal"
    assert (ldit.transport.logit_normal_mean, ldit.transport.logit_normal_std) == (0.0, 1.0)
    assert ldit.transport.cosine_loss_weight == 1.0
    assert ldit.transport.time_shift == 0.4
    _, sit = load_stage_config(PAPER / "dit_sit_xl1.yaml")
    assert sit.transport.time_dist == "uniform" and sit.transport.cosine_loss_weight == 0.0


# ------------------------------------------------------------------------------------- item 9: no TF32 in FID features
class _FlagRecorder(nn.Module):
    """A feature network body that records the fp32 backend settings it runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.seen: list[tuple[str, str]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision))
        return self.proj(images.flatten(2).transpose(1, 2))


def test_fid_feature_extraction_disables_tf32_and_restores_it():
    from fae.metrics.features import extract_features
    from fae.metrics.networks import EncoderNetwork

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    body = _FlagRecorder()
    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"  # what a training script on Ampere sets
        feats = extract_features(torch.rand(3, 3, 8, 8), EncoderNetwork(body), batch_size=2)
        assert feats["pool"].shape == (3, 4)
        assert body.seen == [("ieee", "ieee")] * 2                     # both batches in strict fp32
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")  # the caller's settings are back
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
