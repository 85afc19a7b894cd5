"""Text encoders (fae/encoders/text.py): the shipped MiniLM against sentence-transformers, tiny local T5/SigLIP2;
SigLIP2 preprocessed as trained (lower-cased, 64 tokens padded at the end) against a plain transformers call."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fae.encoders.text import TextEncoder, TextEncoderConfig, save_tiny_text_encoder, tiny_gemma_tokenizer

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


def test_kinds_default_to_their_training_length_and_case():
    assert (TextEncoderConfig().max_length, TextEncoderConfig(kind="t5").max_length) == (32, 32)  # caches unchanged
    assert not TextEncoderConfig().lowercase and not TextEncoderConfig(kind="t5").lowercase
    siglip = TextEncoderConfig(kind="siglip2")
    assert (siglip.max_length, siglip.lowercase, siglip.pad_right) == (64, True, True)
    assert TextEncoderConfig(kind="siglip2", max_length=16).max_length == 16                   # a given length wins


# The plain transformers call of the tiny SigLIP2 below, with SigLIP2's preprocessing spelled out (lower-cased, 64
# tokens padded at the end, input ids only), recorded once: pooler_output columns 0-3 of PROMPTS
SIGLIP2_REFERENCE = torch.tensor([[0.073535, 0.519728, -0.250510, 0.179153],
                                  [0.079595, 0.516121, -0.283130, 0.216119],
                                  [0.078088, 0.525489, -0.264135, 0.200949]])


@pytest.fixture(scope="module")
def siglip2_folder(tmp_path_factory):
    return save_tiny_text_encoder("siglip2", tmp_path_factory.mktemp("siglip2") / "model")


def _plain_transformers(folder, prompts, **tokenizer_kwargs) -> torch.Tensor:
    from transformers import AutoTokenizer, SiglipTextModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt", **tokenizer_kwargs)
    with torch.no_grad():
        return SiglipTextModel.from_pretrained(folder).eval()(input_ids=ids["input_ids"]).pooler_output


def test_siglip2_matches_transformers_with_its_training_preprocessing(siglip2_folder):
    tokenizer = tiny_gemma_tokenizer()   # what the hub's fixed-resolution checkpoints load: it neither lower-cases
    assert tokenizer("A")["input_ids"] != tokenizer("a")["input_ids"] and tokenizer.padding_side == "left"  # nor pads right
    enc = TextEncoder.from_config(TextEncoderConfig(kind="siglip2", name_or_path=str(siglip2_folder), precision="fp32"))
    out = enc(PROMPTS)
    expected = _plain_transformers(siglip2_folder, [p.lower() for p in PROMPTS], max_length=64, padding_side="right")
    assert torch.allclose(out["text_pooled"], expected, atol=1e-6)
    assert torch.allclose(out["text_pooled"][:, :4], SIGLIP2_REFERENCE, atol=1e-5)
    # 64 tokens, real ones first: the characters and the EOS ("" is the EOS alone), then padding
    assert out["text_tokens"].shape == (3, 64, 32)
    lengths = [len(p) + 1 for p in PROMPTS]
    assert out["text_mask"].sum(1).tolist() == lengths
    assert all(out["text_mask"][i, :n].all() for i, n in enumerate(lengths))
    assert torch.equal(enc(["CRESCENT MOON"])["text_pooled"], enc(["crescent moon"])["text_pooled"])
    reference = enc.reference()
    assert (reference["max_length"], reference["lowercase"], reference["pad_right"]) == (64, True, True)
    again = TextEncoder.from_config(replace(TextEncoderConfig.from_reference(reference), precision="fp32"))
    assert torch.equal(again(PROMPTS)["text_pooled"], out["text_pooled"])


def test_siglip2_records_from_before_the_fix_encode_as_they_were_saved(siglip2_folder):
    """A cache or bundle written at 32 tokens without lowercasing records no `lowercase`/`pad_right`: it keeps
    encoding prompts as its training embeddings were made (the tokenizer's own padding side, case kept)."""
    old = {"kind": "siglip2", "name_or_path": str(siglip2_folder), "revision": None, "max_length": 32, "dim": 32}
    enc = TextEncoder.from_config(replace(TextEncoderConfig.from_reference(old), precision="fp32"))
    assert (enc.config.max_length, enc.config.lowercase, enc.config.pad_right) == (32, False, False)
    out = enc(PROMPTS)["text_pooled"]
    assert torch.allclose(out, _plain_transformers(siglip2_folder, PROMPTS, max_length=32), atol=1e-6)
    fixed = _plain_transformers(siglip2_folder, [p.lower() for p in PROMPTS], max_length=64, padding_side="right")
    assert (out - fixed).abs().amax(1).min() > 0.1      # every prompt: the fix changes what a new cache holds
