"""`fae data preview`: a data split as the model sees it, and what loading it meets.

`preview_data(cfg, out)` scans the split (every item, or the first `limit`), writes a grid of the first K*K
readable images after background and resize (`out`, a PNG; items drawn as training draws item i with seed i, so
flips and random crops show) and a JSON report beside it (`out` with .json): images, readable, dropped files,
modes converted, images with alpha, images whose content the background hides, resize outcome, huge images with
the slowest decodes, library warnings. Nothing is warned about while scanning: the report holds it all.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fae.data import DataConfig, build_dataset
from fae.data.images import DecodedImages
from fae.data.keys import flip_coin
from fae.data.loading import loader_options, num_items
from fae.data.pixels import LoadInfo
from fae.data.readable import item_name
from fae.data.tally import LoadTally
from fae.grid import draw_grid, to_uint8_hwc
from fae.io import atomic_write, atomic_write_text

RESIZE_VERBS = {"center_crop": "cropped", "pad": "padded", "squash": "squashed",
                "random_resized_crop": "random_cropped"}


class ItemJob(Dataset):
    """Runs `job(dataset, index)` for each index (in DataLoader workers when asked); an exception becomes
    {"index", "error"} so one bad file never stops a scan."""

    def __init__(self, dataset: Dataset, job: Callable[[Dataset, int], dict[str, Any]], indices: list[int]) -> None:
        self.dataset, self.job, self.indices = dataset, job, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        try:
            return {"index": index, **self.job(self.dataset, index)}
        except Exception as exc:  # PIL raises many types for bad files
            return {"index": index, "error": f"{type(exc).__name__}: {exc}"}


def _as_is(item: Any) -> Any:
    return item


def run_items(dataset: Dataset, job: Callable[[Dataset, int], dict[str, Any]], indices: list[int],
              workers: int = 0, progress: bool = True, desc: str = "images") -> Iterator[dict[str, Any]]:
    """`job` over `indices` of `dataset` in order, in `workers` processes, with a tqdm bar."""
    loader = DataLoader(ItemJob(dataset, job, indices), batch_size=None, shuffle=False, collate_fn=_as_is,
                        **loader_options(workers))
    yield from tqdm(loader, total=len(indices), desc=desc, disable=not progress)


class ViewJob:
    """One item's pixels as training draws item `index` with seed `index` (flip first, then any random crop) and
    what decoding met; pixels only for the first `keep` indices (the grid's)."""

    def __init__(self, keep: int, hflip: bool) -> None:
        self.keep, self.hflip = keep, hflip

    def __call__(self, dataset: Dataset, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        flip = flip_coin(generator)
        if isinstance(dataset, DecodedImages):
            arr, info = dataset.decode(index, generator)
        else:  # a data set without files (Fashion-MNIST): pixels only
            item = dataset[(index, index)]
            if item is None:
                raise ValueError("unreadable item")
            arr, info, flip = to_uint8_hwc(item["image"]), None, False   # the item is flipped already
        if self.hflip and flip:
            arr = arr[:, ::-1]
        return {"pixels": np.ascontiguousarray(arr) if index < self.keep else None, "info": info}


def _upscaled(info: LoadInfo, image_size: int, resize: str) -> bool:
    """Whether this image is enlarged on its way to image_size (its detail is thinner than the model's pixels)."""
    width, height = info.size
    side = {"pad": max(width, height), "squash": min(width, height)}.get(resize, min(width, height))
    return side < image_size


def preview_data(cfg: DataConfig, out: str | Path, split: str | None = None, limit: int | None = None,
                 grid: int = 8, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Scan `split` of `cfg`, write the grid PNG `out` and its JSON report (`out` with .json); return the report."""
    if grid < 1:
        raise ValueError(f"grid must be positive, not {grid}")
    out = Path(out)
    split = split or cfg.split
    dataset = build_dataset(cfg, split)
    count = num_items(dataset) if limit is None else min(limit, num_items(dataset))
    keep = 2 * grid * grid   # pixels kept for the grid, with room for dropped items among the first
    tally = LoadTally(warn=False)
    tiles: list[np.ndarray] = []
    upscaled = 0
    for result in run_items(dataset, ViewJob(keep, cfg.hflip), list(range(count)), workers, progress,
                            desc=f"preview {split}"):
        if "error" in result:
            tally.record_dropped(f"{item_name(dataset, result['index'])} ({result['error']})")
            continue
        info: LoadInfo | None = result["info"]
        if info is not None:
            tally.record(info)
            upscaled += _upscaled(info, cfg.image_size, cfg.resize)
        else:
            tally.images += 1
        if result["pixels"] is not None and len(tiles) < grid * grid:
            tiles.append(result["pixels"])
    report = {"root": cfg.root, "split": split, "kind": cfg.kind, "image_size": cfg.image_size, "resize": cfg.resize,
              "background": list(cfg.options().background), "huge_pixels": cfg.huge_pixels, **tally.summary()}
    verb = RESIZE_VERBS[cfg.resize]
    report["resized"] = {"mode": cfg.resize, verb: tally.images if verb == "random_cropped" else tally.non_square,
                         "non_square": tally.non_square, "upscaled": upscaled}
    report["grid"] = str(out) if tiles else None
    if tiles:
        rows = [tiles[i:i + grid] for i in range(0, len(tiles), grid)]
        image = draw_grid(rows, min_cell=64)
        atomic_write(out, lambda p: image.save(p, format="PNG"))
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for a person: what the JSON report says that needs attention."""
    modes = ", ".join(f"{m} {n}" for m, n in report["modes_converted"].items()) or "none"
    resized = report["resized"]
    verb = next(k for k in resized if k not in ("mode", "non_square", "upscaled"))
    lines = [f"{report['split']}: {report['readable']} of {report['images']} images readable "
             f"({report['dropped']['count']} dropped); converted modes: {modes}; with alpha: {report['with_alpha']}",
             f"resize {resized['mode']} to {report['image_size']} px: {resized[verb]} {verb.replace('_', ' ')}, "
             f"{resized['non_square']} not square, {resized['upscaled']} enlarged"]
    hidden = report["hidden_by_background"]
    if hidden["count"]:
        lines.append(f"hidden by background {report['background']}: {hidden['count']} (first: "
                     f"{hidden['files'][0]}); try data.background=black or white")
    empty = report["fully_transparent"]
    if empty["count"]:
        lines.append(f"fully transparent (empty on any background): {empty['count']} (first: {empty['files'][0]})")
    huge = report["huge"]
    if huge["count"]:
        slowest = huge["slowest"][0]
        lines.append(f"huge (> {report['huge_pixels']:,} px): {huge['count']}, slowest {slowest['file']} "
                     f"({slowest['seconds']:.2f} s); `fae data prepare` writes a copy at the training size")
    if report["library_warnings"]:
        lines.append("library warnings: " + ", ".join(f"{k} x{n}" for k, n in report["library_warnings"].items()))
    if report["dropped"]["count"]:
        lines.append(f"dropped (first): {report['dropped']['files'][0]}")
    return "\n".join(lines)
