"""Paper fidelity: the paper configs train what the paper and its anchors train (docs/fidelity.md)."""
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


# ------------------------------------------------------------------------------------- item 10: SigLIP2 and MAE configs
OTHER_ENCODERS = {"siglip2_g16": ("siglip2-g", 1536, 38.17e6, 170.43e6, 305.36e6),
                  "mae_l16": ("mae-l", 1024, 17.06e6, 75.86e6, 304.68e6)}


@pytest.mark.parametrize("name", sorted(OTHER_ENCODERS))
def test_other_encoder_configs_build_at_their_sizes(name, capsys):
    import json

    from fae.cli import main
    from fae.encoders import KNOWN_ENCODERS, FrozenEncoder

    known, width, enc, dec, pix = OTHER_ENCODERS[name]
    _, fae_cfg = load_stage_config(PAPER / f"fae_{name}.yaml")
    _, pix_cfg = load_stage_config(PAPER / f"pixel_decoder_{name}.yaml")
    assert fae_cfg.encoder.name_or_path == pix_cfg.encoder.name_or_path == KNOWN_ENCODERS[known].hub_id
    with torch.device("meta"):  # the real encoder's architecture gives the token grid and width the configs assume
        frozen = FrozenEncoder.skeleton(known, input_size=fae_cfg.encoder.input_size)
    assert (frozen.dim, frozen.grid) == (width, (16, 16))
    assert fae_cfg.model.feature_dim == pix_cfg.decoder.in_dim == width and tuple(fae_cfg.model.grid) == (16, 16)
    assert pix_cfg.noise.mode == "rms" and pix_cfg.noise.ref_encoder.name_or_path == "facebook/dinov2-giant"
    counts = {}
    for stage in ("fae", "pixel_decoder"):
        assert main(["summary", str(PAPER / f"{stage}_{name}.yaml"), "--json"]) == 0
        counts.update({r["component"]: r["parameters"] for r in json.loads(capsys.readouterr().out)["components"]})
    assert counts["fae encoder (single attention)"] == pytest.approx(enc, rel=5e-4)
    assert counts["feature decoder"] == pytest.approx(dec, rel=5e-4)
    assert counts["pixel decoder"] == pytest.approx(pix, rel=5e-4)


TINY = {"siglip2_g16": "siglip2", "mae_l16": "mae"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_other_encoder_stages_run_on_a_tiny_model_of_the_same_class(name, tmp_path, tiny_encoder_dir):
    """The paper config itself, shrunk by overrides only, trains both stages on a tiny saved model of the real class
    (SigLIP2 as the hub's SigLIP image-text checkpoint, MAE as ViTMAEForPreTraining)."""
    from fae.encoders import save_tiny_encoder
    from fae.stages import train_stage

    folder = save_tiny_encoder(TINY[name], tmp_path / "enc", hidden_size=32, num_layers=1, num_heads=2, patch_size=4,
                               image_size=16)
    common = [f"encoder.name_or_path={folder}", "encoder.input_size=16", "data.kind=fashion_mnist",
              "data.root=null", "data.image_size=16", "data.limit=8", "train.steps=1", "train.batch_size=4",
              "train.num_workers=0", "train.precision=fp32", "eval.limit=0"]
    _, cfg = load_stage_config(PAPER / f"fae_{name}.yaml", common + [
        "model.feature_dim=32", "model.grid=[4,4]", "model.encoder_heads=2", "model.encoder_head_dim=8",
        "model.decoder_depth=1", "model.decoder_heads=2"])
    train_stage("fae", cfg, tmp_path / "fae", progress=False)
    assert (tmp_path / "fae" / "fae" / "model.safetensors").is_file()
    _, cfg = load_stage_config(PAPER / f"pixel_decoder_{name}.yaml", common + [
        "decoder.in_dim=32", "decoder.num_tokens=16", "decoder.patch_size=4", "decoder.width=32", "decoder.depth=1",
        "decoder.num_heads=2", "decoder.refine_channels=4", "losses.perceptual=none", "losses.gan_weight=0",
        f"noise.ref_encoder.name_or_path={tiny_encoder_dir}", "noise.ref_encoder.input_size=16",
        "noise.rms_images=8"])
    train_stage("pixel-decoder", cfg, tmp_path / "pix", progress=False)
    assert (tmp_path / "pix" / "pixel_decoder" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- item 5: the feature decoder's bias
def test_feature_decoder_output_bias_is_added_and_counted():
    from tiny import tiny_fae_config

    from fae.models.autoencoder import FAEConfig, FeatureAutoEncoder

    cfg = tiny_fae_config(decoder_out_bias=True)
    with_bias = FeatureAutoEncoder(cfg)
    plain = FeatureAutoEncoder(tiny_fae_config(decoder_out_bias=False))
    plain.load_state_dict({k: v for k, v in with_bias.state_dict().items() if k != "decoder.out_bias"})
    with torch.no_grad():
        with_bias.decoder.out_bias.copy_(torch.linspace(-1, 1, 32))
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(with_bias.decode(z), plain.decode(z) + torch.linspace(-1, 1, 32))
    assert sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in plain.parameters()) == 32
    _, paper = load_stage_config(PAPER / "fae_dinov2_g14.yaml")
    assert not paper.model.decoder_out_bias  # the measured floor is noise (docs/fidelity.md): the paper's wiring
    with torch.device("meta"):
        decoder = FeatureAutoEncoder(FAEConfig(**{**paper.model.__dict__, "decoder_out_bias": True})).decoder
    assert sum(p.numel() for p in decoder.parameters()) == 170_428_416 + 1536  # with the bias still App. D's 170.43M


# ------------------------------------------------------------------------------------- item 11: the pixel decoder count
def test_paper_pixel_decoder_matches_app_d_within_five_hundredths_of_a_percent():
    from fae.models.pixel_decoder import PixelDecoder, pixel_decoder_config

    _, paper = load_stage_config(PAPER / "pixel_decoder_dinov2_g14.yaml")
    assert paper.decoder == pixel_decoder_config("paper", refine_channels=64)
    with torch.device("meta"):
        model = PixelDecoder(paper.decoder)
        plain = PixelDecoder(pixel_decoder_config("L"))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 305.36e6) / 305.36e6 < 5e-4, n                     # 305,331,395
    assert n - sum(p.numel() for p in plain.parameters()) == 256 * 1536  # the input table is the difference
    tiny = PixelDecoder(pixel_decoder_config("tiny", in_dim=8, num_tokens=16, patch_size=2, input_pos_embed=True))
    base = PixelDecoder(pixel_decoder_config("tiny", in_dim=8, num_tokens=16, patch_size=2))
    base.load_state_dict({k: v for k, v in tiny.state_dict().items() if k != "input_pos"})
    x = torch.randn(2, 16, 8)
    assert torch.equal(tiny(x), base(x))                              # zero-initialised: starts as the plain ViT
    with torch.no_grad():
        tiny.input_pos.normal_()
    torch.testing.assert_close(tiny(x), base(x + tiny.input_pos))     # a table added to the input features


# ------------------------------------------------------------------------------------- item 4: pixel-decoder losses
def test_loss_presets_titok_and_ldm_and_explicit_keys_win():
    from fae.losses import PixelLossConfig

    _, paper = load_stage_config(PAPER / "pixel_decoder_dinov2_g14.yaml")
    t = paper.losses
    assert t.preset == "titok"
    assert (t.rec, t.rec_weight, t.perceptual, t.perceptual_weight) == ("l2", 1.0, "convnext", 0.1)
    assert (t.gan_weight, t.adaptive_gan_weight, t.disc_start, t.gan_start) == (0.01, False, 20_000, 20_000)
    assert (t.lecam_weight, t.lecam_decay, t.lecam_reduction) == (0.001, 0.999, "mean")
    ldm = PixelLossConfig(preset="ldm")
    assert (ldm.rec, ldm.perceptual, ldm.perceptual_weight, ldm.gan_weight, ldm.adaptive_gan_weight,
            ldm.disc_start, ldm.lecam_weight) == ("l1", "lpips", 1.0, 0.5, True, 50_001, 0.0)
    own = PixelLossConfig(preset="titok", gan_weight=0.05, disc_start=0, gan_start=0)
    assert (own.gan_weight, own.disc_start, own.perceptual) == (0.05, 0, "convnext")
    with pytest.raises(ValueError, match="preset"):
        PixelLossConfig(preset="vqgan")  # type: ignore[arg-type]


def test_lecam_per_element_or_on_batch_means():
    from fae.losses import LeCam

    real, fake = torch.tensor([3.0, -3.0]), torch.tensor([-2.0, 2.0])  # the batch means are 0: no penalty on means
    assert LeCam(reduction="mean").penalty(real, fake).item() == 0.0
    assert LeCam(reduction="element").penalty(real, fake).item() == pytest.approx((9 + 0) / 2 + (4 + 0) / 2)


def test_convnext_perceptual_is_torchvisions_convnext_small(tmp_path):
    from safetensors.torch import save_file

    from fae.losses import ConvNeXt, ConvNeXtPerceptual

    with torch.device("meta"):
        full = ConvNeXt()
    assert sum(p.numel() for p in full.parameters()) == 50_223_688  # torchvision's convnext_small
    assert "features.7.2.block.5.weight" in full.state_dict() and "features.5.26.layer_scale" in full.state_dict()
    small = lambda: ConvNeXt(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))  # noqa: E731  (same layout, fast)
    state = {k: v.contiguous() for k, v in small().state_dict().items()}
    save_file(state, str(tmp_path / "convnext.safetensors"))
    loss = ConvNeXtPerceptual(tmp_path / "convnext.safetensors", small())
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    pred = a.clone().requires_grad_(True)
    assert loss(pred, a).item() == 0.0
    value = loss(pred, b)
    value.sum().backward()
    assert value.item() > 0 and pred.grad.abs().sum() > 0
    del state["classifier.2.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="classifier.2.weight"):
        ConvNeXtPerceptual(tmp_path / "broken.safetensors", small())
    with pytest.raises(FileNotFoundError, match="convnext_weights"):
        ConvNeXtPerceptual(None)
