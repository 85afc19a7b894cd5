"""Paper configurations build at exactly the parameter counts the docs state (meta device: no memory, no download).
docs/autoencoder.md: 38,166,592 / 170,428,416; docs/pixel-decoder.md: 305,331,395 (App. D: 305.36M)."""
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
])
def test_paper_configs_have_the_documented_counts_exactly(config: str, counts: dict[str, int]) -> None:
    name, cfg = load_stage_config(CONFIGS / config)
    with torch.device("meta"):
        parts = stage_module(name).components(cfg)
    for component, expected in counts.items():
        assert count_parameters(parts[component]) == expected, component
