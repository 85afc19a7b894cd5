"""The baseline tokenizers (fae.tokenizers.baselines) on tiny, seeded instances of the real diffusers classes, saved
to a folder and loaded the way a user names them: `<kind>:<folder>` (the path a hub id takes: from_pretrained)
and the bare folder. Offline: no test downloads anything."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fae.config import ConfigError
from fae.io import state_dict_sha256
from fae.tokenizers.base import load_tokenizer
from fae.tokenizers.baselines import MARKER, ldm_vae_config, load_ldm_vae

diffusers = pytest.importorskip("diffusers")

SIZE = 16
TINY_LDM = {"ch": 32, "ch_mult": (1, 1), "num_res_blocks": 1, "attn_resolutions": (8,), "z_channels": 4, "resolution": 16}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight distinct (norms are ones and zeros at init), so a swapped or dropped key changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AutoencoderKL with a non-trivial scaling and shift, as `fae train kl-vae` would export it."""
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                    block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                    scaling_factor=0.5, shift_factor=0.25, sample_size=SIZE)
    folder = tmp_path_factory.mktemp("kl") / "vae"
    _randomise(model, 0)
    with torch.no_grad():   # red above 1, green below 0 after (x + 1) / 2: decode must clamp
        model.decoder.conv_out.bias.copy_(torch.tensor([2.0, -2.0, 0.0]))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AutoencoderRAE: its DINOv2-with-registers encoder is built from a transformers config (no download)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderRAE(encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=14,
                                     encoder_num_hidden_layers=1, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                     decoder_num_attention_heads=2, decoder_intermediate_size=64, patch_size=8,
                                     encoder_input_size=28, latents_mean=torch.full((64, 1, 1), 0.1),
                                     latents_std=torch.full((64, 1, 1), 2.0))
    folder = tmp_path_factory.mktemp("rae") / "rae"
    model.eval().save_pretrained(folder)
    return folder


def test_sd_vae_matches_diffusers_through_both_spellings(kl_folder: Path) -> None:
    """`sd-vae:<folder>` and the bare folder give one sd-vae; its latents are diffusers' posterior mean (and std)
    in the scaled space (z - shift) * scale; decode inverts that and maps [-1,1] to [0,1]."""
    model = diffusers.AutoencoderKL.from_pretrained(kl_folder).eval()
    x = _images()
    by_spec, by_folder = load_tokenizer(f"sd-vae:{kl_folder}"), load_tokenizer(kl_folder)
    assert by_spec.kind == by_folder.kind == "sd-vae"
    mean, std = by_spec.encode_distribution(x)
    with torch.no_grad():
        posterior = model.encode(x * 2 - 1).latent_dist
        expected = (posterior.mean - 0.25) * 0.5
        raw = (model.decode(expected / 0.5 + 0.25).sample + 1) / 2
    assert raw.min() < 0 and raw.max() > 1     # the fixture's output bias: clamping matters
    assert mean.shape == (2, *by_spec.latent_shape(SIZE)) == (2, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_folder.encode(x), expected, rtol=0, atol=1e-6)
    assert std is not None
    torch.testing.assert_close(std, posterior.std * 0.5, rtol=0, atol=1e-6)
    images = by_spec.decode(mean)
    assert images.shape == x.shape and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    torch.testing.assert_close(images, raw.clamp(0, 1), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of its factor 2"):
        by_spec.latent_shape(SIZE + 1)


def test_identity_reference_and_save_round_trip(kl_folder: Path, tmp_path: Path) -> None:
    """The identity is the weights' hash: stable across loads and save_pretrained, different for one changed
    weight; the reference loads the same tokenizer back; a saved folder loads as the same kind."""
    tok = load_tokenizer(f"sd-vae:{kl_folder}")
    assert tok.identity == state_dict_sha256(diffusers.AutoencoderKL.from_pretrained(kl_folder))
    assert tok.reference() == {"kind": "sd-vae", "path": str(kl_folder)}
    assert load_tokenizer(json.loads(json.dumps(tok.reference()))).identity == tok.identity
    saved = tok.save_pretrained(tmp_path / "saved")
    assert json.loads((saved / MARKER).read_text())["kind"] == "sd-vae"
    again = load_tokenizer(saved)
    assert (again.kind, again.identity) == ("sd-vae", tok.identity)
    with torch.no_grad():
        again.model.decoder.conv_out.bias[0] += 1e-3  # type: ignore[attr-defined]  # the diffusers model inside
    assert type(again)(again.model, str(saved)).identity != tok.identity   # a fresh one: identity is cached
    assert tok.to("cpu") is tok and tok.device == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------ VA-VAE
def _to_ldm_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL name -> LDM name: the inverse map, written here independently of the loader's."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.", ".mid.attn_1.")
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
    key = key.replace(".resnets.", ".block.").replace(".attentions.", ".attn.").replace("conv_shortcut", "nin_shortcut")
    key = key.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f".{new}.", f".{old}.")
    return key


def _ldm_checkpoint(model: torch.nn.Module, levels: int) -> dict[str, torch.Tensor]:
    """The state dict as an LDM training checkpoint stores it: 1x1-conv attention, plus training-only keys."""
    state = {}
    for key, t in model.state_dict().items():
        ldm = _to_ldm_key(key, levels)
        state[ldm] = t[:, :, None, None].clone() if re.search(r"\.(attn|attn_1)\.\d*\.?(q|k|v|proj_out)\.weight", ldm) \
            else t.clone()
    assert len(state) == len(model.state_dict())
    state.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4),
                  "foundation_model.model.cls_token": torch.ones(1, 1, 8), "linear_proj.weight": torch.ones(8, 4, 1, 1)})
    return state


@pytest.fixture(scope="module")
def vavae_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Path]:
    """A tiny AutoencoderKL in VA-VAE's block layout (attention at the lowest level, as attn_resolutions=(16,)
    puts it at 256 px) and its LDM checkpoint file, wrapped as {"state_dict": ...} like the released .pt."""
    config = ldm_vae_config(**TINY_LDM)
    assert config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    model = _randomise(diffusers.AutoencoderKL(**config), 3)
    ldm = _ldm_checkpoint(model, levels=2)
    file = tmp_path_factory.mktemp("vavae") / "vavae-tiny.ckpt"
    torch.save({"state_dict": ldm}, file)
    return model, ldm, file


def _vavae(path: Path) -> dict:
    return {"kind": "va-vae", "path": str(path), "ldm_config": TINY_LDM}


def test_va_vae_loads_an_ldm_checkpoint_exactly(vavae_case) -> None:
    """Our key map rebuilds the original weights bit for bit (training keys dropped), so the tokenizer's latents
    equal the original model's, at scaling 1.0; the reference (with its ldm_config) loads it again."""
    model, _, file = vavae_case
    tok = load_tokenizer(_vavae(file))
    assert tok.kind == "va-vae" and tok.reference() == _vavae(file)
    assert load_tokenizer(json.loads(json.dumps(tok.reference()))).identity == state_dict_sha256(model)
    loaded = tok.model.state_dict()  # type: ignore[attr-defined]  # the diffusers model inside
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert tok.identity == state_dict_sha256(model)
    x = _images()
    with torch.no_grad():
        expected = model.encode(x * 2 - 1).latent_dist.mean
    assert tok.latent_shape(SIZE) == (4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(tok.encode(x), expected, rtol=0, atol=0)
    assert load_tokenizer(_vavae(file.parent)).identity == tok.identity   # a folder holding one checkpoint


def test_hub_ids_reach_the_hub_with_their_options(vavae_case, kl_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id goes to hf_hub_download (va-vae: the released file name) or from_pretrained (sd-vae) with the
    reference's revision/subfolder, and the reference keeps the hub id. Both stand-ins serve local files."""
    import huggingface_hub

    calls: list[tuple] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, revision=None: calls.append((repo, filename, revision)) or str(vavae_case[2]))
    ref = {**_vavae(Path("hustvl/vavae-imagenet256-f16d32-dinov2")), "revision": "r1"}
    assert load_tokenizer(ref).reference() == ref
    assert calls == [("hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt", "r1")]
    load = diffusers.AutoencoderKL.from_pretrained
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained",
                        lambda name, **kw: calls.append((name, kw)) or load(kl_folder, low_cpu_mem_usage=False))
    tok = load_tokenizer({"kind": "sd-vae", "path": "stabilityai/sd-vae-ft-ema", "revision": "r2", "subfolder": "vae"})
    assert calls[-1] == ("stabilityai/sd-vae-ft-ema", {"low_cpu_mem_usage": False, "revision": "r2", "subfolder": "vae"})
    assert tok.reference() == {"kind": "sd-vae", "path": "stabilityai/sd-vae-ft-ema", "revision": "r2", "subfolder": "vae"}


def test_va_vae_key_map_agrees_with_diffusers_converter(vavae_case) -> None:
    """diffusers' own LDM converter and ours give the same tensor for every key it maps into an AutoencoderKL. It
    does not map attention inside down/up levels (VA-VAE's 16-px level): those it leaves under LDM names."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model, ldm, _ = vavae_case
    config = ldm_vae_config(**TINY_LDM)
    theirs = convert_ldm_vae_checkpoint(dict(ldm), config)
    ours = model.state_dict()
    in_level_attention = {k for k in ours if re.match(r"(encoder\.down|decoder\.up)_blocks\.\d+\.attentions\.", k)}
    assert len(in_level_attention) == 30          # 1 encoder + 2 decoder attention blocks, 10 tensors each
    assert set(ours) - set(theirs) == in_level_attention
    assert all(torch.equal(theirs[k], ours[k]) for k in set(ours) - in_level_attention)


def test_va_vae_saved_folder_reloads_as_va_vae(vavae_case, tmp_path: Path) -> None:
    """save_pretrained writes a diffusers AutoencoderKL folder plus our marker; the marker makes it va-vae (a bare
    AutoencoderKL folder would be sd-vae), and sd-vae refuses it by name."""
    tok = load_tokenizer(_vavae(vavae_case[2]))
    saved = tok.save_pretrained(tmp_path / "va")
    again = load_tokenizer(saved)
    assert (again.kind, again.identity) == ("va-vae", tok.identity)
    assert load_tokenizer(again.reference()).identity == tok.identity
    with pytest.raises(ConfigError, match="holds a va-vae tokenizer"):
        load_tokenizer(f"sd-vae:{saved}")
    (saved / MARKER).unlink()
    assert load_tokenizer(saved).kind == "sd-vae"


def test_va_vae_refuses_a_checkpoint_with_a_missing_or_unknown_key(vavae_case, tmp_path: Path) -> None:
    _, ldm, _ = vavae_case
    broken = {k: v for k, v in ldm.items() if k != "decoder.up.1.block.0.conv2.bias"}
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"missing decoder\.up_blocks\.0\.resnets\.0\.conv2\.bias"):
        load_ldm_vae(tmp_path / "missing.pt", TINY_LDM)
    torch.save({**ldm, "encoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"unknown encoder\.extra\.weight"):
        load_ldm_vae(tmp_path / "extra.pt", TINY_LDM)
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_tokenizer(f"va-vae:{tmp_path / 'nowhere' / 'x.pt'}")


# ------------------------------------------------------------------------------------------------------ RAE, DC-AE
def test_rae_matches_diffusers(rae_folder: Path) -> None:
    """AutoencoderRAE takes [0,1] images (it resizes and normalises them itself); our latents are its normalised
    latents unchanged, and decode clamps its images to [0,1]."""
    model = diffusers.AutoencoderRAE.from_pretrained(rae_folder).eval()
    by_spec, by_folder = load_tokenizer(f"rae:{rae_folder}"), load_tokenizer(rae_folder)
    assert by_spec.kind == by_folder.kind == "rae" and by_spec.identity == by_folder.identity
    x = _images()
    with torch.no_grad():
        expected = model.encode(x).latent
        decoded = model.decode(expected).sample.clamp(0, 1)
    z = by_spec.encode(x)
    assert z.shape == (2, *by_spec.latent_shape(SIZE)) == (2, 64, 2, 2)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)
    images = by_folder.decode(z)
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, decoded, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="makes 16-px images"):
        by_spec.latent_shape(32)
    assert load_tokenizer(by_spec.reference()).identity == by_spec.identity


def test_dc_ae_matches_diffusers(tmp_path: Path) -> None:
    model = diffusers.AutoencoderDC(latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                                    decoder_block_types="ResBlock", encoder_block_out_channels=(16, 32),
                                    decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1),
                                    decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                                    decoder_qkv_multiscales=((), ()), scaling_factor=0.4)
    _randomise(model, 5).save_pretrained(tmp_path / "dc")
    tok = load_tokenizer(tmp_path / "dc")
    x = _images()
    with torch.no_grad():
        expected = model.encode(x * 2 - 1).latent * 0.4
        decoded = ((model.decode(expected / 0.4).sample + 1) / 2).clamp(0, 1)
    assert tok.kind == "dc-ae" and tok.latent_shape(SIZE) == (4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(tok.encode(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(tok.decode(expected), decoded, rtol=0, atol=1e-6)


def test_wrong_class_missing_folder_and_unknown_option_are_config_errors(kl_folder: Path, rae_folder: Path,
                                                                        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds a diffusers AutoencoderRAE; sd-vae loads AutoencoderKL"):
        load_tokenizer(f"sd-vae:{rae_folder}")
    with pytest.raises(ConfigError, match="holds a diffusers AutoencoderKL; rae loads AutoencoderRAE"):
        load_tokenizer(f"rae:{kl_folder}")
    with pytest.raises(ConfigError, match="no such folder"):
        load_tokenizer(f"sd-vae:{tmp_path / 'missing' / 'vae'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers model folder"):
        load_tokenizer(f"sd-vae:{tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        load_tokenizer({"kind": "sd-vae", "path": str(kl_folder), "colour": "red"})
