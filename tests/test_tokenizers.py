"""A latent space is one unit: a toy tokenizer, defined here and registered through the public registry, goes
through `fae encode --tokenizer`, `fae train dit`, `fae sample` (which reloads it from the reference the generator
recorded) and `GenerationPipeline`, with no line of `fae/` knowing it; a tokenizer of other weights or another kind
is refused. Also: the FAE is one kind of the same registry."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fae.cli import main
from fae.config import ConfigError
from fae.data.latents import LatentCache
from fae.generators import load_generator
from fae.io import read_bundle_config
from fae.pipeline import GenerationPipeline
from fae.sampling import generate, load_decoder
from fae.tokenizers import (
    FAE,
    Tokenizer,
    TokenizerKind,
    load_tokenizer,
    register_tokenizer,
    state_dict_sha256,
    tokenizer_kinds,
    unregister_tokenizer,
)
from fae.transport import SamplerConfig

MARKER = "toy_tokenizer.json"


class PoolTokenizer(Tokenizer):
    """4x4 average pooling, then a fixed (seeded) invertible mix of the 3 channels; decoding unmixes and upsamples.
    Its "weights" are the mixing matrix, so two seeds are two latent spaces of the same shape."""

    kind = "toy"

    def __init__(self, seed: int, folder: str | None = None) -> None:
        self.seed, self.folder = seed, folder
        self.net = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.net.weight.copy_(torch.eye(3) + 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
        self.device = torch.device("cpu")

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (3, image_size // 4, image_size // 4)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images * 2 - 1, 4)
        return torch.einsum("oc,bchw->bohw", self.net.weight, pooled)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("oc,bchw->bohw", torch.linalg.inv(self.net.weight), latents)
        return ((F.interpolate(pooled, scale_factor=4, mode="nearest") + 1) / 2).clamp(0, 1)

    @property
    def identity(self) -> str:
        return state_dict_sha256(self.net)

    def reference(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.folder}

    def to(self, device: str | torch.device) -> PoolTokenizer:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).write_text(json.dumps({"seed": self.seed}))
        return directory


def _load(path: str | None, device: str | torch.device = "cpu", **options: Any) -> PoolTokenizer:
    if path is None or not (Path(path) / MARKER).is_file():
        raise ConfigError(f"{path}: no {MARKER} here")
    return PoolTokenizer(json.loads((Path(path) / MARKER).read_text())["seed"], str(Path(path).resolve())).to(device)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy kind registered for this module; two saved toy tokenizers (seeds 0 and 1), a latent cache of 40 images
    made through the CLI, and a DiT trained on it."""
    kind = register_tokenizer(TokenizerKind("toy", _load, lambda p: (p / MARKER).is_file(), "4x4 pooling, for tests"))
    root = tmp_path_factory.mktemp("toy")
    first = PoolTokenizer(0).save_pretrained(root / "toy-0")
    other = PoolTokenizer(1).save_pretrained(root / "toy-1")
    (root / "data.yaml").write_text("data: {kind: fashion_mnist, split: test, image_size: 16, limit: 40}\n")
    assert main(["encode", "--tokenizer", f"toy:{first}", "--data", str(root / "data.yaml"), "--out",
                 str(root / "cache"), "--shard-size", "16", "--no-progress"]) == 0
    (root / "dit.yaml").write_text(f"""
stage: dit
latents: {root / 'cache'}
model: {{input_size: [4, 4], in_channels: 3, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10}}
optim: {{lr: 1.0e-3}}
train: {{steps: 4, batch_size: 8, checkpoint_every: 4, log_every: 1, seed: 1}}
""")
    assert main(["train", "dit", "--config", str(root / "dit.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    yield {"root": root, "first": first, "other": other, "cache": root / "cache", "run": root / "run", "kind": kind}
    unregister_tokenizer("toy")


def test_the_registry_lists_the_fae_first_and_the_toy_after_registration(toy):
    kinds = list(tokenizer_kinds())
    assert kinds[0] == "fae" and "toy" in kinds and "toy" not in kinds[:1]
    with pytest.raises(ValueError, match="registered already"):
        register_tokenizer(TokenizerKind("toy", _load, lambda p: False))
    with pytest.raises(ConfigError, match="unknown tokenizer kind 'nope'"):
        load_tokenizer({"kind": "nope", "path": "x"})
    with pytest.raises(ConfigError, match="no tokenizer kind recognises"):
        load_tokenizer(toy["root"])           # a folder no kind claims
    assert isinstance(load_tokenizer(toy["first"]), PoolTokenizer)   # a bare folder its kind recognises


def test_the_cache_holds_the_toys_latents_of_images_and_flips_and_records_it(toy):
    """Shards hold exactly tokenizer.encode(images) and of the flipped images; the manifest names kind, identity,
    reference and image size; statistics are over both."""
    from fae.data import DataConfig, build_dataset

    cache = LatentCache(toy["cache"])
    m = cache.manifest
    tok = load_tokenizer(toy["first"])
    assert m["source"] == "tokenizer" and m["tokenizer"]["kind"] == "toy"
    assert m["tokenizer"]["sha256"] == tok.identity and m["tokenizer"]["image_size"] == 16
    assert m["tokenizer"]["reference"] == {"kind": "toy", "path": str(toy["first"].resolve())}
    assert cache.channels == 3 and tuple(m["grid"]) == (4, 4) and m["num_items"] == 40
    data = build_dataset(DataConfig(kind="fashion_mnist", split="test", image_size=16, limit=40), "test")
    images = torch.stack([data[i]["image"] for i in range(16)])
    shard = load_file(str(toy["cache"] / "shard-00000.safetensors"))
    torch.testing.assert_close(shard["latents"], tok.encode(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(shard["latents_flip"], tok.encode(images.flip(-1)), rtol=0, atol=1e-6)
    everything = torch.cat([torch.cat([load_file(str(p))["latents"], load_file(str(p))["latents_flip"]])
                            for p in sorted(toy["cache"].glob("shard-*.safetensors"))])
    torch.testing.assert_close(torch.tensor(cache.stats()["mean"], dtype=torch.float64), everything.double().mean(dim=(0, 2, 3)))


def test_a_generator_decodes_through_the_tokenizer_its_bundle_records(toy, tmp_path):
    """No tokenizer named: sampling reloads it from the recorded reference; the images are its decode of the
    generator's latents. Another toy (other weights) and another kind (an FAE) are refused."""
    gen = load_generator(toy["run"])
    assert gen.record.latents is not None and gen.record.latents.tokenizer == "toy"
    decode = load_decoder(gen)
    sampler = SamplerConfig(method="euler", steps=3)
    out = generate(gen, decode, 4, seed=5, sampler=sampler, progress=False)
    assert out.images.shape == (4, 16, 16, 3)
    # the decoded images are blocky (4x4 nearest upsampling of the toy's decode): each 4x4 block is one colour
    blocks = out.images.reshape(4, 4, 4, 4, 4, 3)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    with pytest.raises(ConfigError, match="another TOY"):
        load_decoder(gen, tokenizer=f"toy:{toy['other']}")
    with pytest.raises(ConfigError, match="not --fae"):
        load_decoder(gen, fae=toy["first"])
    from tiny import tiny_fae_config

    from fae.encoders import EncoderConfig, FrozenEncoder, save_tiny_encoder
    from fae.models.autoencoder import FeatureAutoEncoder

    enc_dir = save_tiny_encoder("dinov2", tmp_path / "enc", hidden_size=32, num_layers=1, num_heads=2, patch_size=4,
                                image_size=16)
    fae = FAE(FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(enc_dir))),
              FeatureAutoEncoder(tiny_fae_config(latent_channels=3)))
    with pytest.raises(ConfigError, match="holds toy latents"):
        load_decoder(gen, tokenizer=fae)


def test_sample_cli_and_a_pipeline_folder_give_the_same_images_as_the_library(toy, tmp_path):
    gen = load_generator(toy["run"])
    sampler = SamplerConfig(method="euler", steps=3)
    apart = generate(gen, load_decoder(gen), 6, seed=3, sampler=sampler, progress=False)
    folder = GenerationPipeline.from_parts(toy["run"], f"toy:{toy['first']}").save_pretrained(tmp_path / "pipe")
    assert (folder / "tokenizer" / MARKER).is_file()
    ours = GenerationPipeline.from_pretrained(folder).generate(6, seed=3, sampler=sampler, progress=False)
    assert np.array_equal(ours.images, apart.images)
    assert main(["sample", "--generator", str(toy["run"]), "-n", "6", "--seed", "3", "--steps", "3", "--sampler",
                 "euler", "--out", str(tmp_path / "cli"), "--no-progress", "--no-pngs"]) == 0
    assert np.array_equal(np.load(tmp_path / "cli" / "samples.npz")["arr_0"], apart.images)
    with pytest.raises(ConfigError, match="another TOY"):
        GenerationPipeline.from_parts(toy["run"], toy["other"])


def test_encode_refuses_mixed_or_misnamed_latent_spaces(toy, tmp_path, capsys):
    data = toy["root"] / "data.yaml"
    bad = {"not both": ["--tokenizer", f"toy:{toy['first']}", "--fae", str(toy["first"])],
           "no such folder": ["--tokenizer", str(tmp_path / "missing")],
           "drop --feature-cache": ["--tokenizer", f"toy:{toy['first']}", "--feature-cache", str(tmp_path / "f")]}
    for message, args in bad.items():
        assert main(["encode", *args, "--data", str(data), "--out", str(tmp_path / "c")]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "c" / "cache.json").exists()


def test_the_fae_is_a_tokenizer_kind_and_encode_by_tokenizer_matches_encode_by_fae(tiny_latent_world, tmp_path):
    """`--tokenizer <FAE pipeline>` is the FAE way: the same cache bytes as `--fae`; the FAE's identity is the
    SHA-256 of its FeatureAutoEncoder weights, which generator bundles recorded before tokenizers were units."""
    from fae.io import WEIGHTS_NAME, file_sha256

    w = tiny_latent_world
    fae = load_tokenizer(w["pipeline"])
    assert isinstance(fae, FAE) and fae.kind == "fae"
    assert fae.identity == file_sha256(w["fae"] / WEIGHTS_NAME)
    assert fae.latent_shape(16) == (4, 4, 4)
    assert main(["encode", "--tokenizer", str(w["pipeline"]), "--data", str(w["root"] / "data.yaml"), "--out",
                 str(tmp_path / "cache"), "--shard-size", "16", "--no-progress"]) == 0
    for shard in sorted(w["cache"].glob("shard-*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(tmp_path / "cache" / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_bundle_config(w["pipeline"])["class"] == "FAE"


def test_eval_recon_scores_tokenizers_side_by_side_on_the_same_images(toy, tmp_path):
    """`fae eval recon --tokenizer` gives one row per latent space; a row's PSNR is that of the tokenizer's own
    decode(encode(x)) on the same images (the two toys differ only in an invertible mix: the same images back)."""
    from fae.data import DataConfig, build_dataset
    from fae.metrics.recon import psnr

    assert main(["eval", "recon", "--tokenizer", f"a=toy:{toy['first']}", "--tokenizer", f"b={toy['other']}",
                 "--data", "fashion_mnist", "--image-size", "16", "--limit", "20", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "recon.json").read_text())["decoders"]
    data = build_dataset(DataConfig(kind="fashion_mnist", split="test", image_size=16, hflip=False), "test")
    images = torch.stack([data[i]["image"] for i in range(20)])
    tok = load_tokenizer(toy["first"])
    expected = psnr(images, tok.decode(tok.encode(images))).mean().item()
    assert set(rows) == {"a", "b"} and rows["a"]["psnr"] == pytest.approx(expected, abs=1e-3)
    assert rows["b"]["psnr"] == pytest.approx(rows["a"]["psnr"], abs=1e-3) and (tmp_path / "recon_grid.png").is_file()
