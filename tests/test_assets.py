"""The pretrained files fae ships (the demo's frozen encoder and judge) match the SHA-256 their manifests record,
load as what they claim to be, are part of the package data, and a corrupt or missing file is refused by name."""
from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch

import fae.assets as assets
from fae.io import file_sha256

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo-encoder", "demo-judge"])
def test_shipped_files_match_their_manifest(name):
    folder = assets.asset(name)
    recorded = assets.manifest(name)["files"]
    assert "model.safetensors" in recorded and "config.json" in recorded
    assert {p.name for p in folder.iterdir() if p.is_file()} == {*recorded, assets.MANIFEST}
    for file, digest in recorded.items():
        assert file_sha256(folder / file) == digest
    assert assets.manifest(name)["command"].startswith("python scripts/ship_demo_assets.py")


def test_shipped_encoder_is_the_demo_encoder():
    from fae.encoders import EncoderConfig, FrozenEncoder

    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(assets.asset("demo-encoder"))))
    assert encoder.grid == (8, 8) and encoder.dim == 128 and encoder.input_size == 32
    features = encoder(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 64, 128) and features.std() > 0.1
    assert assets.manifest("demo-encoder")["steps"] == 200


def test_shipped_judge_classifies_real_images():
    from fae.data import DataConfig, build_dataset
    from fae.io import read_bundle_config
    from fae.metrics.judge import SmallCNN

    judge = SmallCNN.from_pretrained(assets.asset("demo-judge"))
    assert read_bundle_config(assets.asset("demo-judge"))["test_accuracy"] > 0.85
    test = build_dataset(DataConfig(kind="fashion_mnist", image_size=32, limit=200), "test")
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    labels = torch.stack([test[i]["label"] for i in range(len(test))])
    assert (judge.predict(images) == labels).float().mean() > 0.8


def test_corrupt_or_missing_asset_is_refused_by_name(tmp_path, monkeypatch):
    shutil.copytree(assets.ROOT / "demo-judge", tmp_path / "demo-judge")
    monkeypatch.setattr(assets, "ROOT", tmp_path)
    assert assets.asset("demo-judge") == tmp_path / "demo-judge"
    weights = tmp_path / "demo-judge" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        assets.asset("demo-judge")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        assets.asset("demo-judge")
    with pytest.raises(FileNotFoundError, match="'demo-encoder'"):
        assets.asset("demo-encoder")


def test_every_asset_and_config_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fae"]
    files = [p.relative_to(REPO / "fae").as_posix() for folder in ("assets", "configs")
             for p in (REPO / "fae" / folder).glob("*/*")]
    assert len(files) > 10 and any(f.startswith("configs/paper/") for f in files)
    for file in files:
        assert any(fnmatch.fnmatch(file, pattern) for pattern in patterns), file


def test_configs_resolve_to_the_packaged_copy_outside_a_checkout(tmp_path, monkeypatch):
    from fae.config import ConfigError, read_yaml

    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert read_yaml("configs/paper/fae_dinov2_g14.yaml")["stage"] == "fae"
    (tmp_path / "configs" / "paper").mkdir(parents=True)  # a local file of the same name wins
    (tmp_path / "configs" / "paper" / "fae_dinov2_g14.yaml").write_text("stage: mine\n")
    assert read_yaml("configs/paper/fae_dinov2_g14.yaml")["stage"] == "mine"
    with pytest.raises(ConfigError, match="configs/demo/fae.yaml"):
        read_yaml("configs/demo/nope.yaml")
    with pytest.raises(ConfigError, match="config file not found: other/x.yaml"):
        read_yaml("other/x.yaml")


def test_a_yaml_section_is_read_or_its_absence_handled_as_asked(tmp_path):
    from fae.config import ConfigError, yaml_section

    assert yaml_section("configs/demo/fae.yaml")["kind"] == "fashion_mnist"      # a stage config's data: block
    flat = tmp_path / "flat.yaml"
    flat.write_text("stage: fae\nkind: image_folder\nroot: /x\n")
    assert yaml_section(flat, "data", missing="top_level") == {"kind": "image_folder", "root": "/x"}
    assert yaml_section(flat, "data", missing="empty") == {}
    with pytest.raises(ConfigError, match=r"flat.yaml has no `data:` section"):
        yaml_section(flat, "data")
    flat.write_text("data: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"`data:` must be a mapping"):
        yaml_section(flat, "data", missing="top_level")
