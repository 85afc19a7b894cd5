"""Latent cache: encoding (fae.encoding, `fae encode --num-workers`), shards, exact statistics, the memory-mapped data
set (fae.data.latents)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from margins import within
from tiny import tiny_fae_config

import fae.encoding
from fae.cli import main
from fae.data import flip_coin, split_key
from fae.data.idx import FashionMNIST
from fae.data.latents import STATS, LatentCache, LatentDataset
from fae.encoders import EncoderConfig, FrozenEncoder
from fae.encoding import EncodeOptions, encode_dataset, encode_latents, make_latent_fn
from fae.models.autoencoder import FeatureAutoEncoder


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("latents")
    enc_dir = tiny_encoder_dir
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(enc_dir)))
    torch.manual_seed(0)
    fae = FeatureAutoEncoder(tiny_fae_config()).eval()
    bundle = fae.save_pretrained(root / "fae", extra={"encoder": encoder.reference()})
    data = FashionMNIST(split="test", image_size=16, limit=45)
    # fp32: the rows are compared with a direct fp32 encoding below (auto: tests/test_encode_fast.py)
    cache = encode_latents(data, root / "cache", fae=bundle, options=EncodeOptions(shard_size=20, batch_size=16,
                                                                                   store_std=True, precision="fp32"),
                           progress=False)
    return dict(root=root, encoder=encoder, fae=fae, bundle=bundle, data=data, cache=cache)


def test_cache_layout_and_latents_match_direct_encoding(parts):
    cache = LatentCache(parts["cache"])
    m = cache.manifest
    assert len(cache) == 45 and [s["count"] for s in m["shards"]] == [20, 20, 5]
    assert m["channels"] == 4 and m["grid"] == [4, 4] and m["source"] == "fae" and m["flip"] and m["has_std"]
    assert m["num_classes"] == 10 and m["class_names"][0] == "T-shirt/top"
    assert m["encoder"] == parts["encoder"].reference() and len(m["fae"]["weights_sha256"]) == 64
    assert m["fae_precision"] == "fp32"
    assert torch.equal(cache.labels(), parts["data"].labels)
    for i in (0, 19, 20, 44):
        image = parts["data"][i]["image"][None]
        post = parts["fae"].encode(parts["encoder"](image))
        torch.testing.assert_close(cache.row(i, "latents"), post.mean[0])
        torch.testing.assert_close(cache.row(i, "std"), post.std[0])
        flipped = parts["fae"].encode(parts["encoder"](image.flip(-1))).mean[0]
        torch.testing.assert_close(cache.row(i, "latents_flip"), flipped)
        assert not torch.allclose(flipped, post.mean[0])


def test_statistics_exact_and_byte_identical_on_rerun(parts, tmp_path):
    cache = LatentCache(parts["cache"])
    rows = torch.stack([cache.row(i, k) for k in ("latents", "latents_flip") for i in range(len(cache))]).double()
    torch.testing.assert_close(cache.mean64, rows.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.std64, rows.std(dim=(0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)
    again = encode_latents(parts["data"], tmp_path / "again", fae=parts["bundle"],
                           options=EncodeOptions(shard_size=20, batch_size=16, store_std=True, precision="fp32"),
                           progress=False)
    assert (again / STATS).read_bytes() == (parts["cache"] / STATS).read_bytes()
    assert json.loads((again / STATS).with_name("cache.json").read_text())["stats"]["recipe"].startswith("per-channel")


@pytest.mark.margin
def test_dataset_flip_from_key_and_normalisation(parts):
    ds = LatentDataset(parts["cache"])
    cache = ds.cache
    plain = ds[3]
    torch.testing.assert_close(plain["latent"] * (cache.std64.float().view(-1, 1, 1) + 1e-8)
                               + cache.mean64.float().view(-1, 1, 1), cache.row(3, "latents"))
    assert plain["label"] == parts["data"].labels[3] and plain["label"].dtype == torch.int64
    seen = set()
    for seed in range(12):
        item = ds[(3, seed)]
        flipped = flip_coin(split_key((3, seed))[1])
        expect = LatentDataset(parts["cache"], hflip=False)[3]["latent"] if not flipped else None
        if expect is not None:
            torch.testing.assert_close(item["latent"], expect)
        else:
            assert not torch.allclose(item["latent"], plain["latent"])
        assert torch.equal(item["latent"], ds[(3, seed)]["latent"])  # same key, same item
        seen.add(flipped)
    assert seen == {True, False}
    everything = torch.stack([ds[(i, s)]["latent"] for i in range(len(ds)) for s in range(2)])
    within("|normalized latent mean|", everything.mean().abs(), hi=0.2)
    within("|normalized latent std - 1|", abs(everything.std().item() - 1), hi=0.2)


@pytest.mark.margin
def test_posterior_sampling_uses_the_key_seed(parts):
    ds = LatentDataset(parts["cache"], sample_posterior=True, normalize=False)
    a, b = ds[(5, 1)]["latent"], ds[(5, 1)]["latent"]
    assert torch.equal(a, b) and not torch.equal(a, ds[(5, 2)]["latent"])
    plain = LatentDataset(parts["cache"], hflip=False, normalize=False)
    mean, std = plain[5]["latent"], plain.cache.row(5, "std")
    drawn = torch.stack([LatentDataset(parts["cache"], hflip=False, sample_posterior=True, normalize=False)[(5, s)]
                         ["latent"] for s in range(400)])
    z = (drawn - mean) / std                                             # standard normal if drawn from N(mean, std)
    within("|posterior draw z mean|", z.mean().abs(), hi=0.05)
    within("|posterior draw z std - 1|", abs(z.std().item() - 1), hi=0.05)


def test_raw_features_source(parts, tmp_path):
    out = encode_latents(parts["data"], tmp_path / "raw", fae=parts["bundle"],
                         options=EncodeOptions(source="raw_features", flip=False, shard_size=64), progress=False)
    cache = LatentCache(out)
    assert cache.channels == 32 and cache.grid == (4, 4) and not cache.manifest["flip"]
    feats = parts["encoder"](parts["data"][7]["image"][None])[0]       # (N, D)
    torch.testing.assert_close(cache.row(7, "latents"), feats.T.reshape(32, 4, 4))
    with pytest.raises(ValueError, match="no flipped latents"):
        LatentDataset(out)
    assert LatentDataset(out, hflip=False)[(7, 0)]["latent"].shape == (32, 4, 4)


def test_interrupted_encoding_keeps_finished_shards(parts, tmp_path):
    calls = []
    fn = make_latent_fn(parts["encoder"], parts["fae"], "fae", (4, 4))

    def counting(batch, with_flip):
        calls.append(len(batch["image"]))
        return fn(batch, with_flip)

    opts = EncodeOptions(shard_size=20, batch_size=20, flip=False)
    out = encode_dataset(counting, parts["data"], tmp_path / "c", opts, progress=False)
    first = (out / STATS).read_bytes()
    assert sum(calls) == 45
    (out / "shard-00002.safetensors").unlink()
    calls.clear()
    encode_dataset(counting, parts["data"], tmp_path / "c", opts, progress=False)
    assert calls == [5]                                                  # only the missing shard is recomputed
    assert (out / STATS).read_bytes() == first


def test_feature_cache_skips_the_encoder_and_gives_the_same_latents(parts, tmp_path):
    from fae.data.features import build_feature_cache

    feats = build_feature_cache(parts["encoder"], parts["data"], tmp_path / "features.safetensors", flips=True,
                                progress=False)
    out = encode_latents(parts["data"], tmp_path / "via_cache", fae=parts["bundle"], feature_cache=feats.path,
                         options=EncodeOptions(shard_size=20, batch_size=16, store_std=True, precision="fp32"),
                         progress=False)
    a, b = LatentCache(out), LatentCache(parts["cache"])
    for key in ("latents", "latents_flip", "std", "labels"):
        for i in (0, 21, 44):
            torch.testing.assert_close(a.row(i, key), b.row(i, key))
    torch.testing.assert_close(a.mean64, b.mean64)
    other = FashionMNIST(split="test", image_size=16, limit=44)
    with pytest.raises(ValueError, match="another data set"):
        encode_latents(other, tmp_path / "bad", fae=parts["bundle"], feature_cache=feats.path, progress=False)


def test_errors_name_the_problem(parts, tmp_path):
    with pytest.raises(ValueError, match="needs the FAE bundle"):
        encode_latents(parts["data"], tmp_path / "x", encoder=parts["encoder"])
    with pytest.raises(ValueError, match="store_std needs a posterior"):
        EncodeOptions(source="raw_features", store_std=True).validate()
    with pytest.raises(FileNotFoundError, match="fae encode"):
        LatentCache(tmp_path)
    no_std = encode_latents(parts["data"], tmp_path / "nostd", fae=parts["bundle"],
                            options=EncodeOptions(shard_size=64, flip=False), progress=False)
    with pytest.raises(ValueError, match="posterior std"):
        LatentDataset(no_std, hflip=False, sample_posterior=True)


def test_encode_cli_passes_num_workers(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(fae.encoding, "encode_latents", lambda data, out, **kw: seen.update(kw) or Path(out))
    (tmp_path / "data.yaml").write_text("data: {kind: fashion_mnist, split: test, image_size: 16, limit: 4}\n")
    assert main(["encode", "--data", str(tmp_path / "data.yaml"), "--out", str(tmp_path / "c"), "--num-workers", "3",
                 "--no-progress"]) == 0
    assert seen["options"].num_workers == 3
