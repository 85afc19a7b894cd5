"""Data: keys and seeded flips, ADM crop, image folders (corrupt files, in DataLoader workers too), Fashion-MNIST IDX,
feature cache."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fae.config import ConfigError, from_dict
from fae.data import (
    CachedFeatureDataset,
    DataConfig,
    FashionMNIST,
    FeatureCache,
    ImageFolderDataset,
    build_dataset,
    build_feature_cache,
    center_crop_arr,
    flip_coin,
    read_idx,
    split_key,
)
from fae.data.idx import FASHION_MNIST_DIR
from fae.encoders import EncoderConfig, FrozenEncoder

HAVE_FMNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


# -- keys ----------------------------------------------------------------------------------------------------------

def test_split_key_and_flip_coin() -> None:
    assert split_key(5) == (5, None)
    assert split_key(torch.tensor(4))[0] == 4
    index, gen = split_key((7, 123))
    assert index == 7 and isinstance(gen, torch.Generator)
    # the same seed gives the same decision; over many seeds both outcomes occur
    flips = [flip_coin(split_key((0, s))[1]) for s in range(64)]
    assert flips == [flip_coin(split_key((0, s))[1]) for s in range(64)]
    assert 16 < sum(flips) < 48
    assert flip_coin(None) is False
    with pytest.raises(TypeError, match="index"):
        split_key((1, 2, 3))


# -- image folders -------------------------------------------------------------------------------------------------

def _png(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for i in range(3):
        _png(root / "cat" / f"c{i}.png", (40 + 10 * i, 30), seed=i)
    for i in range(3):
        _png(root / "dog" / "sub" / f"d{i}.png", (24, 36), seed=10 + i)
    (root / "dog" / "sub" / "d1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt, sorted 2nd
    (root / "dog" / "notes.txt").write_text("ignored")
    return root


def test_center_crop_matches_adm_recipe() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)  # H=64, W=128
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # short side 64 >= 2*32: one BOX halving to 64x32, the bicubic step keeps that size, crop columns 16..48
    halved = np.asarray(Image.fromarray(arr).resize((64, 32), resample=Image.Resampling.BOX))
    np.testing.assert_array_equal(out, halved[:, 16:48])
    assert center_crop_arr(Image.fromarray(arr[:, :50]), 40).shape == (40, 40, 3)  # upscaling path


def test_image_folder_classes_and_items(folder: Path) -> None:
    ds = ImageFolderDataset(folder, image_size=16)
    assert len(ds) == 6 and ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert [int(ds[i]["label"]) for i in (0, 1, 2, 3, 5)] == [0, 0, 0, 1, 1]  # index 4 is the corrupt d1.png
    expected = center_crop_arr(Image.open(folder / "cat" / "c1.png").convert("RGB"), 16)
    np.testing.assert_allclose(item_image_uint8(ds[1]["image"]), expected)


def item_image_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_corrupt_image_is_skipped_with_warning(folder: Path) -> None:
    ds = ImageFolderDataset(folder, image_size=16)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.name == "d1.png"][0]
    with pytest.warns(RuntimeWarning, match="d1.png"):
        item = ds[bad]
    assert ds.skipped == 1 and item is None          # dropped: no neighbour stands in
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known-bad: no second warning, no second count
        assert ds[bad] is None
    assert ds.skipped == 1
    from fae.data.readable import collate_present

    batch = collate_present([ds[bad - 1], ds[bad], ds[bad + 1]])   # the loader's collate leaves it out
    assert batch["image"].shape[0] == 2
    torch.testing.assert_close(batch["image"][1], ds[bad + 1]["image"])
    assert collate_present([None, None]) is None


def test_image_folder_flip_follows_seed(folder: Path) -> None:
    ds = ImageFolderDataset(folder, image_size=16, hflip=True)
    plain = ds[0]["image"]  # an int key never flips
    for seed in range(8):
        flipped = flip_coin(split_key((0, seed))[1])
        image = ds[(0, seed)]["image"]
        torch.testing.assert_close(image, plain.flip(-1) if flipped else plain)
        torch.testing.assert_close(image, ds[(0, seed)]["image"])  # reproducible


def test_image_folder_flat_limit_and_errors(tmp_path: Path, folder: Path) -> None:
    for i in range(4):
        _png(tmp_path / "flat" / f"{i}.jpg", (20, 20), seed=i)
    flat = ImageFolderDataset(tmp_path / "flat", image_size=8)
    assert len(flat) == 4 and flat.num_classes == 1 and int(flat[3]["label"]) == 0
    limited = ImageFolderDataset(folder, image_size=8, limit=2)
    assert len(limited) == 2 and {label for _, label in limited.samples} == {0, 1}  # both classes kept
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", image_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", image_size=8)


# -- Fashion-MNIST -------------------------------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    header = struct.pack(">I", magic if magic is not None else (0x0800 | array.ndim))
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


@pytest.fixture()
def fake_fmnist(tmp_path: Path) -> Path:
    root = tmp_path / "fmnist"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_fashion_mnist_reader(fake_fmnist: Path) -> None:
    raw = read_idx(fake_fmnist / "t10k-images-idx3-ubyte.gz", ndim=3)
    ds = FashionMNIST(fake_fmnist, split="test", image_size=28)
    assert len(ds) == 5 and len(ds.class_names) == 10
    item = ds[2]
    assert item["image"].shape == (3, 28, 28) and int(item["label"]) == 2
    torch.testing.assert_close(item["image"][0], torch.from_numpy(raw[2].astype(np.float32)) / 255)
    assert torch.equal(item["image"][0], item["image"][1])  # grey repeated to RGB
    padded = FashionMNIST(fake_fmnist, split="test", image_size=32, fit="pad")[2]["image"]
    assert torch.equal(padded[:, 2:30, 2:30], item["image"]) and padded[:, :2].abs().sum() == 0
    small = FashionMNIST(fake_fmnist, split="train", image_size=16, limit=7)
    assert len(small) == 7 and small[6]["image"].shape == (3, 16, 16)
    assert small[6]["image"].min() >= 0 and small[6]["image"].max() <= 1


def test_fashion_mnist_errors(fake_fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(fake_fmnist, split="val")
    labels = fake_fmnist / "t10k-labels-idx1-ubyte.gz"
    _write_idx(labels, np.arange(4))
    with pytest.raises(ValueError, match="4 labels for 5 images"):
        FashionMNIST(fake_fmnist, split="test")
    _write_idx(labels, np.arange(5), magic=0x12345678)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: not an IDX file"):
        FashionMNIST(fake_fmnist, split="test")
    images = fake_fmnist / "train-images-idx3-ubyte.gz"
    with gzip.open(images, "rb") as f:
        data = f.read()
    with gzip.open(images, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: header shape"):
        FashionMNIST(fake_fmnist, split="train")
    images.write_bytes(b"garbage, not gzip")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: cannot read"):
        FashionMNIST(fake_fmnist, split="train")


@pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_files() -> None:
    ds = FashionMNIST(split="test", image_size=32, limit=200)
    assert len(FashionMNIST(split="test")) == 10_000
    labels = torch.stack([ds[i]["label"] for i in range(len(ds))])
    assert labels.min() == 0 and labels.max() == 9 and len(labels.unique()) == 10
    assert ds[0]["image"].shape == (3, 32, 32)


# -- config --------------------------------------------------------------------------------------------------------

def test_data_config_and_build(fake_fmnist: Path, folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind"):
        from_dict(DataConfig, {"kind": "imagenet"})
    with pytest.raises(ConfigError, match="root"):
        from_dict(DataConfig, {"kind": "image_folder"})
    with pytest.raises(ConfigError, match="limit"):
        from_dict(DataConfig, {"limit": 0})
    cfg = from_dict(DataConfig, {"kind": "fashion_mnist", "root": str(fake_fmnist), "image_size": 16, "hflip": True})
    train, test = build_dataset(cfg), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (12, 5) and train.hflip and train.image_size == 16
    (tmp_path / "split").mkdir()
    os.rename(folder, tmp_path / "split" / "train")
    _png(tmp_path / "split" / "val" / "x" / "0.png", (20, 20), seed=0)
    cfg = from_dict(DataConfig, {"kind": "image_folder", "root": str(tmp_path / "split"), "image_size": 8})
    assert len(build_dataset(cfg)) == 6 and len(build_dataset(cfg, "val")) == 1
    with pytest.raises(FileNotFoundError, match="test"):
        build_dataset(cfg, "test")


# -- feature cache -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir) -> FrozenEncoder:
    return FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir)))


def test_cached_features_equal_on_the_fly(encoder: FrozenEncoder, fake_fmnist: Path, tmp_path: Path) -> None:
    ds = FashionMNIST(fake_fmnist, split="train", image_size=16)
    cache = build_feature_cache(encoder, ds, tmp_path / "f.safetensors", batch_size=5, flips=True, progress=False)
    assert (len(cache), cache.num_tokens, cache.dim, cache.has_flips) == (12, 16, 32, True)
    assert cache.encoder == encoder.reference()
    for i in (0, 7, 11):
        image = ds[i]["image"][None]
        torch.testing.assert_close(cache.get(i), encoder(image)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.get(i, flipped=True), encoder(image.flip(-1))[0], atol=1e-5, rtol=1e-5)
    assert cache.all().shape == (12, 16, 32)
    half = build_feature_cache(encoder, ds, tmp_path / "h.safetensors", dtype="float16", progress=False)
    assert half.get(3).dtype == torch.float32 and not half.has_flips
    torch.testing.assert_close(half.get(3), cache.get(3), atol=2e-2, rtol=1e-2)


def test_cached_dataset_flip_consistency(encoder: FrozenEncoder, fake_fmnist: Path, tmp_path: Path) -> None:
    base = FashionMNIST(fake_fmnist, split="train", image_size=16, hflip=True)
    cache = build_feature_cache(encoder, base, tmp_path / "f.safetensors", flips=True, progress=False)
    ds = CachedFeatureDataset(base, cache, encoder_reference=encoder.reference())
    seen = set()
    for seed in range(40):   # until both sides of the coin came up (six seeds were all unflipped at one offset)
        item = ds[(4, seed)]
        torch.testing.assert_close(item["image"], base[(4, seed)]["image"])  # same flip as the base data set
        torch.testing.assert_close(item["features"], encoder(item["image"][None])[0], atol=1e-5, rtol=1e-5)
        seen.add(flip_coin(split_key((4, seed))[1]))
        if seen == {True, False}:
            break
    assert seen == {True, False}
    assert int(ds[4]["label"]) == 4 and len(ds) == 12
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["features"].shape == (4, 16, 32) and batch["image"].shape == (4, 3, 16, 16)
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers pickle the data set after it was used
    torch.testing.assert_close(clone[(4, 1)]["features"], ds[(4, 1)]["features"])
    with pytest.raises(ValueError, match="flips=True"):
        CachedFeatureDataset(base, build_feature_cache(encoder, base, tmp_path / "n.safetensors", progress=False))
    with pytest.raises(ValueError, match="another data set"):
        CachedFeatureDataset(FashionMNIST(fake_fmnist, split="train", image_size=12), cache)
    with pytest.raises(ValueError, match="another encoder"):
        CachedFeatureDataset(base, cache, encoder_reference={**encoder.reference(), "affine_norm": False})


def test_features_only_items_open_no_image(encoder: FrozenEncoder, folder: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 trains on cached features alone: with images=False no file is opened, the features, flips and
    labels are those of the full items, and the file the cache found unreadable stays dropped."""
    base = ImageFolderDataset(folder, image_size=16, hflip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt file's warning, tested elsewhere
        cache = build_feature_cache(encoder, base, tmp_path / "f.safetensors", flips=True, progress=False)
    full = CachedFeatureDataset(base, cache)
    opened: list[int] = []
    original = ImageFolderDataset.load
    monkeypatch.setattr(ImageFolderDataset, "load", lambda self, i, *rest: opened.append(i) or original(self, i, *rest))
    lean = CachedFeatureDataset(base, cache, images=False)
    for key in [0, 3, 5, *((i, s) for i in (1, 2, 5) for s in range(4))]:
        item = lean[key]
        assert item is not None and set(item) == {"features", "label"} and opened == []
        reference = full[key]
        assert opened  # the full item does open its file, so the count above would see an open
        torch.testing.assert_close(item["features"], reference["features"])
        assert int(item["label"]) == int(reference["label"])
        opened.clear()
    assert lean[4] is None and all(lean[i] is not None for i in (0, 1, 2, 3, 5))  # index 4: the corrupt d1.png
    assert opened == []


def test_cache_reuse_and_invalidation(encoder: FrozenEncoder, fake_fmnist: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ds = FashionMNIST(fake_fmnist, split="test", image_size=16)
    path = tmp_path / "f.safetensors"
    first = build_feature_cache(encoder, ds, path, progress=False)
    calls = []
    original = FrozenEncoder.forward
    monkeypatch.setattr(FrozenEncoder, "forward", lambda self, x: calls.append(1) or original(self, x))
    again = build_feature_cache(encoder, ds, path, progress=False)
    assert calls == [] and again.metadata == first.metadata  # reused, nothing recomputed
    build_feature_cache(encoder, ds, path, flips=True, progress=False)  # different options: rebuilt
    assert calls and FeatureCache(path).has_flips
    calls.clear()
    other = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=encoder.config.name_or_path,
                                                    affine_norm=False))
    rebuilt = build_feature_cache(other, ds, path, flips=True, progress=False)
    assert calls and rebuilt.encoder["affine_norm"] is False
    calls.clear()
    build_feature_cache(other, FashionMNIST(fake_fmnist, split="test", image_size=16, limit=3), path,
                        flips=True, progress=False)
    assert calls and len(FeatureCache(path)) == 3
    # a folder as path: one file per metadata, so two encoders' caches live side by side
    a = build_feature_cache(encoder, ds, tmp_path / "caches", progress=False)
    b = build_feature_cache(other, ds, tmp_path / "caches", progress=False)
    assert a.path.parent == b.path.parent == tmp_path / "caches" and a.path != b.path
    assert build_feature_cache(encoder, ds, tmp_path / "caches", progress=False).path == a.path
    path.write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a readable"):
        FeatureCache(path)
    assert len(build_feature_cache(encoder, ds, path, progress=False)) == 5  # a broken file is rebuilt
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp files


def test_image_folder_in_workers_drops_corrupt_files_and_counts_per_process(tmp_path):
    from PIL import Image
    from torch.utils.data import DataLoader

    from fae.data.images import ImageFolderDataset
    from fae.data.readable import collate_present

    for i in range(4):
        Image.fromarray(torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    batches = {}
    for workers in (0, 2):
        ds = ImageFolderDataset(tmp_path, image_size=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the warning is raised inside each worker
            loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_present)
            batches[workers] = [b["image"] for b in loader]
        # each process counts the corrupt files it met: the main process met it only without workers
        assert ds.skipped == (1 if workers == 0 else 0)
    assert [b.shape[0] for b in batches[2]] == [1, 2]     # the corrupt item is dropped, not replaced by a neighbour
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a, b)
