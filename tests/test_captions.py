"""Caption data (fae/data/captions.py): folder pairs, JSONL/CSV manifests, webdataset shards; missing captions."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fae.data.captions import CaptionDataConfig, build_caption_dataset


def _png(colour: tuple[int, int, int]) -> Image.Image:
    return Image.fromarray(np.full((12, 16, 3), colour, dtype=np.uint8))


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (90, 90, 90)}


def test_folder_pairs_skip_and_count_missing_or_empty(tmp_path):
    for name, colour in COLOURS.items():
        _png(colour).save(tmp_path / f"{name}.png")
    (tmp_path / "red.txt").write_text("a  red\nsquare ")
    (tmp_path / "green.txt").write_text("a green square")
    (tmp_path / "blue.txt").write_text("   \n")               # empty: skipped; grey has no .txt at all
    with pytest.warns(RuntimeWarning, match="skipped 2 images"):
        ds = build_caption_dataset(CaptionDataConfig("folder", str(tmp_path), image_size=8))
    assert len(ds) == 2 and ds.skipped_captions == 2 and ds.captions == ["a green square", "a red square"]
    item = ds[1]
    assert item["image"].shape == (3, 8, 8) and item["caption"] == "a red square"
    assert item["image"][0].min() == 1.0 and item["image"][1].max() == 0.0   # the red image, centre-cropped
    (tmp_path / "red.png").write_bytes(b"not a png")   # an unreadable image is None, counted, never replaced
    with pytest.warns(RuntimeWarning, match="unreadable image"):
        assert ds[1] is None and ds.skipped == 1
    with pytest.raises(ValueError, match="blue.txt: missing or empty caption"):
        build_caption_dataset(CaptionDataConfig("folder", str(tmp_path), missing_captions="error"))


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_jsonl_and_csv(tmp_path, kind):
    (tmp_path / "img").mkdir()
    rows = []
    for name, colour in COLOURS.items():
        _png(colour).save(tmp_path / "img" / f"{name}.png")
        rows.append({"image": f"img/{name}.png", "caption": "" if name == "grey" else f"a {name} square"})
    path = tmp_path / f"captions.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    with pytest.warns(RuntimeWarning, match="skipped 1 images"):
        ds = build_caption_dataset(CaptionDataConfig("manifest", str(path), image_size=8))
    assert ds.captions == ["a red square", "a green square", "a blue square"] and ds.skipped_captions == 1
    assert ds[2]["image"][2].min() == 1.0
    with pytest.raises(ValueError, match=r"row 4 \(img/grey.png\): missing or empty caption"):
        build_caption_dataset(CaptionDataConfig("manifest", str(path), missing_captions="error"))


def test_webdataset_shards(tmp_path):
    import webdataset as wds

    names = list(COLOURS)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as sink:
            for name in names[2 * s: 2 * s + 2]:
                buf = io.BytesIO()
                _png(COLOURS[name]).save(buf, format="PNG")
                sample = {"__key__": f"{s}-{name}", "png": buf.getvalue()}
                if name != "grey":
                    sample["txt"] = f"a {name} square"
                sink.write(sample)
    with pytest.warns(RuntimeWarning, match="skipped 1"):
        ds = build_caption_dataset(CaptionDataConfig("webdataset", str(tmp_path / "shard-{000..001}.tar"),
                                                     image_size=8))
    assert ds.captions == ["a red square", "a green square", "a blue square"]
    assert ds[2]["image"][2].min() == 1.0 and ds[0]["image"][0].min() == 1.0   # across shards, in order
    with pytest.warns(RuntimeWarning):   # a folder of shards reads the same pairs
        assert len(build_caption_dataset(CaptionDataConfig("webdataset", str(tmp_path), image_size=8))) == 3
    with pytest.raises(ValueError, match="shard-001.tar:1-grey: missing or empty caption"):
        build_caption_dataset(CaptionDataConfig("webdataset", str(tmp_path), missing_captions="error"))
    with pytest.raises(FileNotFoundError, match="shard-002.tar does not exist"):
        build_caption_dataset(CaptionDataConfig("webdataset", str(tmp_path / "shard-{000..009}.tar")))
