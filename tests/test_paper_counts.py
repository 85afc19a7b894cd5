"""Paper configurations build at exactly the parameter counts the docs state (meta device: no memory, no download).
docs/autoencoder.md: 38,166,592 / 170,428,416; docs/pixel-decoder.md: 305,331,395 (App. D: 305.36M).
The generators, and the baselines of paper Table 2 / §5.3 on SD-VAE and VA-VAE latents (the config headers say how
each count compares with the published one): LightningDiT-XL/1 675,256,736 (App. D: 675.26M) on FAE or VA-VAE
latents; SiT-XL/2 on SD-VAE latents 675,111,184 (675,129,632 in SiT's code, whose unused learned-sigma head adds
18,448); STARFlow 1.4B 1,413,298,752 on FAE latents, 1,412,708,640 on SD-VAE latents at patch 2; MMDiT 600,607,776
(App. D: 603.46M). The 384-px showcase (docs/text-to-image.md): SigLIP2 FAE 38,559,872 / 170,969,088 on 24x24x64,
its pixel decoder 306,150,595, MMDiT 2,027,549,248 (App. D: 2017.84M). The 512-px configs (docs/scaling.md, not in the
paper): FAE 38,166,592 / 171,608,064 on 32x32x32, pixel decoder 307,297,475, LightningDiT-XL/1 676,141,472 (the 256-px model's
trained weights; its frozen sin-cos table has 1024 rows, not 256)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fae.nn import count_parameters
from fae.stages import load_stage_config, stage_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"


@pytest.mark.parametrize("config, counts", [
    ("fae_dinov2_g14.yaml", {"fae encoder (single attention)": 38_166_592, "feature decoder": 170_428_416}),
    ("pixel_decoder_dinov2_g14.yaml", {"pixel decoder": 305_331_395}),
    ("dit_lightningdit_xl1.yaml", {"diffusion transformer": 675_256_736}),
    ("dit_lightningdit_xl1_vavae.yaml", {"diffusion transformer": 675_256_736}),
    ("dit_sit_xl2_sdvae.yaml", {"diffusion transformer": 675_111_184}),
    ("flow_starflow_1p4b.yaml", {"normalizing flow (STARFlow)": 1_413_298_752}),
    ("flow_starflow_1p4b_sdvae.yaml", {"normalizing flow (STARFlow)": 1_412_708_640}),
    ("mmdit_cc12m.yaml", {"text-to-image transformer": 600_607_776}),
    ("fae_siglip2_g16_384.yaml", {"fae encoder (single attention)": 38_559_872, "feature decoder": 170_969_088}),
    ("pixel_decoder_siglip2_g16_384.yaml", {"pixel decoder": 306_150_595}),
    ("mmdit_cc12m_384.yaml", {"text-to-image transformer": 2_027_549_248}),
    ("fae_dinov2_g14_512.yaml", {"fae encoder (single attention)": 38_166_592, "feature decoder": 171_608_064}),
    ("pixel_decoder_dinov2_g14_512.yaml", {"pixel decoder": 307_297_475}),
    ("dit_lightningdit_xl1_512.yaml", {"diffusion transformer": 676_141_472}),
])
def test_paper_configs_have_the_documented_counts_exactly(config: str, counts: dict[str, int]) -> None:
    name, cfg = load_stage_config(CONFIGS / config)
    with torch.device("meta"):
        parts = stage_module(name).components(cfg)
    for component, expected in counts.items():
        assert count_parameters(parts[component]) == expected, component


@pytest.mark.parametrize("config, grid, tokens", [
    ("flow_starflow_1p4b_sdvae.yaml", (4, 32, 32), 256),   # §5.3: patch 2 on SD-VAE, "a sequence length of 256"
    ("dit_sit_xl2_sdvae.yaml", (4, 32, 32), 256),
    ("dit_lightningdit_xl1_vavae.yaml", (32, 16, 16), 256),
])
def test_baseline_configs_see_their_latents_as_256_tokens(config: str, grid: tuple[int, int, int], tokens: int) -> None:
    _, cfg = load_stage_config(CONFIGS / config)
    m = cfg.model
    assert (m.in_channels, *m.input_size) == grid
    assert (m.input_size[0] // m.patch_size) * (m.input_size[1] // m.patch_size) == tokens


def test_the_384_showcase_configs_fit_together() -> None:
    """SigLIP2 g-opt/16 at 384 px -> 24x24 tokens of 1536 -> FAE latents 24x24x64 -> the MMDiT "paper-384" input; the
    pixel decoder (Gaussian and fine-tune) reads the same encoder's 24x24 tokens and paints 384 px."""
    from fae.encoders import FrozenEncoder
    from fae.models.mmdit import mmdit_config

    _, fae = load_stage_config(CONFIGS / "fae_siglip2_g16_384.yaml")
    _, pix = load_stage_config(CONFIGS / "pixel_decoder_siglip2_g16_384.yaml")
    _, tune = load_stage_config(CONFIGS / "pixel_decoder_siglip2_g16_384_finetune.yaml",
                                ["finetune_from=x", "fae=y"])
    _, mmdit = load_stage_config(CONFIGS / "mmdit_cc12m_384.yaml")
    assert fae.encoder == pix.encoder == tune.encoder and fae.encoder.name_or_path.endswith("-384")
    with torch.device("meta"):  # the g-opt/16 architecture at 384 px (the -384 checkpoint's native size)
        frozen = FrozenEncoder.skeleton("siglip2-g", input_size=fae.encoder.input_size)
    assert (frozen.dim, frozen.grid) == (1536, (24, 24))
    assert (fae.model.feature_dim, tuple(fae.model.grid)) == (frozen.dim, frozen.grid)
    assert (pix.decoder.in_dim, pix.decoder.num_tokens) == (frozen.dim, 24 * 24)
    assert 24 * pix.decoder.patch_size == fae.data.image_size == pix.data.image_size == tune.data.image_size == 384
    assert (mmdit.model.in_channels, *mmdit.model.input_size) == (fae.model.latent_channels, *fae.model.grid)
    assert mmdit.model == mmdit_config("paper-384") and mmdit.model.in_channels == 64


def test_the_512_configs_fit_together() -> None:
    """DINOv2-g/14 at 448 px -> 32x32 tokens of 1536 -> FAE latents 32x32x32 -> LightningDiT-XL/1 on 1024 tokens (the
    256-px model but for its input grid and the training schedule); the pixel decoder (Gaussian and fine-tune)
    reads the same encoder's 32x32 tokens and paints 512 px (RAE's 512 layout)."""
    from dataclasses import replace

    from fae.encoders import FrozenEncoder
    from fae.nn import count_parameters

    _, fae = load_stage_config(CONFIGS / "fae_dinov2_g14_512.yaml")
    _, pix = load_stage_config(CONFIGS / "pixel_decoder_dinov2_g14_512.yaml")
    _, tune = load_stage_config(CONFIGS / "pixel_decoder_dinov2_g14_512_finetune.yaml", ["finetune_from=x", "fae=y"])
    _, dit = load_stage_config(CONFIGS / "dit_lightningdit_xl1_512.yaml")
    _, dit256 = load_stage_config(CONFIGS / "dit_lightningdit_xl1.yaml")
    _, fae256 = load_stage_config(CONFIGS / "fae_dinov2_g14.yaml")
    assert fae.encoder == pix.encoder == tune.encoder == replace(fae256.encoder, input_size=448)
    with torch.device("meta"):
        frozen = FrozenEncoder.skeleton("dinov2-g", input_size=fae.encoder.input_size)
    assert (frozen.dim, frozen.grid) == (1536, (32, 32))
    assert (fae.model.feature_dim, tuple(fae.model.grid)) == (frozen.dim, frozen.grid)
    assert fae.model == replace(fae256.model, grid=(32, 32))
    assert (pix.decoder.in_dim, pix.decoder.num_tokens) == (frozen.dim, 32 * 32)
    assert 32 * pix.decoder.patch_size == fae.data.image_size == pix.data.image_size == tune.data.image_size == 512
    assert (dit.model.in_channels, *dit.model.input_size) == (fae.model.latent_channels, *fae.model.grid)
    assert dit.model == replace(dit256.model, input_size=(32, 32)) and dit.model.patch_size == 1
    with torch.device("meta"):
        model, model256 = (stage_module("dit").components(c)["diffusion transformer"] for c in (dit, dit256))
    assert count_parameters(model, trainable_only=True) == count_parameters(model256, trainable_only=True)
    assert replace(dit.transport, time_shift=0.4) == dit256.transport and dit.transport.time_shift == 0.2
