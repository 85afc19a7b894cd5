"""Evaluation on a user's own labelled image folder (`root/{train,test}/<class>/*.png`, colour clip-art of mixed sizes):
reference statistics at the training crop and size (`fae eval stats --data FOLDER --image-size N`), the Fréchet
distance named after the space it was measured in, a one-line refusal of mixed sizes, and a colour judge
(`fae train judge`) whose bundle loads and scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from margins import within
from PIL import Image

from fae.cli import main
from fae.data import DataConfig, center_crop_arr
from fae.io import read_bundle_config
from fae.metrics.features import dataset_source
from fae.metrics.judge import SmallCNN, class_agreement, default_channels, train_classifier

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples")

SIZES = [(20, 20), (28, 20), (24, 32), (18, 26)]          # (width, height): every split holds several sizes
COLOURS = {"blue": (0, 0, 255), "red": (255, 0, 0)}       # equal grey (85): only colour tells the classes apart


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest.one_thread)."""


def clip_art(i: int, colour: tuple[int, int, int]) -> Image.Image:
    """Image i: a coloured square on white, its size and place drawn from i alone, so image i of every class has
    the same shape (and the same grey picture)."""
    rng = np.random.default_rng(i)
    w, h = SIZES[i % len(SIZES)]
    arr = np.full((h, w, 3), 255, np.uint8)
    side = int(rng.integers(6, 11))
    top, left = (h - side) // 2 + int(rng.integers(-2, 3)), (w - side) // 2 + int(rng.integers(-2, 3))
    arr[top:top + side, left:left + side] = colour
    return Image.fromarray(arr)


def labelled_folder(root: Path, counts: dict[str, int]) -> Path:
    for split, n in counts.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                clip_art(i + (1000 if split == "test" else 0), colour).save(root / split / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return labelled_folder(tmp_path_factory.mktemp("clipart") / "root", {"train": 20, "test": 6})


def test_stats_from_a_folder_at_the_training_size_then_fd_in_encoder_space(
        folder: Path, tiny_encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    network = ["--network", f"encoder:{tiny_encoder_dir}", "--device", "cpu", "--no-cache", "--no-progress"]
    stats = tmp_path / "stats.npz"
    assert main(["eval", "stats", "--data", str(folder), "--image-size", "16", "--out", str(stats), *network]) == 0
    with np.load(stats) as data:   # the test split (default), centre-cropped to 16 px as training crops it
        kept = data["arr_0"]
        meta = json.loads(str(data["fae_meta"][()]))
    first = sorted((folder / "test" / "blue").iterdir())[0]
    assert kept.shape == (12, 16, 16, 3) and meta["num_samples"] == 12
    np.testing.assert_array_equal(kept[0], center_crop_arr(Image.open(first).convert("RGB"), 16))
    assert meta["source"]["split"] == "test" and meta["source"]["data"]["image_size"] == 16
    # the reference images against their own statistics: 0, under the encoder space's name
    capsys.readouterr()
    assert main(["eval", "fid", "--samples", str(folder / "test"), "--image-size", "16", "--ref", str(stats),
                 "--out", str(tmp_path / "self.json"), *network]) == 0
    assert "fd_encoder" in capsys.readouterr().out
    self_fd = json.loads((tmp_path / "self.json").read_text())["metrics"]
    assert self_fd == {"fd_encoder": pytest.approx(0.0, abs=1e-6)}
    # samples as an .npz at 16 px (here: the train split): a finite, positive distance, and no "fid" anywhere
    train = np.concatenate([b.permute(0, 2, 3, 1).numpy()
                            for b in dataset_source(DataConfig(kind="image_folder", root=str(folder),
                                                               image_size=16), "train").batches(16)])
    np.savez(tmp_path / "samples.npz", arr_0=train)
    assert main(["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(stats),
                 "--out", str(tmp_path / "fd.json"), *network]) == 0
    report = json.loads((tmp_path / "fd.json").read_text())
    assert set(report["metrics"]) == {"fd_encoder"} and 0 < report["metrics"]["fd_encoder"] < float("inf")
    assert "fid" not in report["protocol"] and report["protocol"]["metrics"] == ["fd_encoder"]


def test_mixed_sizes_without_image_size_is_a_one_line_error(folder: Path, tiny_encoder_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    network = ["--network", f"encoder:{tiny_encoder_dir}", "--device", "cpu", "--no-cache", "--no-progress"]
    capsys.readouterr()
    assert main(["eval", "fid", "--samples", str(folder / "test"), "--ref", str(folder / "train"), *network]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("fae: error: ")
    line = err.splitlines()[0]
    assert "000.png is 20x20" in line and "001.png is 28x20" in line   # two files, two sizes
    assert f"fae eval stats --data {folder / 'test'} --image-size N" in line
    # a folder given to --data needs the size training crops to
    assert main(["eval", "stats", "--data", str(folder), "--out", "x.npz", *network]) == 1
    assert "needs --image-size" in capsys.readouterr().err


def test_train_judge_on_the_folder_gives_a_colour_judge_that_loads_and_scores(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "judge"
    assert main(["train", "judge", "--data", str(folder), "--image-size", "16", "--out", str(out), "--epochs", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    record = read_bundle_config(out)
    assert record["config"]["in_channels"] == 3 and record["key"]["channels"] == "colour"   # default for folders
    assert record["class_names"] == ["blue", "red"] and record["test_split"] == "test" and record["test_images"] == 12
    assert f"test accuracy: {record['test_accuracy']:.4f} on 12 images" in printed
    judge = SmallCNN.from_pretrained(out)
    test = [b for b in dataset_source(DataConfig(kind="image_folder", root=str(folder), image_size=16),
                                      "test").batches(64)][0]
    labels = torch.tensor([0] * 6 + [1] * 6)
    # the bundle scores uint8 (N,H,W,3) samples as `fae eval generator --judge` and eval.judge pass them
    scored = class_agreement(judge, test.permute(0, 2, 3, 1).numpy(), labels)
    assert scored["agreement"] == pytest.approx(record["test_accuracy"]) and scored["num_images"] == 12


@pytest.mark.margin
def test_a_colour_judge_sees_colour_and_a_grey_one_cannot(folder: Path, tmp_path: Path) -> None:
    data = DataConfig(kind="image_folder", root=str(folder), image_size=16)
    assert default_channels(data) == "colour" and default_channels(DataConfig(kind="fashion_mnist")) == "grey"
    colour = train_classifier(data, tmp_path / "colour", epochs=4, batch_size=8, progress=False)
    grey = train_classifier(data, tmp_path / "grey", epochs=4, batch_size=8, progress=False, channels="grey")
    assert colour.config.in_channels == 3 and grey.config.in_channels == 1
    within("colour judge: test accuracy on red vs blue", read_bundle_config(tmp_path / "colour")["test_accuracy"],
           lo=0.85)
    # image i of each class has the same grey picture: a grey judge gives both the same class, half are right
    assert read_bundle_config(tmp_path / "grey")["test_accuracy"] == 0.5


def test_a_folder_without_a_test_split_holds_out_every_tenth_training_image(folder: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "judge", "--data", str(folder / "train"), "--image-size", "16", "--out",
                 str(tmp_path / "j"), "--epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    record = read_bundle_config(tmp_path / "j")
    assert record["test_split"].startswith("held out: every 10th") and record["test_images"] == 4   # 40 images
    assert "held out" in capsys.readouterr().out


def test_judge_and_probe_command_lines_say_what_they_take(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "judge", "--out", "unused"]) == 1   # neither --config nor --data
    assert "--config CONFIG" in capsys.readouterr().err
    assert main(["train", "judge", "--data", str(folder), "--out", "unused"]) == 1
    assert "needs --image-size" in capsys.readouterr().err
    assert main(["train", "fae", "--config", "x.yaml", "--channels", "grey"]) == 1   # a stage takes no judge options
    assert "only for `fae train judge`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RUN/fae/" in text and "export" not in text   # where `fae train fae --out RUN` keeps the bundle


def test_statistics_follow_the_encoder_weights_not_its_folder(folder: Path, tiny_encoder_dir: Path,
                                                              tmp_path: Path) -> None:
    """Statistics made with the frozen encoder in one folder serve the same weights loaded from another (a pipeline's
    copy of it); other weights recompute from the stored images."""
    import shutil

    from fae.encoders import save_tiny_encoder
    from fae.metrics.networks import build_network
    from fae.metrics.reference import load_reference

    stats = tmp_path / "stats.npz"
    assert main(["eval", "stats", "--data", str(folder), "--image-size", "16", "--network", f"encoder:{tiny_encoder_dir}",
                 "--out", str(stats), "--no-cache", "--no-progress"]) == 0
    copy = shutil.copytree(tiny_encoder_dir, tmp_path / "copy")
    reused = load_reference(stats, build_network(f"encoder:{copy}"))
    assert reused.origin == "fae-stats" and not reused.notes
    other = save_tiny_encoder("dinov2", tmp_path / "other", hidden_size=32, num_layers=1, num_heads=2, patch_size=4,
                              image_size=16, seed=1)
    recomputed = load_reference(stats, build_network(f"encoder:{other}"))
    assert recomputed.origin == "images" and "recomputed" in recomputed.notes[0]
