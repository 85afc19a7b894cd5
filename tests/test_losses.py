"""Losses: reconstruction, perceptual (encoder space, LPIPS from local files), PatchGAN + hinge + LeCam, adaptive
GAN weight and its schedule."""
from __future__ import annotations

import pytest
import torch
from margins import within
from torch import nn

from fae.config import ConfigError, from_dict
from fae.losses import (
    LPIPS,
    DiscriminatorConfig,
    EncoderPerceptualLoss,
    LeCam,
    PatchDiscriminator,
    PixelLoss,
    PixelLossConfig,
    adaptive_gan_weight,
    frozen,
    hinge_d_loss,
    reconstruction_loss,
)


def test_reconstruction_kinds():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(a, b, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(a, b, "l2").item() == pytest.approx(0.25)
    assert reconstruction_loss(a.bfloat16(), b.bfloat16(), "l2").dtype == torch.float32
    with pytest.raises(ValueError, match="l1 or l2"):
        reconstruction_loss(a, b, "l3")  # type: ignore[arg-type]


def test_encoder_perceptual_zero_on_equal_and_grad_reaches_pixels():
    proj = nn.Conv2d(3, 8, 4, stride=4)

    def feats(x: torch.Tensor) -> list[torch.Tensor]:
        h = proj(x).flatten(2).transpose(1, 2)
        return [h, torch.tanh(h)]

    loss = EncoderPerceptualLoss(feats)
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    y = x.clone().requires_grad_(True)
    d = loss(y + 0.3 * torch.randn_like(x), x)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def _random_lpips_files(tmp_path, net: str) -> tuple[str, str]:
    """Random weights in the published key layouts: a torchvision backbone file and an LPIPS heads file."""
    from fae.losses import _ALEX_TAPS, _VGG16_TAPS, _alexnet_features, _vgg16_features

    features = _vgg16_features() if net == "vgg" else _alexnet_features()
    taps = _VGG16_TAPS if net == "vgg" else _ALEX_TAPS
    backbone = {f"features.{k}": v for k, v in features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry a classifier: ignored
    heads = {f"lin{k}.model.1.weight": torch.rand(1, features[i - 1].out_channels, 1, 1) for k, i in enumerate(taps)}
    torch.save(backbone, tmp_path / f"{net}_backbone.pth")
    torch.save(heads, tmp_path / f"{net}_heads.pth")
    return str(tmp_path / f"{net}_backbone.pth"), str(tmp_path / f"{net}_heads.pth")


def test_lpips_without_weights_names_the_missing_files():
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*vgg.pth"):
        LPIPS("vgg")
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        LPIPS("alex", ["no_such.pth"])
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        PixelLoss(PixelLossConfig(perceptual="lpips", gan_weight=0))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_with_local_random_weights(tmp_path, net):
    files = _random_lpips_files(tmp_path, net)
    lp = LPIPS(net, files)
    assert not any(p.requires_grad for p in lp.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(lp(x, x), torch.zeros(2), atol=1e-6)
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    d = lp(y, x)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    if net == "vgg":
        return
    # one combined file works too, and equals the two-file load
    combined = {**torch.load(files[0]), **torch.load(files[1])}
    torch.save(combined, tmp_path / "combined.pth")
    assert torch.allclose(LPIPS(net, tmp_path / "combined.pth")(y, x), d)


def test_lpips_strict_keys(tmp_path):
    backbone, heads = _random_lpips_files(tmp_path, "alex")
    with pytest.raises(ValueError, match="missing keys.*lins"):
        LPIPS("alex", [backbone])
    state = torch.load(heads)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        LPIPS("alex", [backbone, str(tmp_path / "bad.pth")])
    with pytest.raises(ValueError, match="missing keys"):  # VGG files given for AlexNet
        LPIPS("vgg", [backbone, heads])


@pytest.mark.parametrize("size,layers", [(12, 2), (16, 2), (24, 3), (28, 3), (32, 3)])
def test_patch_discriminator_shapes(size, layers):
    d = PatchDiscriminator(DiscriminatorConfig(channels=16, n_layers=layers))
    out = d(torch.rand(3, 3, size, size))
    assert out.shape[:2] == (3, 1) and out.shape[-1] >= 1
    with pytest.raises(ValueError, match="n_layers"):
        d(torch.rand(1, 3, d.min_size() - 1, d.min_size() - 1))


def test_hinge_and_lecam():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    lecam = LeCam(decay=0.5)
    real, fake = torch.full((4,), 1.0), torch.full((4,), -1.0)
    assert lecam.penalty(real, fake).item() == pytest.approx(2.0)  # EMAs start at 0: 1^2 + 1^2
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.5) and lecam.ema_fake.item() == pytest.approx(-0.5)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}  # persisted with the training state


def test_adaptive_weight_matches_gradient_ratio_and_is_finite():
    head = nn.Linear(8, 3 * 8 * 8)
    h = torch.randn(2, 8)
    pred = head(h).view(2, 3, 8, 8)
    nll = pred.pow(2).mean()
    gan = -(3 * pred).mean()
    w = adaptive_gan_weight(nll, gan, head.weight)
    g1 = torch.autograd.grad(nll, head.weight, retain_graph=True)[0].norm()
    g2 = torch.autograd.grad(gan, head.weight, retain_graph=True)[0].norm()
    assert torch.isfinite(w) and w.item() == pytest.approx((g1 / (g2 + 1e-4)).item(), rel=1e-5)
    # a GAN loss with no gradient at all: clamped, still finite
    w0 = adaptive_gan_weight(nll, 0 * pred.sum(), head.weight, max_weight=1e4)
    assert torch.isfinite(w0) and w0.item() <= 1e4


def test_gan_term_zero_before_start_then_adaptive_and_finite():
    cfg = from_dict(PixelLossConfig, {"perceptual": "none", "gan_weight": 0.5, "disc_start": 2, "gan_start": 3,
                                      "discriminator": {"channels": 8, "n_layers": 2}})
    loss_fn = PixelLoss(cfg)
    disc = loss_fn.build_discriminator()
    head = nn.Linear(8, 3 * 16 * 16)
    target = torch.rand(2, 3, 16, 16)
    feats = torch.randn(2, 8)
    assert not loss_fn.disc_active(1) and loss_fn.disc_active(2)
    for step, active in [(0, False), (2, False), (3, True), (10, True)]:
        pred = head(feats).view(2, 3, 16, 16)
        loss, logs = loss_fn.generator_loss(pred, target, step, disc, head.weight)
        assert ("gan_weight" in logs) == active
        if not active:
            assert loss.item() == pytest.approx(logs["rec"])
        else:
            assert logs["gan_weight"] > 0 and torch.isfinite(loss)
            loss.backward()
            assert all(p.grad is None for p in disc.parameters())  # D is frozen in the generator step
            assert all(p.requires_grad for p in disc.parameters())  # ... and unfrozen afterwards


@pytest.mark.margin
def test_discriminator_loss_one_forward_and_learns():
    torch.manual_seed(0)
    cfg = PixelLossConfig(perceptual="none", gan_weight=1.0, disc_start=0, gan_start=0,
                          discriminator=DiscriminatorConfig(channels=8, n_layers=2))
    loss_fn = PixelLoss(cfg)
    disc = loss_fn.build_discriminator()
    calls = []
    disc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3)
    real = torch.rand(4, 3, 12, 12) * 0.5 + 0.5
    fake = torch.rand(4, 3, 12, 12) * 0.5
    first = None
    for _ in range(20):
        loss, logs = loss_fn.discriminator_loss(disc, real, fake)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert calls == [8] * 20  # one forward on cat(real, fake) per call
    within("discriminator loss, last / first", loss.item() / first, hi=0.5)
    assert loss_fn.lecam.ema_real.item() > loss_fn.lecam.ema_fake.item()


def test_frozen_context_restores_flags():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m[1].weight.requires_grad_(False)
    with frozen(m):
        assert not any(p.requires_grad for p in m.parameters())
    assert [p.requires_grad for p in m.parameters()] == [True, True, False, True]


def test_loss_config_validation_names_keys():
    with pytest.raises(ConfigError, match="gan_start"):
        from_dict(PixelLossConfig, {"disc_start": 10, "gan_start": 5})
    with pytest.raises(ConfigError, match="losses.rec"):
        from_dict(PixelLossConfig, {"rec": "l3"}, "losses")
    with pytest.raises(ConfigError, match="perceptual_weight"):
        from_dict(PixelLossConfig, {"perceptual_weight": -1})
