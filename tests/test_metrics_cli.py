"""`fae eval ...` end to end: FID with the Inception network (random weights from a file), the missing-weights
error, reference statistics + generation metrics in a frozen encoder's space, PSNR/SSIM, and the linear probe of
x / x̂ / z on Fashion-MNIST with a tiny encoder and FAE bundle; `fae eval is` and the IS options of `fae eval gen`
(--splits, --split-size, --is-split-size, --network inception:pytorch)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from margins import within
from PIL import Image
from seeding import subprocess_env

from fae.cli import main
from fae.io import file_sha256
from fae.metrics import inception as inc
from fae.metrics.inception import FIDInceptionV3, random_inception_state
from fae.metrics.scores import inception_score

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest.one_thread)."""


def write_images(root: Path, n: int, seed: int, size: int = 16) -> Path:
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")
    for i, im in enumerate((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)):
        Image.fromarray(im).save(root / f"{i:03d}.png")
    return root


def test_fid_and_gen_with_inception(tmp_path: Path) -> None:
    weights = tmp_path / "random_inception.pth"
    torch.save(random_inception_state(0), weights)
    a, b = write_images(tmp_path / "a", 6, 0), write_images(tmp_path / "b", 6, 1)
    common = ["--inception-weights", str(weights), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
              "--no-progress"]
    assert main(["eval", "gen", "--samples", str(a), "--ref", str(b), "--is-splits", "2", *common]) == 0
    report = json.loads((tmp_path / "a.gen.json").read_text())   # default: beside the samples
    assert set(report["metrics"]) == {"fid", "sfid", "is", "is_std", "precision", "recall"}
    assert report["metrics"]["fid"] > 0 and report["num_samples"] == 6
    net = report["feature_network"]
    assert net["name"] == "inception-v3-fid" and net["weights_hash"] == file_sha256(weights)
    assert net["standard_weights"] is False and report["protocol"]["feature_cache"] is False
    # FID alone reuses the cached features; the same set against itself is 0
    assert main(["eval", "fid", "--samples", str(a), "--ref", str(a), "--out", str(tmp_path / "self.json"),
                 *common]) == 0
    self_report = json.loads((tmp_path / "self.json").read_text())
    assert self_report["metrics"] == {"fid": pytest.approx(0.0, abs=1e-6)}
    assert self_report["protocol"]["feature_cache"] is True


def test_missing_weights_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    a = write_images(tmp_path / "a", 2, 0)
    assert main(["eval", "fid", "--samples", str(a), "--ref", str(a), "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert inc.WEIGHTS_URL in err and "Traceback" not in err


def test_help_says_where_the_weights_come_from(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "fid", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert inc.WEIGHTS_NAME in text and "FAE_INCEPTION_WEIGHTS" in text and "hub" in text


def test_stats_then_gen_in_encoder_space(tmp_path: Path, tiny_encoder_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ref_imgs, samples = write_images(tmp_path / "ref", 12, 2), write_images(tmp_path / "smp", 10, 3)
    network = ["--network", f"encoder:{tiny_encoder_dir}", "--device", "cpu", "--no-cache", "--no-progress"]
    assert main(["eval", "stats", "--images", str(ref_imgs), "--out", str(tmp_path / "ref.npz"),
                 "--keep-images", "4", *network]) == 0
    with np.load(tmp_path / "ref.npz") as data:
        assert data["arr_0"].shape == (4, 16, 16, 3) and data["mu"].shape == (32,) and "mu_s" not in data.files
    assert main(["eval", "gen", "--samples", str(samples), "--ref", str(tmp_path / "ref.npz"), "--out",
                 str(tmp_path / "g.json"), *network]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    # no logits / spatial in an encoder's space, and its Fréchet distance is no FID
    assert set(report["metrics"]) == {"fd_encoder", "precision", "recall"}
    assert "fd_encoder" in capsys.readouterr().out   # the printed table names it too
    assert report["feature_network"]["name"].startswith("encoder:dinov2:")
    assert report["inputs"]["reference"]["origin"] == "fae-stats"
    capsys.readouterr()
    assert main(["eval", "gen", "--samples", str(samples), "--ref", str(ref_imgs), "--metrics", "is", *network]) == 1
    assert "cannot give" in capsys.readouterr().err


def test_rfid_command_psnr_ssim(tmp_path: Path) -> None:
    a = write_images(tmp_path / "a", 3, 0)
    assert main(["eval", "rfid", "--originals", str(a), "--reconstructions", str(a), "--no-rfid",
                 "--out", str(tmp_path / "r.json")]) == 0
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert metrics == {"psnr": 100.0, "ssim": pytest.approx(1.0)}


@pytest.mark.margin
def test_probe_raw_recon_latent(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    from tiny import tiny_fae_config

    from fae.data.idx import FASHION_MNIST_DIR
    from fae.encoders import EncoderConfig, FrozenEncoder
    from fae.models.autoencoder import FeatureAutoEncoder

    if not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST (apt-get install dataset-fashion-mnist) is not installed")
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir)))
    cfg = tiny_fae_config(encoder_head_dim=16)
    bundle = FeatureAutoEncoder(cfg).save_pretrained(tmp_path / "fae", extra={"encoder": encoder.reference()})
    assert main(["eval", "probe", "--fae", str(bundle), "--train-limit", "300", "--test-limit", "100",
                 "--epochs", "2", "--lrs", "0.1", "1.0", "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((tmp_path / "fae.probe.json").read_text())   # default: beside the bundle
    assert set(report["metrics"]) == {"top1_raw", "top1_recon", "top1_latent"}
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    within("probe top-1 on raw features", report["metrics"]["top1_raw"], lo=0.3)  # 10 classes: chance is 0.1
    assert [row["input"].split(":")[0] for row in report["table"]] == ["x", "x̂", "z"]
    assert report["inputs"]["num_train"] == 300 and report["num_samples"] == 100


def test_eval_under_torchrun_splits_the_features_and_gives_the_one_process_score(tmp_path: Path,
                                                                                  tiny_encoder_dir: Path) -> None:
    import subprocess
    import sys

    ref_imgs, samples = write_images(tmp_path / "ref", 12, 2), write_images(tmp_path / "smp", 11, 3)
    args = ["eval", "fid", "--samples", str(samples), "--ref", str(ref_imgs), "--network", f"encoder:{tiny_encoder_dir}",
            "--device", "cpu", "--no-cache", "--no-progress", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    env = subprocess_env(OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fae.cli", *args, "--out", str(tmp_path / "two.json")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report:") == 1   # one process writes and prints
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["num_samples"] == one["num_samples"] == 11
    assert abs(two["metrics"]["fd_encoder"] - one["metrics"]["fd_encoder"]) < 1e-6 * max(1.0, one["metrics"]["fd_encoder"])


def test_eval_is_command(tmp_path, one_thread):
    weights = tmp_path / "inception.pth"
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "samples.npz", images.permute(0, 2, 3, 1).numpy())
    # a random Inception often predicts one class for all four noise images (IS 1.0000x for some seeds): take the
    # first draw whose IS is clearly above 1, so that the split and the resize change the score
    net = FIDInceptionV3(resize="tf1")
    for draw in range(20):
        state = random_inception_state(draw)
        state["fc.weight"] *= 100  # sharper predictions
        net.load_state_dict(state)
        if inception_score(net(images)["logits"], splits=1)[0] > 1.01:
            break
    torch.save(state, weights)
    logits = {}
    for resize in ("tf1", "pytorch"):
        net = FIDInceptionV3(resize=resize)
        net.load_state_dict(state)
        logits[resize] = net(images)["logits"]
    common = ["--samples", str(tmp_path / "samples.npz"), "--inception-weights", str(weights), "--cache-dir",
              str(tmp_path / "cache"), "--no-progress"]

    def run(*args: str) -> dict:
        out = tmp_path / f"report{len(list(tmp_path.glob('report*')))}.json"
        assert main(["eval", *args, *common, "--out", str(out)]) == 0
        return json.loads(out.read_text())["metrics"]

    assert run("is", "--splits", "2")["is"] == pytest.approx(inception_score(logits["tf1"], splits=2)[0], rel=1e-5)
    by_size = inception_score(logits["pytorch"], split_size=3)
    assert by_size != pytest.approx(inception_score(logits["pytorch"], splits=2))
    got = run("is", "--split-size", "3", "--network", "inception:pytorch")
    assert (got["is"], got["is_std"]) == pytest.approx(by_size, rel=1e-5)
    assert inception_score(logits["tf1"], splits=1)[0] != pytest.approx(inception_score(logits["pytorch"], splits=1)[0])
    assert inception_score(logits["tf1"], splits=1)[0] > 1.01  # not the constant-prediction IS of 1
    got = run("gen", "--ref", str(tmp_path / "samples.npz"), "--metrics", "is", "--is-split-size", "3")
    assert got["is"] == pytest.approx(inception_score(logits["tf1"], split_size=3)[0], rel=1e-5)
    assert not math.isnan(got["is"])
