"""Inputs (folder / .npz / tensor), the feature cache, ADM-format and fae reference statistics, and the
generation / reconstruction evaluations, with a small deterministic stand-in feature network."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fae.config import ConfigError
from fae.metrics import (
    evaluate_generation,
    evaluate_reconstruction,
    extract_features,
    frechet_distance,
    load_reference,
    open_images,
    precision_recall,
    save_reference,
)
from fae.metrics.features import FolderSource, NpzSource
from fae.metrics.frechet import compute_stats
from fae.metrics.networks import to_unit_float

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples")  # small sets on purpose


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest.one_thread)."""


class ToyNet:
    """Pooled pixels as 'features' (48-d pool, 10 logits, 36-d spatial); counts its calls."""

    outputs = ("pool", "logits", "spatial")

    def __init__(self, name: str = "toy", standard_weights: bool = False) -> None:
        self.name, self.weights_hash, self.standard = name, "ab" * 32, standard_weights
        self.proj = torch.randn(48, 10, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        x = to_unit_float(images)
        pool = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return {"pool": pool, "logits": 5 * pool @ self.proj,
                "spatial": F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 6).flatten(1)}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "weights_hash": self.weights_hash, "standard_weights": self.standard}


def make_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 smooth random images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 3, 3, generator=g)
    x = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def write_folder(root: Path, images: np.ndarray) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        sub = root / f"class{i % 2}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(im).save(sub / f"{i:04d}.png")
    return root


def test_folder_npz_and_tensor_inputs_agree(tmp_path: Path) -> None:
    images = make_images(13)
    folder = write_folder(tmp_path / "imgs", images)
    np.savez(tmp_path / "s.npz", arr_0=images)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    net = ToyNet()
    ref = extract_features(torch.from_numpy(images).permute(0, 3, 1, 2), net)["pool"]
    # the folder is read sorted by relative path: class0/0000, class0/0002, ..., class1/0001, ...
    order = [int(p.stem) for p in FolderSource(folder).files]
    np.testing.assert_allclose(extract_features(folder, net, batch_size=4)["pool"], ref[order], rtol=1e-6)
    for npz in ("s.npz", "c.npz"):
        np.testing.assert_allclose(extract_features(tmp_path / npz, net, batch_size=5)["pool"], ref, rtol=1e-6)
    assert isinstance(open_images(tmp_path / "s.npz", limit=4), NpzSource)
    assert extract_features(tmp_path / "s.npz", net, limit=4).num_samples == 4
    # a sample-run folder holding one .npz (and grid PNGs) means that .npz
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "samples.npz", arr_0=images)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(run / "grid.png")
    assert isinstance(open_images(run), NpzSource)


def test_input_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_images(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="arr_0"):
        open_images(tmp_path / "k.npz")
    with pytest.raises(FileNotFoundError):
        open_images(tmp_path / "missing")
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "b.png")
    with pytest.raises(ConfigError, match=r"a\.png is 8x8, .*b\.png is 9x9.*--image-size N"):
        extract_features(folder, ToyNet())


def test_feature_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "imgs", make_images(6))
    net = ToyNet()
    first = extract_features(folder, net, batch_size=4, cache_dir=tmp_path / "cache")
    calls = net.calls
    second = extract_features(folder, net, batch_size=4, cache_dir=tmp_path / "cache")
    assert second.cached and not first.cached and net.calls == calls
    for k in first.features:
        np.testing.assert_array_equal(first.features[k], second.features[k])
    # another network (or weights) never reads this entry
    other = ToyNet(name="toy2")
    assert not extract_features(folder, other, cache_dir=tmp_path / "cache").cached
    # a changed file invalidates the entry
    Image.fromarray(make_images(1, seed=9)[0]).save(next(folder.rglob("*.png")))
    third = extract_features(folder, net, cache_dir=tmp_path / "cache")
    assert not third.cached and not np.array_equal(third["pool"], first["pool"])


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(tmp_path: Path) -> None:
    images = make_images(200, seed=1)
    net = ToyNet()
    assert evaluate_generation(images, images, net, metrics=["fid"]).metrics["fd_toy"] == pytest.approx(0.0, abs=1e-9)
    g = np.random.default_rng(0)
    fids = []
    for sigma in (5.0, 20.0, 60.0):
        noisy = np.clip(images + g.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        fids.append(evaluate_generation(noisy, images, net, metrics=["fid"]).metrics["fd_toy"])
    assert 0 < fids[0] < fids[1] < fids[2]


def write_adm_reference(path: Path, stats_images: np.ndarray, ref_images: np.ndarray | None, net: ToyNet) -> None:
    """An ADM-format reference batch: mu/sigma/mu_s/sigma_s of one set, arr_0 = another (as ADM's files)."""
    feats = net.features(torch.from_numpy(stats_images).permute(0, 3, 1, 2))
    pool, spatial = compute_stats(feats["pool"]), compute_stats(feats["spatial"])
    arrays = {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}
    if ref_images is not None:
        arrays["arr_0"] = ref_images
    np.savez(path, **arrays)


def test_reads_adm_reference_batch(tmp_path: Path) -> None:
    adm = tmp_path / "VIRTUAL_test_labeled.npz"
    stats_images, ref_images, samples = make_images(300, seed=2), make_images(40, seed=3), make_images(50, seed=4)
    inception_like = ToyNet(name="inception-v3-fid", standard_weights=True)
    write_adm_reference(adm, stats_images, ref_images, inception_like)
    before = inception_like.calls
    fid_only = evaluate_generation(samples, adm, inception_like, metrics=["fid"])
    assert inception_like.calls == before + 1   # FID needs only the samples' features: arr_0 only for P/R
    report = evaluate_generation(samples, adm, inception_like)
    ref = load_reference(adm, inception_like)
    assert ref.origin == "adm-npz" and ref.get_features("pool").shape == (40, 48)
    assert fid_only.metrics["fid"] == report.metrics["fid"]
    s_feats = inception_like.features(torch.from_numpy(samples).permute(0, 3, 1, 2))
    with np.load(adm) as data:   # FID/sFID use the file's mu/sigma, not statistics of arr_0
        expected_fid = frechet_distance(compute_stats(s_feats["pool"]).mu, compute_stats(s_feats["pool"]).sigma,
                                        data["mu"], data["sigma"])
        expected_sfid = frechet_distance(compute_stats(s_feats["spatial"]).mu,
                                         compute_stats(s_feats["spatial"]).sigma, data["mu_s"], data["sigma_s"])
    assert report.metrics["fid"] == pytest.approx(expected_fid, rel=1e-9)
    assert report.metrics["sfid"] == pytest.approx(expected_sfid, rel=1e-9)
    # precision/recall against the arr_0 images' features
    ref_feats = inception_like.features(torch.from_numpy(ref_images).permute(0, 3, 1, 2))["pool"]
    p, r = precision_recall(ref_feats, s_feats["pool"])
    assert (report.metrics["precision"], report.metrics["recall"]) == pytest.approx((p, r))
    assert set(report.metrics) == {"fid", "sfid", "is", "is_std", "precision", "recall"}
    # another network cannot use TF-Inception statistics: they are recomputed from arr_0, and the report says so
    other = load_reference(adm, ToyNet())
    assert other.origin == "images" and other.num_samples == 40 and "recomputed" in other.notes[0]
    # ... and without images that is an error naming the way out
    write_adm_reference(tmp_path / "noimg.npz", stats_images, None, ToyNet())
    with pytest.raises(ConfigError, match="fae eval stats"):
        load_reference(tmp_path / "noimg.npz", ToyNet())


def test_save_reference_round_trip(tmp_path: Path) -> None:
    images = make_images(60, seed=5)
    folder = write_folder(tmp_path / "ref", images)
    net = ToyNet()
    meta = save_reference(tmp_path / "ref.npz", folder, net, keep_images=10, keep_features=25, seed=1)
    assert meta["num_samples"] == 60 and meta["network"]["weights_hash"] == net.weights_hash
    with np.load(tmp_path / "ref.npz", allow_pickle=False) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "feat_pool", "fae_meta"} <= set(data.files)
        assert data["arr_0"].shape == (10, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert data["feat_pool"].shape == (25, 48)
        assert json.loads(str(data["fae_meta"][()]))["num_images_kept"] == 10
    ref = load_reference(tmp_path / "ref.npz", net)
    assert ref.origin == "fae-stats" and ref.num_samples == 60
    direct = compute_stats(extract_features(folder, net)["pool"])
    np.testing.assert_allclose(ref.stats["pool"].sigma, direct.sigma, rtol=1e-12)
    samples = make_images(30, seed=6)
    from_file = evaluate_generation(samples, tmp_path / "ref.npz", net, metrics=["fid"]).metrics["fd_toy"]
    from_folder = evaluate_generation(samples, folder, net, metrics=["fid"]).metrics["fd_toy"]
    assert from_file == pytest.approx(from_folder, rel=1e-9)
    with pytest.raises(ConfigError, match="cannot give"):
        evaluate_generation(samples, folder, EncoderLike(), metrics=["sfid"])


class EncoderLike(ToyNet):
    outputs = ("pool",)


def test_reconstruction_metrics(tmp_path: Path) -> None:
    images = make_images(8, seed=7)
    a = write_folder(tmp_path / "orig", images)
    b = write_folder(tmp_path / "same", images)
    noise = np.random.default_rng(0).normal(0, 10, images.shape)
    noisy = np.clip(images.astype(float) + noise, 0, 255).astype(np.uint8)
    c = write_folder(tmp_path / "noisy", noisy)
    same = evaluate_reconstruction(a, b, ToyNet())
    assert same.metrics["psnr"] == 100.0 and same.metrics["ssim"] == pytest.approx(1.0)
    assert same.metrics["rfd_toy"] == pytest.approx(0.0, abs=1e-9) and same.num_samples == 8   # not Inception: no rFID
    worse = evaluate_reconstruction(a, c, ToyNet())
    assert worse.metrics["psnr"] < 40 and worse.metrics["ssim"] < 1.0 and worse.metrics["rfd_toy"] > 0
    (next((tmp_path / "noisy").rglob("0003.png"))).rename(tmp_path / "noisy" / "class1" / "0099.png")
    with pytest.raises(ConfigError, match="pair up"):
        evaluate_reconstruction(a, c)


def test_report_json(tmp_path: Path) -> None:
    images = make_images(20, seed=8)
    report = evaluate_generation(images, images, ToyNet(), metrics=["fid", "is"])
    path = report.write(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["feature_network"]["name"] == "toy" and data["feature_network"]["weights_hash"] == "ab" * 32
    assert data["num_samples"] == 20 and data["protocol"]["is"]["splits"] == 10
    assert set(data["metrics"]) == {"fd_toy", "is", "is_std"}   # a Fréchet distance outside Inception is no FID
    assert "fd_toy" in data["protocol"]["metrics"] and "fid" not in data["protocol"]
    assert "fd_toy from 20 samples" in "\n".join(data["notes"])   # small-N warning
    assert "fd_toy" in report.format() and "fid" not in report.format()


def test_too_few_samples_is_a_user_error() -> None:
    images = make_images(20, seed=9)
    with pytest.raises(ConfigError, match="too few"):
        evaluate_generation(images[:3], images, ToyNet(), metrics=["fid", "precision"])
    with pytest.raises(ConfigError, match="splits"):
        evaluate_generation(images[:5], images, ToyNet(), metrics=["is"])
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate_generation(images, images, ToyNet(), metrics=["kid"])
