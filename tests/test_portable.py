"""Bundles name their frozen encoder by content, never by a path that only works from one directory: a pipeline folder
copied elsewhere samples the same images from any working directory with its original encoder folder gone (the small
encoder travels inside it); a large encoder is recorded by absolute path + weights hash, is refused by hash when
another encoder lies there, names hash and path when it is gone and loads from the folder $FAE_ENCODER names; and
bundles written before the hash load as they did, from their own directory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import tiny_fae_config

import fae.encoders.image
from fae.cli import main
from fae.config import ConfigError
from fae.encoders import EncoderConfig, FrozenEncoder, save_tiny_encoder
from fae.generators import DiTGenerator, GeneratorRecord
from fae.io import check_same_encoder, read_bundle_config, reference_differences
from fae.models.autoencoder import FeatureAutoEncoder
from fae.models.dit import DiT, DiTConfig
from fae.models.pixel_decoder import PixelDecoder, PixelDecoderConfig
from fae.pipeline import GenerationPipeline
from fae.tokenizers import FAE
from fae.transport import SamplerConfig

SAMPLER = SamplerConfig(method="euler", steps=2)


def _encoder_dir(folder: Path, seed: int = 0) -> Path:
    """The suite's tiny encoder architecture (tests/conftest.py), in a folder this test may move or replace."""
    return save_tiny_encoder("dinov2", folder, hidden_size=32, num_layers=1, num_heads=2, patch_size=4, image_size=16,
                             seed=seed)


def _pipeline(root: Path, encoder_dir: Path) -> Path:
    """A tiny GenerationPipeline folder: an FAE tokenizer (seeded FAE + pixel decoder) on the encoder in `encoder_dir`
    and an untrained seeded DiT whose record names that FAE, saved as `fae train dit` + `save_pretrained` would."""
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(encoder_dir)))
    torch.manual_seed(0)
    pd = PixelDecoder(PixelDecoderConfig(in_dim=32, num_tokens=16, patch_size=4, width=32, depth=1, num_heads=2,
                                         refine_channels=0))
    tokenizer = FAE(encoder, FeatureAutoEncoder(tiny_fae_config()), pd).save_pretrained(root / "tokenizer")
    identity = FAE.from_pretrained(tokenizer).identity
    manifest = {"source": "fae", "channels": 4, "grid": [4, 4], "fae": {"weights_sha256": identity},
                "encoder": encoder.reference(), "class_names": [str(i) for i in range(3)]}
    cache = SimpleNamespace(manifest=manifest, path=root / "latents", stats=lambda: {"mean": [0.0] * 4, "std": [1.0] * 4})
    dit = DiT(DiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3))
    DiTGenerator(dit, GeneratorRecord.from_cache(cache), "made here").save_pretrained(root / "dit")
    return GenerationPipeline.from_parts(root / "dit", tokenizer).save_pretrained(root / "pipeline")


def _images(folder: Path) -> np.ndarray:
    return GenerationPipeline.from_pretrained(folder).generate(4, seed=3, sampler=SAMPLER, progress=False).images


def _cli_images(folder: Path, out: Path) -> np.ndarray:
    assert main(["sample", "--pipeline", str(folder), "-n", "4", "--seed", "3", "--steps", "2", "--sampler", "euler",
                 "--out", str(out), "--no-progress", "--no-pngs", "--no-grid"]) == 0
    return np.load(out / "samples.npz")["arr_0"]


def test_a_pipeline_folder_samples_from_anywhere_with_its_encoder_folder_gone(tmp_path, monkeypatch, one_thread):
    encoder_dir = _encoder_dir(tmp_path / "models" / "encoder")
    folder = _pipeline(tmp_path / "runs", encoder_dir)
    expected = _images(folder)
    record = json.loads((folder / "tokenizer" / "config.json").read_text())["encoder"]
    assert record["name_or_path"] == "bundle:encoder" and len(record["weights_sha256"]) == 64
    assert (folder / "tokenizer" / "encoder" / "model.safetensors").is_file()

    moved = tmp_path / "elsewhere" / "pipe"
    shutil.copytree(folder, moved)
    shutil.rmtree(tmp_path / "models")            # the encoder the runs were made with is gone,
    shutil.rmtree(tmp_path / "runs")              # and so is everything the pipeline was assembled from
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert np.array_equal(_images(moved), expected)
    assert np.array_equal(_cli_images(moved, tmp_path / "cli"), expected)
    # the tokenizer's inner bundles share its copy: the stage-1 FAE inside loads on its own too
    inner = read_bundle_config(moved / "tokenizer" / "fae")["encoder"]
    assert inner["name_or_path"] == str((moved / "tokenizer" / "encoder").resolve())


def test_a_large_encoder_is_recorded_by_path_and_hash_and_can_be_pointed_at(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(fae.encoders.image, "BUNDLE_COPY_LIMIT", 0)   # every encoder counts as large
    monkeypatch.delenv(fae.encoders.image.ENCODER_ENV, raising=False)
    encoder_dir = _encoder_dir(tmp_path / "models" / "encoder")
    folder = _pipeline(tmp_path / "runs", encoder_dir)
    expected = _images(folder)
    record = read_bundle_config(folder / "tokenizer")["encoder"]
    assert record["name_or_path"] == str(encoder_dir.resolve()) and not (folder / "tokenizer" / "encoder").exists()

    encoder_dir.rename(tmp_path / "models" / "moved")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"{encoder_dir.resolve()} \\(weights SHA-256 {record['weights_sha256']}\\)"
                       ".*FAE_ENCODER"):
        _images(folder)
    monkeypatch.setenv("FAE_ENCODER", str(tmp_path / "models" / "moved"))
    assert np.array_equal(_images(folder), expected)
    assert np.array_equal(_cli_images(folder, tmp_path / "cli"), expected)

    # another encoder (other weights, same architecture) under the recorded path, or where FAE_ENCODER points: refused
    _encoder_dir(encoder_dir, seed=1)
    monkeypatch.delenv("FAE_ENCODER")
    with pytest.raises(ConfigError, match=f"the record says {record['weights_sha256']}"):
        _images(folder)
    shutil.rmtree(encoder_dir)
    monkeypatch.setenv("FAE_ENCODER", str(_encoder_dir(tmp_path / "models" / "other", seed=1)))
    with pytest.raises(ConfigError, match="is not the one recorded"):
        _images(folder)


def test_references_compare_by_weights_hash_and_old_ones_by_place(tmp_path, tiny_encoder_dir, one_thread):
    ref = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir))).reference()
    copy = shutil.copytree(tiny_encoder_dir, tmp_path / "copy")
    moved = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(copy))).reference()
    assert moved["weights_sha256"] == ref["weights_sha256"] and moved["name_or_path"] != ref["name_or_path"]
    check_same_encoder(moved, ref, "the moved encoder", "the original")          # the same weights elsewhere
    other = {**ref, "weights_sha256": "0" * 64}                                  # other weights at the same path
    assert reference_differences(ref, other) == ["weights_sha256"]
    with pytest.raises(ConfigError, match="weights_sha256"):
        check_same_encoder(other, ref, "the bundle", "the encoder")
    assert reference_differences(ref, {**moved, "input_size": 8}) == ["input_size"]
    old = {k: v for k, v in ref.items() if k != "weights_sha256"}                # written before the hash
    assert reference_differences(old, ref) == [] and reference_differences(old, moved) == ["name_or_path"]


def test_a_bundle_written_before_the_hash_loads_from_its_own_directory(tmp_path, monkeypatch, one_thread):
    encoder_dir = _encoder_dir(tmp_path / "runs" / "models" / "encoder")
    folder = _pipeline(tmp_path / "out", encoder_dir)
    tokenizer = folder / "tokenizer"
    shutil.rmtree(tokenizer / "encoder")
    config = json.loads((tokenizer / "config.json").read_text())
    config["encoder"] = {**{k: v for k, v in config["encoder"].items() if k != "weights_sha256"},
                         "name_or_path": "runs/models/encoder"}                         # relative, no hash: as before
    (tokenizer / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    assert FAE.from_pretrained(tokenizer).encoder.config.name_or_path == "runs/models/encoder"
    monkeypatch.chdir(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="runs/models/encoder"):
        FAE.from_pretrained(tokenizer)
