"""FrozenEncoder: parity with transformers' own models, resize/normalisation, freezing, errors, paper sizes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file

from fae.config import ConfigError, from_dict
from fae.encoders import (
    KNOWN_ENCODERS,
    EncoderConfig,
    FrozenEncoder,
    detect_kind,
    encoder_config_from_spec,
    known_encoder_config,
    save_tiny_encoder,
)

# distinctive mean/std, so a test fails if the preprocessor config is ignored
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
VARIANTS = ["dinov2", "dinov2_reg", "siglip2", "siglip2_naflex", "mae"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    dirs = {}
    for variant in VARIANTS:
        kind = "siglip2" if variant.startswith("siglip2") else variant
        dirs[variant] = save_tiny_encoder(kind, root / variant, naflex=variant == "siglip2_naflex", mean=MEAN, std=STD,
                                          hidden_size=32, num_layers=2, num_heads=2, patch_size=4, image_size=16)
    return dirs


def _kind(variant: str) -> str:
    return "siglip2" if variant.startswith("siglip2") else variant


def _reference_tokens(variant: str, path: Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch tokens straight from transformers, loaded the way its own docs do (no fae code involved)."""
    with torch.no_grad():
        if variant == "dinov2":
            return tf.Dinov2Model.from_pretrained(path).eval()(pixel_values=pixel_values).last_hidden_state[:, 1:]
        if variant == "dinov2_reg":
            model = tf.Dinov2WithRegistersModel.from_pretrained(path).eval()
            return model(pixel_values=pixel_values).last_hidden_state[:, 1 + model.config.num_register_tokens:]
        if variant == "siglip2":  # the full image-text checkpoint's vision tower
            return tf.SiglipModel.from_pretrained(path).eval().vision_model(pixel_values=pixel_values).last_hidden_state
        if variant == "siglip2_naflex":
            from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

            patches = torch.stack([torch.from_numpy(convert_image_to_patches(im.numpy(), 4)) for im in pixel_values])
            b, n = patches.shape[:2]
            side = int(n ** 0.5)
            out = tf.Siglip2Model.from_pretrained(path).eval().vision_model(
                pixel_values=patches, pixel_attention_mask=torch.ones(b, n, dtype=torch.int32),
                spatial_shapes=torch.tensor([[side, side]] * b))
            return out.last_hidden_state
        # MAE: random shuffle with nothing masked, then undo the shuffle with the model's own ids_restore
        model = tf.ViTMAEForPreTraining.from_pretrained(path, mask_ratio=0.0).eval().vit
        out = model(pixel_values=pixel_values)
        index = out.ids_restore[..., None].expand(-1, -1, out.last_hidden_state.shape[-1])
        return torch.gather(out.last_hidden_state[:, 1:], 1, index)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers_output(tiny_dirs: dict[str, Path], variant: str) -> None:
    enc = FrozenEncoder.from_config(EncoderConfig(kind=_kind(variant), name_or_path=str(tiny_dirs[variant]),
                                                  precision="fp32"))  # parity with transformers' fp32 output
    assert enc.input_size == 16 and enc.grid == (4, 4) and enc.num_tokens == 16 and enc.dim == 32
    assert detect_kind(str(tiny_dirs[variant])) == _kind(variant)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    feats = enc(images)
    assert feats.shape == (3, 16, 32) and feats.dtype == torch.float32
    pixel_values = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(feats, _reference_tokens(variant, tiny_dirs[variant], pixel_values),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["dinov2", "siglip2", "siglip2_naflex", "mae"])
def test_resize_to_encoder_resolution(tiny_dirs: dict[str, Path], variant: str) -> None:
    # 20 px images into an encoder run at 24 px (not its native 16): bicubic resize, then a 6x6 grid
    enc = FrozenEncoder.from_config(EncoderConfig(kind=_kind(variant), name_or_path=str(tiny_dirs[variant]),
                                                  input_size=24))
    assert enc.grid == (6, 6) and enc.num_tokens == 36
    images = torch.rand(2, 3, 20, 20)
    feats = enc(images)
    assert feats.shape == (2, 36, 32)
    resized = F.interpolate(images, size=(24, 24), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(feats, enc(resized), atol=1e-6, rtol=1e-6)  # already 24 px: no second resize
    assert not torch.allclose(feats, enc(F.interpolate(images, size=(24, 24), mode="bilinear")), atol=1e-4)


def test_dinov2_grid_at_other_resolution(tmp_path: Path) -> None:
    # the case that needs it: 32 px images to a 28 px encoder with patch 7 -> a 4x4 grid
    path = save_tiny_encoder("dinov2", tmp_path / "d", patch_size=7, image_size=14)
    enc = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(path), input_size=28))
    assert enc.grid == (4, 4)
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 16, 32)


def test_native_size_comes_from_preprocessor_crop(tmp_path: Path) -> None:
    # DINOv2 hub configs say image_size=518 (position table) but the preprocessor crops 224: the crop wins
    path = save_tiny_encoder("dinov2", tmp_path / "d", patch_size=4, image_size=24)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": 12, "width": 12}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    enc = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(path)))
    assert enc.input_size == 12 and enc.grid == (3, 3)
    assert enc.reference()["input_size"] == 12


def test_defaults_without_preprocessor(tmp_path: Path) -> None:
    path = save_tiny_encoder("siglip2", tmp_path / "s")
    (path / "preprocessor_config.json").unlink()
    enc = FrozenEncoder.from_config(EncoderConfig(kind="siglip2", name_or_path=str(path)))
    assert enc.mean.flatten().tolist() == [0.5, 0.5, 0.5] and enc.std.flatten().tolist() == [0.5, 0.5, 0.5]
    assert enc.input_size == 16  # config.image_size


@pytest.mark.parametrize("variant", ["dinov2", "dinov2_reg", "siglip2", "mae"])
def test_non_affine_final_norm(tiny_dirs: dict[str, Path], variant: str) -> None:
    path = str(tiny_dirs[variant])
    affine = FrozenEncoder.from_config(EncoderConfig(kind=_kind(variant), name_or_path=path, precision="fp32"))
    plain = FrozenEncoder.from_config(EncoderConfig(kind=_kind(variant), name_or_path=path, affine_norm=False,
                                                    precision="fp32"))
    images = torch.rand(2, 3, 16, 16)
    a, b = affine(images), plain(images)
    assert not torch.allclose(a, b, atol=1e-3)
    # manual: the last hidden state before the final norm, normalised without weight/bias
    model = affine.model
    extra = {"noise": torch.arange(16.0).expand(2, 16)} if variant == "mae" else {}  # MAE: keep token order
    with torch.no_grad():
        out = model(pixel_values=affine.preprocess(images), output_hidden_states=True, **extra)
    norm = model.layernorm if hasattr(model, "layernorm") else model.post_layernorm
    torch.testing.assert_close(norm(out.hidden_states[-1]), out.last_hidden_state)  # hidden_states[-1] is pre-norm
    manual = F.layer_norm(out.hidden_states[-1], (32,), eps=norm.eps)[:, affine.num_prefix_tokens:]
    torch.testing.assert_close(b, manual, atol=1e-5, rtol=1e-5)
    assert plain.reference()["affine_norm"] is False


def test_frozen_and_no_grad(tiny_dirs: dict[str, Path]) -> None:
    enc = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_dirs["dinov2"])))
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not enc.model.training and not any(m.training for m in enc.model.modules())
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    feats = enc(images)
    assert not feats.requires_grad and feats.grad_fn is None
    # features feed a trainable model: they must not be inference-mode tensors
    head = torch.nn.Linear(32, 4)
    head(feats).sum().backward()
    assert head.weight.grad is not None and images.grad is None


def test_bf16_encoder_close_to_fp32(tiny_dirs: dict[str, Path]) -> None:
    path = str(tiny_dirs["dinov2"])
    fp32 = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=path))
    bf16 = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=path, dtype="bfloat16"))
    assert bf16.model_dtype == torch.bfloat16
    images = torch.rand(2, 3, 16, 16)
    a, b = fp32(images), bf16(images)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_reference_round_trip(tiny_dirs: dict[str, Path]) -> None:
    enc = FrozenEncoder.from_config(EncoderConfig(kind="dinov2_reg", name_or_path=str(tiny_dirs["dinov2_reg"]),
                                                  affine_norm=False))
    ref = enc.reference()
    assert set(ref) == {"kind", "name_or_path", "revision", "input_size", "affine_norm", "weights_sha256"}
    assert len(ref["weights_sha256"]) == 64
    again = FrozenEncoder.from_reference(json.loads(json.dumps(ref)))
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(enc(images), again(images))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="kind"):
        from_dict(EncoderConfig, {"kind": "clip", "name_or_path": "x"})
    with pytest.raises(ValueError, match="kind must be one of"):
        EncoderConfig(kind="clip", name_or_path="x").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="input_size"):
        from_dict(EncoderConfig, {"kind": "dinov2", "name_or_path": "x", "input_size": 0})
    with pytest.raises(ValueError, match="patch size"), torch.device("meta"):
        FrozenEncoder.skeleton("dinov2-s", input_size=225)
    with pytest.raises(KeyError, match="known"):
        known_encoder_config("dinov3-7b")


def test_loading_errors(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a transformers model folder"):
        FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="hub lookup failed"):  # HF_HUB_OFFLINE=1 in tests: fails at once
        FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path="facebook/no-such-encoder"))
    with pytest.raises(ValueError, match="set kind: dinov2_reg"):
        FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_dirs["dinov2_reg"])))
    # a checkpoint with weights missing must not load as a silently random model
    broken = save_tiny_encoder("dinov2", tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "encoder.layer.1." not in k}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"):
        FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(broken)))


def test_image_errors(tiny_dirs: dict[str, Path]) -> None:
    enc = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_dirs["dinov2"])))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="255"):
        enc(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc(torch.rand(2, 3, 16, 16) * 2 - 1)
    with pytest.raises(ValueError, match="square"):
        enc(torch.rand(2, 3, 16, 20))


def test_paper_dinov2_g_on_meta() -> None:
    with torch.device("meta"):
        enc = FrozenEncoder.skeleton("dinov2-g")
    assert enc.dim == 1536 and enc.grid == (16, 16) and enc.num_tokens == 256 and enc.input_size == 224
    assert enc.config.name_or_path == "facebook/dinov2-giant"
    params = sum(p.numel() for p in enc.parameters())
    assert abs(params / 1e6 - 1136.5) < 0.5  # DINOv2 ViT-g/14, 1.1365B (SwiGLU FFN)


def test_registry_gives_16x16_grids() -> None:
    expected = {"dinov2-s": 384, "dinov2-b": 768, "dinov2-l": 1024, "dinov2-g": 1536, "dinov2-reg-g": 1536,
                "siglip2-b": 768, "siglip2-so400m": 1152, "siglip2-g": 1536, "mae-b": 768, "mae-h": 1280}
    for name, dim in expected.items():
        with torch.device("meta"):
            enc = FrozenEncoder.skeleton(name)
        assert (enc.grid, enc.dim) == ((16, 16), dim), name
    assert set(expected) <= set(KNOWN_ENCODERS)
    with torch.device("meta"):
        reg = FrozenEncoder.skeleton("dinov2-reg-s")
    assert reg.num_prefix_tokens == 5  # CLS + 4 registers dropped


def test_reference_differences_treat_one_folder_written_two_ways_as_one_encoder(tmp_path, monkeypatch):
    from fae.encoders import reference_differences

    (tmp_path / "runs" / "enc").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    ref = {"kind": "dinov2", "name_or_path": "runs/enc", "revision": None, "input_size": 32, "affine_norm": True}
    assert reference_differences(ref, {**ref, "name_or_path": str(tmp_path / "runs" / "enc")}) == []
    assert reference_differences(ref, {**ref, "name_or_path": "runs/other"}) == ["name_or_path"]
    assert reference_differences(ref, {**ref, "input_size": 64, "kind": "mae"}) == ["kind", "input_size"]
    assert reference_differences({**ref, "name_or_path": "org/a"}, {**ref, "name_or_path": "org/a"}) == []


def test_an_encoder_spec_names_a_folder_or_a_kind_and_a_hub_id(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = str(tiny_dirs["mae"])
    assert encoder_config_from_spec(folder) == EncoderConfig(kind="mae", name_or_path=folder)   # kind from config.json
    assert encoder_config_from_spec("siglip2:google/x", precision="fp32") == EncoderConfig(
        kind="siglip2", name_or_path="google/x", precision="fp32")
    assert encoder_config_from_spec(f"dinov2:{folder}").kind == "dinov2"          # an explicit kind wins
    with pytest.raises(ConfigError, match=r"not a local model folder.*<kind>:<hub id>.*dinov2_reg"):
        encoder_config_from_spec("vit:google/x")                                 # no such kind, no such folder
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type 'bert' is not a supported encoder"):
        encoder_config_from_spec(str(tmp_path))
