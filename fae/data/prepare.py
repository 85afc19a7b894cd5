"""`fae data prepare`: a copy of an image folder at the training size, so a run decodes small PNGs, not the originals.

Every readable image, after background and resize, is saved as PNG (lossless) under
`OUT/<split>/<class>/<its relative name>.png` (a name two sources would share, e.g. a.jpg and a.png, keeps its old
extension: a.jpg.png), beside `OUT/fae_prepared.json`: the source folder, each split's file-list hash and counts,
the dropped files, and the settings baked into the pixels (image_size, resize, background). Reading the copy
(`data.root: OUT`) with other settings is refused (fae.data.images.check_prepared), since its pixels already carry
them; with the same settings a prepared image is at its final size, and the centre crop, pad and squash of an
image already image_size x image_size return it unchanged, so training sees exactly the original pipeline's pixels.

random_resized_crop draws a new crop at each use, so its copy keeps each image whole with its aspect, its short
side reduced to at most 2 * image_size (a crop of half the area still has about image_size pixels on its short
side); crops are drawn when the copy is read, close to but not bit-equal with crops of the original.

Each file is written atomically (temporary name, then rename), and the record first says `complete: false`: a
killed run loses nothing, and running the same command again skips the files already written.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from fae.config import ConfigError
from fae.data import DataConfig, image_folder_split
from fae.data.images import PREPARED_FILE, ImageFolderDataset, prepared_settings
from fae.data.pixels import prepared_image
from fae.data.preview import run_items
from fae.data.tally import LoadTally
from fae.io import atomic_write, atomic_write_text


def prepared_names(dataset: ImageFolderDataset) -> list[Path]:
    """Each sample's path in the copy, relative to the split folder: <class>/<relative name>.png."""
    out: list[Path] = []
    taken: set[Path] = set()
    for path, label in dataset.samples:
        rel = path.relative_to(dataset.root)
        if len(rel.parts) > 1:  # class sub-folder: the name inside it
            rel = Path(*rel.parts[1:])
        target = Path(dataset.class_names[label]) / rel.with_suffix(".png")
        if target in taken:
            target = target.with_name(rel.name + ".png")
        taken.add(target)
        out.append(target)
    return out


class PrepareJob:
    """Writes one item's prepared PNG unless it is there already; returns what decoding met."""

    def __init__(self, folder: Path, names: list[Path]) -> None:
        self.folder, self.names = folder, names

    def __call__(self, dataset: Dataset, index: int) -> dict[str, Any]:
        assert isinstance(dataset, ImageFolderDataset)
        target = self.folder / self.names[index]
        if target.is_file():
            return {"written": False, "info": None}
        rgb, info = dataset.decode_file(index)
        image = prepared_image(rgb, dataset.image_size, dataset.options)
        atomic_write(target, lambda p: image.save(p, format="PNG"))
        return {"written": True, "info": info}


def _start_record(cfg: DataConfig, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The record of `out` to continue: a fresh one, or the one there when it was made with the same settings."""
    record_file = out / PREPARED_FILE
    source = str(Path(cfg.root).resolve())  # type: ignore[arg-type]  # validate() requires root
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("settings") != settings or record.get("source") != source:
            raise ConfigError(f"{out} holds a copy of {record.get('source')} prepared with {record.get('settings')}; "
                              f"this config asks for {settings} from {source}: choose another --out, or delete "
                              f"{out} to prepare it again")
        return record
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no {PREPARED_FILE}: choose an empty or new --out folder")
    if Path(source) in out.resolve().parents or Path(source) == out.resolve():
        raise ConfigError(f"--out {out} lies inside the source folder {source}: choose a folder outside it")
    return {"format": 1, "source": source, "settings": settings, "complete": False, "splits": {}}


def _write_record(out: Path, record: dict[str, Any]) -> None:
    record["complete"] = all(s.get("complete") for s in record["splits"].values())
    atomic_write_text(out / PREPARED_FILE, json.dumps(record, indent=2) + "\n")


def prepare_data(cfg: DataConfig, out: str | Path, splits: Sequence[str] | None = None, workers: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Write the prepared copy of `cfg`'s image folder for `splits` (default: the config's split) into `out`;
    return its record (what fae_prepared.json holds). All files are prepared (data.limit does not apply)."""
    cfg.validate()
    if cfg.kind != "image_folder":
        raise ConfigError(f"fae data prepare copies image folders; data.kind is {cfg.kind}")
    out = Path(out)
    options = cfg.options()
    record = _start_record(cfg, out, prepared_settings(cfg.image_size, options))
    for split in splits or [cfg.split]:
        dataset = ImageFolderDataset(image_folder_split(cfg, split), cfg.image_size, options=options,
                                     tally=LoadTally(warn=False))
        names = prepared_names(dataset)
        record["splits"][split] = {"source": str(dataset.root.resolve()), "class_names": dataset.class_names,
                                   "files_sha1": dataset.signature()["files_sha1"], "complete": False}
        _write_record(out, record)
        tally = LoadTally(warn=False)
        written = 0
        for result in run_items(dataset, PrepareJob(out / split, names), list(range(len(dataset))), workers,
                                progress, desc=f"prepare {split}"):
            if "error" in result:
                tally.record_dropped(f"{dataset._name(result['index'])} ({result['error']})")
                continue
            written += result["written"]
            if result["info"] is not None:
                tally.record(result["info"])
        summary = tally.summary()
        record["splits"][split].update(
            images=len(dataset), written=written, already_there=len(dataset) - written - len(tally.dropped),
            dropped={"count": len(tally.dropped), "files": tally.dropped}, modes_converted=summary["modes_converted"],
            hidden_by_background=summary["hidden_by_background"],
            fully_transparent=summary["fully_transparent"], huge=summary["huge"], complete=True)
        _write_record(out, record)
    return record
