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


# ------------------------------------------------------------------------------------- item 1: sigma of the Gaussian stage
def test_paper_pixel_decoder_uses_the_papers_absolute_sigma():
    _, cfg = load_stage_config(PAPER / "pixel_decoder_dinov2_g14.yaml")
    assert (cfg.noise.mode, cfg.noise.sigma) == ("absolute", 0.4)


class _SortedSet:
    """A class-sorted data set (like ImageNet's sorted folders): 5 classes of 20 items, labels in `samples`."""

    samples = [(f"img{i}", i // 20) for i in range(100)]

    def __len__(self) -> int:
        return len(self.samples)


def test_rms_subset_is_seeded_and_strided_over_classes():
    from fae.data import class_strided_indices

    data = _SortedSet()
    picked = class_strided_indices(data, 10, seed=0)
    classes = [data.samples[i][1] for i in picked]
    assert sorted(classes) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]       # every class, in proportion
    assert sorted(set(classes[:5])) == [0, 1, 2, 3, 4]              # the classes take turns
    assert len(set(picked)) == 10 and picked == class_strided_indices(data, 10, seed=0)
    assert picked != class_strided_indices(data, 10, seed=1)        # seeded
    assert len(class_strided_indices(data, 500, seed=0)) == 100     # never more than the data set


def test_sigma_relative_to_a_reference_encoders_rms(tmp_path, tiny_encoder_dir):
    """'rms' with ref_encoder: sigma x rms(this encoder's features) / rms(the reference encoder's), on the same images
    (the paper: 0.4 for DINOv2, 'scaled according to the norm of the pre-trained embeddings' for the others)."""
    from fae.encoders import EncoderConfig, FrozenEncoder, save_tiny_encoder
    from fae.stages.pixel_decoder import PixelDecoderStage

    ref_dir = save_tiny_encoder("dinov2", tmp_path / "ref", hidden_size=32, num_layers=1, num_heads=2, patch_size=4,
                                image_size=16, seed=1)
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(ref_dir)
    with torch.no_grad():
        model.layernorm.weight.mul_(3.0)  # a reference encoder with 3x larger features
    model.save_pretrained(ref_dir)
    (tmp_path / "g.yaml").write_text(f"""
stage: pixel-decoder
encoder: {{kind: dinov2, name_or_path: {tiny_encoder_dir}, precision: fp32}}
decoder: {{in_dim: 32, num_tokens: 16, patch_size: 4, width: 32, depth: 1, num_heads: 2}}
data: {{kind: fashion_mnist, image_size: 16, limit: 24}}
noise: {{sigma: 0.4, mode: rms, rms_images: 24, ref_encoder: {{kind: dinov2, name_or_path: {ref_dir}, precision: fp32}}}}
losses: {{gan_weight: 0.0, perceptual: none}}
train: {{steps: 1, batch_size: 8}}
""")
    _, cfg = load_stage_config(tmp_path / "g.yaml")
    stage = PixelDecoderStage(cfg)
    images = torch.stack([stage.train_dataset()[i]["image"] for i in range(24)])
    ref = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(ref_dir), precision="fp32"))
    rms = lambda x: x.pow(2).mean().sqrt().item()  # noqa: E731
    expected = 0.4 * rms(stage.encoder(images)) / rms(ref(images))
    assert expected < 0.2                               # the two encoders' scales really differ
    assert stage.noise.sigma == pytest.approx(expected, rel=1e-4)
    with pytest.raises(Exception, match="ref_encoder"):
        load_stage_config(tmp_path / "g.yaml", ["noise.mode=absolute"])
