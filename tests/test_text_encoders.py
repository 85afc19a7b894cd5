"""Text encoders (fae/encoders/text.py): the shipped MiniLM against sentence-transformers, tiny local T5/SigLIP2."""
from __future__ import annotations

import pytest
import torch

from fae.encoders.text import TextEncoder, TextEncoderConfig, save_tiny_text_encoder

PROMPTS = ["a photo of a dark ankle boot", "", "CRESCENT MOON"]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_config(TextEncoderConfig(precision="fp32", max_length=16))


# sentence-transformers' own encode() of PROMPTS with the package's model (its pipeline: mean pooling + Normalize),
# recorded once: columns 0-3 and 100-101 of each embedding
REFERENCE = torch.tensor([[-0.123066, 0.076433, 0.000203, 0.030632, 0.036456, -0.041831],
                          [-0.118838, 0.048299, -0.002548, -0.011011, 0.035949, 0.018697],
                          [0.019710, 0.049644, -0.002087, -0.049540, 0.015383, 0.049162]])


def test_shipped_minilm_matches_sentence_transformers(minilm):
    out = minilm(PROMPTS)
    assert out["text_tokens"].shape == (3, 16, 384) and out["text_pooled"].shape == (3, 384)
    assert out["text_mask"].sum(1).tolist()[1] == 2                 # "" is [CLS] [SEP]
    assert torch.count_nonzero(out["text_tokens"][1, 2:]) == 0       # padding holds zeros
    pooled = out["text_pooled"][:, [0, 1, 2, 3, 100, 101]]
    assert torch.allclose(pooled, REFERENCE, atol=2e-6)              # masked mean + L2 norm, as the package's model
    assert minilm.reference()["dim"] == 384 and minilm.reference()["kind"] == "minilm"


@pytest.mark.parametrize("kind", ["t5", "siglip2"])
def test_tiny_saved_text_encoders_load(kind, tmp_path):
    folder = save_tiny_text_encoder(kind, tmp_path / kind)
    enc = TextEncoder.from_config(TextEncoderConfig(kind=kind, name_or_path=str(folder), max_length=8,
                                                    precision="fp32"))
    out = enc(["a red apple on a table", "hi"])
    assert out["text_tokens"].shape == (2, 8, 32) and enc.dim == 32
    assert out["text_mask"].sum(1).tolist() == [8, 3]                # truncated to max_length; [CLS] hi [SEP]
    if kind == "t5":  # pooled = mean over real tokens only
        mean = out["text_tokens"][1, :3].mean(0)
        assert torch.allclose(out["text_pooled"][1], mean, atol=1e-6)
    with pytest.raises(ValueError, match=f"set kind: {kind}"):
        TextEncoder.from_config(TextEncoderConfig(kind="minilm" if kind == "t5" else "t5", name_or_path=str(folder)))


def test_text_encoder_config_errors(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        TextEncoderConfig(kind="clip").validate()  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        TextEncoder.from_config(TextEncoderConfig(kind="t5", name_or_path=str(tmp_path)))
