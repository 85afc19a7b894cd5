"""Image loading a user can set and see: background compositing, hidden-content counting, the four resize modes,
the once-per-process tally, `fae data preview` and `fae data prepare` (fae.data.pixels / tally / preview / prepare)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fae.cli import main
from fae.config import ConfigError, from_dict
from fae.data import TALLY, DataConfig, ImageFolderDataset, LoadOptions, build_dataset, load_data_config
from fae.data.keys import flip_coin
from fae.data.pixels import center_crop_arr, fit_image, hidden_by_background, parse_background, to_rgb
from fae.data.prepare import prepare_data

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@pytest.fixture(autouse=True)
def _fresh_tally():
    TALLY.reset()   # the process tally warns once per kind: each test starts from none warned
    yield
    TALLY.reset()


def _line_art(size: int = 24) -> Image.Image:
    """A black cross drawn on a fully transparent square: dark line art as clip-art ships it."""
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    arr[size // 2 - 2:size // 2 + 2, :, 3] = 255
    arr[:, size // 2 - 2:size // 2 + 2, 3] = 255
    return Image.fromarray(arr, "RGBA")


def _rgb(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


# -- background -----------------------------------------------------------------------------------------------------

def test_alpha_is_composited_over_the_background_not_dropped():
    half_red = Image.new("RGBA", (2, 2), (255, 0, 0, 128))   # red at alpha 128/255
    on_white, has_alpha, _, _ = to_rgb(half_red, WHITE)
    on_black, _, _, _ = to_rgb(half_red, BLACK)
    assert has_alpha
    assert np.abs(np.asarray(on_white)[0, 0].astype(int) - [255, 127, 127]).max() <= 1
    assert np.abs(np.asarray(on_black)[0, 0].astype(int) - [128, 0, 0]).max() <= 1
    grey, has_alpha, hidden, empty = to_rgb(Image.new("L", (2, 2), 77), BLACK)   # no alpha: converted as before
    assert not has_alpha and not hidden and not empty and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]


def test_background_values_and_their_errors():
    assert parse_background("white") == WHITE and parse_background("black") == BLACK
    assert parse_background([1, 2, 3]) == (1, 2, 3)
    assert parse_background("10,20,30") == (10, 20, 30) and parse_background("#0a141e") == (10, 20, 30)
    for bad in ("grey", [1, 2], [0, 0, 256], "#12345", "1,2,x", [True, 0, 0]):
        with pytest.raises(ValueError, match="data.background"):
            parse_background(bad)
    cfg = from_dict(DataConfig, {"kind": "image_folder", "root": "x", "background": "255,0,0"}, "data")
    assert cfg.options().background == (255, 0, 0)
    with pytest.raises(ConfigError, match="data.background"):
        from_dict(DataConfig, {"kind": "image_folder", "root": "x", "background": "pink"}, "data")


def test_a_palette_image_with_transparency_loads_without_pillows_warning(tmp_path):
    p = Image.new("P", (8, 8))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putdata([0, 1] * 32)                              # index 0 fully transparent black, index 1 opaque red
    (tmp_path / "c").mkdir()
    p.save(tmp_path / "c" / "p.png", transparency=bytes([0, 255]))
    ds = ImageFolderDataset(tmp_path, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # Pillow's "Palette images with Transparency ..." would raise
        image = ds[0]["image"]
    assert image[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and image[:, 0, 1].tolist() == [1.0, 0.0, 0.0]
    assert TALLY.converted == {"P": 1} and TALLY.with_alpha == 1


# -- hidden content -------------------------------------------------------------------------------------------------

def test_black_line_art_is_hidden_on_black_and_visible_on_white():
    art = _line_art()
    assert hidden_by_background(art, BLACK)
    assert not hidden_by_background(art, WHITE)
    opaque_black = Image.new("RGBA", (24, 24), (0, 0, 0, 255))   # nothing see-through: the background shows nowhere
    assert not hidden_by_background(opaque_black, BLACK)
    big = _line_art(2000)                                        # sampled, not read whole: the same answer
    assert hidden_by_background(big, BLACK) and not hidden_by_background(big, WHITE)
    # nothing visible at all: empty on any background, counted apart and not as hidden
    clear = Image.new("RGBA", (24, 24), (0, 0, 0, 0))
    assert not hidden_by_background(clear, BLACK) and not hidden_by_background(clear, WHITE)
    assert to_rgb(clear, WHITE)[3] and not to_rgb(art, BLACK)[3]


def test_hidden_images_are_counted_and_warned_about_once(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "c").mkdir(exist_ok=True)
        _line_art().save(tmp_path / "c" / f"{name}.png")
    ds = ImageFolderDataset(tmp_path, 8, options=LoadOptions(background=BLACK))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds[0], ds[1]
    hidden = [w for w in caught if "hidden by the background" in str(w.message)]
    assert len(hidden) == 1 and "a.png" in str(hidden[0].message) and "fae data preview" in str(hidden[0].message)
    assert [Path(n).name for n in TALLY.hidden] == ["a.png", "b.png"]
    ds[(0, 1)], ds[1]                     # a later epoch: each image is counted (and tested) once per process
    assert TALLY.images == 2 and len(TALLY.hidden) == 2 and TALLY.with_alpha == 2
    on_white = ImageFolderDataset(tmp_path, 8)
    TALLY.reset()
    on_white[0]
    assert TALLY.hidden == [] and TALLY.with_alpha == 1


def test_library_warnings_while_opening_are_reported_once_with_a_count(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir()
    for name in ("a", "b", "c"):
        _rgb((40, 40), (0, 0, 255)).save(tmp_path / "c" / f"{name}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # 1600 px > 1000: Pillow's DecompressionBombWarning
    ds = ImageFolderDataset(tmp_path, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            ds[i]
    assert [type(w.message) for w in caught] == [RuntimeWarning]
    assert "DecompressionBombWarning" in str(caught[0].message)
    assert TALLY.library_warnings == {"DecompressionBombWarning": 3}


# -- resize modes ---------------------------------------------------------------------------------------------------

def test_pad_keeps_the_aspect_in_a_band_of_the_background():
    arr = fit_image(_rgb((40, 10), (255, 0, 0)), 16, LoadOptions(resize="pad"))
    assert arr.shape == (16, 16, 3)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 60)
    rows = np.flatnonzero(red.all(axis=1))
    assert rows.tolist() == [6, 7, 8, 9]                           # 40x10 -> 16x4, centred
    assert (arr[:6] == 255).all() and (arr[10:] == 255).all()      # white background above and below
    black = fit_image(_rgb((10, 40), (255, 0, 0)), 16, LoadOptions(resize="pad", background=BLACK))
    assert (black[:, :6] == 0).all() and (black[:, 10:] == 0).all()   # tall: the band is vertical, in the colour


def test_each_resize_mode_gives_the_training_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    for resize in ("center_crop", "pad", "squash", "random_resized_crop"):
        assert fit_image(image, 16, LoadOptions(resize=resize), g).shape == (16, 16, 3), resize
    squashed = fit_image(_rgb((40, 10), (0, 255, 0)), 16, LoadOptions(resize="squash"))
    assert (squashed == [0, 255, 0]).all()                         # all image, no background, aspect ignored
    with pytest.raises(ValueError, match="data.resize"):
        LoadOptions(resize="stretch")
    with pytest.raises(ConfigError, match="expected one of"):
        from_dict(DataConfig, {"kind": "image_folder", "root": "x", "resize": "stretch"}, "data")


def test_center_crop_of_an_image_at_the_training_size_is_lossless():
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(arr), 16), arr)
    for resize in ("pad", "squash"):
        assert np.array_equal(fit_image(Image.fromarray(arr), 16, LoadOptions(resize=resize)), arr), resize


def test_random_resized_crop_is_seeded_by_the_key_after_the_flip_draw(tmp_path):
    (tmp_path / "c").mkdir()
    source = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    source.save(tmp_path / "c" / "x.png")
    options = LoadOptions(resize="random_resized_crop")
    ds = ImageFolderDataset(tmp_path, 16, options=options)
    crops = [ds[(0, seed)]["image"] for seed in range(6)]
    assert torch.equal(crops[3], ds[(0, 3)]["image"])               # the same key, the same crop
    assert len({c.sum().item() for c in crops}) > 3                 # other seeds, other crops
    g = torch.Generator().manual_seed(3)
    flip_coin(g)                                                    # the item's first draw is the flip
    expected = fit_image(source, 16, options, g)
    assert np.array_equal(ds[(0, 3)]["image"].mul(255).round().byte().permute(1, 2, 0).numpy(), expected)
    centre = center_crop_arr(source, 16)                            # a plain index (eval, caches): the centre crop
    assert np.array_equal(ds[0]["image"].mul(255).round().byte().permute(1, 2, 0).numpy(), centre)


def test_a_random_crop_config_is_not_deterministic_and_refuses_a_feature_cache():
    cfg = DataConfig(kind="image_folder", root="x", resize="random_resized_crop")
    assert not cfg.deterministic and DataConfig(kind="image_folder", root="x", resize="pad").deterministic
    with pytest.raises(ConfigError, match="features: cache.*center_crop"):
        cfg.require_deterministic("features: cache")
    with pytest.raises(ConfigError, match="crop_scale"):
        from_dict(DataConfig, {"kind": "image_folder", "root": "x", "crop_scale": [0.8, 0.2]}, "data")
    with pytest.raises(ConfigError, match="data.fit"):
        from_dict(DataConfig, {"kind": "fashion_mnist", "resize": "pad"}, "data")


# -- preview and prepare --------------------------------------------------------------------------------------------

def _tiny_folder(root: Path) -> Path:
    """Two classes: RGBA line art, odd sizes, a grey image, one unreadable file and one 'huge' (60x50) image."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    _line_art(20).save(root / "cats" / "art.png")
    _rgb((31, 17), (200, 30, 30)).save(root / "cats" / "wide.png")
    Image.new("L", (9, 13), 90).save(root / "cats" / "grey.png")
    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(
        root / "dogs" / "big.jpg", quality=95)
    _rgb((12, 12), (10, 200, 10)).save(root / "dogs" / "square.png")
    return root


def _config(tmp_path: Path, root: Path, **data) -> Path:
    path = tmp_path / "stage.yaml"
    path.write_text(json.dumps({"stage": "fae", "data": {"kind": "image_folder", "root": str(root),
                                                         "image_size": 8, **data}}))
    return path


def test_preview_counts_a_tiny_folder(tmp_path, capsys):
    config = _config(tmp_path, _tiny_folder(tmp_path / "images"))
    out = tmp_path / "p.png"
    assert main(["data", "preview", str(config), "--out", str(out), "--grid", "2", "--no-progress",
                 "data.huge_pixels=2000", "background=black"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["images"] == 6 and report["readable"] == 5 and report["dropped"]["count"] == 1
    assert "broken.png" in report["dropped"]["files"][0]
    assert report["modes_converted"] == {"L": 1, "RGBA": 1} and report["with_alpha"] == 1
    assert [Path(f).name for f in report["hidden_by_background"]["files"]] == ["art.png"]   # black on black
    assert report["huge"]["count"] == 1 and Path(report["huge"]["slowest"][0]["file"]).name == "big.jpg"
    assert report["resized"] == {"mode": "center_crop", "cropped": 3, "non_square": 3, "upscaled": 0}
    assert Image.open(out).size[0] > 2 * 8                           # a 2x2 grid of the first images
    printed = capsys.readouterr().out
    assert "5 of 6 images readable" in printed and "hidden by background" in printed and "huge" in printed


def test_prepared_copy_reads_as_the_original_pipeline_and_resumes(tmp_path):
    source = _tiny_folder(tmp_path / "images")
    for resize in ("center_crop", "pad"):
        cfg = load_data_config(_config(tmp_path, source, resize=resize))
        out = tmp_path / f"prepared-{resize}"
        with pytest.warns(RuntimeWarning, match="unreadable"):
            original = build_dataset(cfg)
            expected = [original[i] for i in range(len(original))]
        record = prepare_data(cfg, out, progress=False)
        split = record["splits"]["train"]
        assert record["complete"] and split["written"] == 5 and split["dropped"]["count"] == 1
        copy = build_dataset(load_data_config(_config(tmp_path, out, resize=resize)))
        assert copy.root == out / "train" and copy.class_names == ["cats", "dogs"]
        got = {Path(p).stem: copy[i]["image"] for i, (p, _) in enumerate(copy.samples)}
        for (path, _), item in zip(original.samples, expected, strict=True):
            if item is not None:
                assert torch.equal(got[path.stem], item["image"]), (resize, path.name)
    (out / "train" / "cats" / "wide.png").unlink()                   # as if killed before this file
    again = prepare_data(cfg, out, progress=False)["splits"]["train"]
    assert again["written"] == 1 and again["already_there"] == 4


def test_a_prepared_copy_read_with_other_settings_is_refused(tmp_path):
    source = _tiny_folder(tmp_path / "images")
    (source / "dogs" / "broken.png").unlink()
    prepare_data(load_data_config(_config(tmp_path, source)), tmp_path / "prep", progress=False)
    with pytest.raises(ConfigError, match=r"image_size=8 \(this config: data.image_size=16\).*[Pp]repare again"):
        build_dataset(load_data_config(_config(tmp_path, tmp_path / "prep"), ["data.image_size=16"]))
    with pytest.raises(ConfigError, match="resize=center_crop"):
        build_dataset(load_data_config(_config(tmp_path, tmp_path / "prep", resize="squash")))
    with pytest.raises(ConfigError, match="choose another --out"):   # and the copy is never mixed with others
        prepare_data(load_data_config(_config(tmp_path, source, background="black")), tmp_path / "prep",
                     progress=False)


def test_a_class_with_no_readable_file_keeps_the_labels_of_the_prepared_copy(tmp_path):
    """The copy records the original class list: a class whose files were all unreadable does not shift the labels
    of the classes after it (they would then mean other classes than the generator's)."""
    source = _tiny_folder(tmp_path / "images")
    (source / "birds").mkdir()
    (source / "birds" / "broken.png").write_bytes(b"not a png")        # sorted between cats and dogs
    cfg = load_data_config(_config(tmp_path, source))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        original = build_dataset(cfg)
        labels = {p.stem: label for i, (p, label) in enumerate(original.samples) if original[i] is not None}
    assert original.class_names == ["birds", "cats", "dogs"] and labels["square"] == 2
    prepare_data(cfg, tmp_path / "prep", progress=False)
    copy = build_dataset(load_data_config(_config(tmp_path, tmp_path / "prep")))
    assert copy.class_names == ["birds", "cats", "dogs"]
    assert {p.stem: label for p, label in copy.samples} == labels
