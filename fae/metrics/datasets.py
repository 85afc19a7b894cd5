"""Which data set an evaluation reads: the `data:` block of a stage YAML, or an image folder, as a DataConfig.

`fae eval probe --config`, `fae eval stats --data` and `fae train judge` all read data this way, so each sees the
images exactly as the stage that trained on them did (`fae.data.build_dataset`: crop, size, fit and whatever the
DataConfig adds). Evaluation never augments: `hflip` is off.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fae.config import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")


def data_block(config_path: str | Path | None = None, kind: str | None = None, root: str | None = None,
               image_size: int | None = None, default_image_size: int | None = None,
               missing: Literal["error", "empty"] = "empty") -> dict[str, Any]:
    """The `data:` block of a stage YAML (or nothing), with the values given on the command line on top, unaugmented
    and without its `limit` (each caller sets its own). `missing`: a YAML without a `data:` block means the
    defaults ("empty") or is refused ("error")."""
    from fae.config import yaml_section

    data: dict[str, Any] = {}
    if config_path is not None:
        data = yaml_section(config_path, "data", missing=missing)
    data.update({k: v for k, v in {"kind": kind, "root": root, "image_size": image_size}.items() if v is not None})
    if default_image_size is not None:
        data.setdefault("image_size", default_image_size)
    data["hflip"] = False
    data.pop("limit", None)
    return data


def data_config(spec: str, image_size: int | None = None, limit: int | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The DataConfig a user names with `--data`: a stage YAML (its `data:` block; --image-size overrides its size),
    `fashion_mnist`, or an image folder (`root/{train,test}/<class>/*` or `root/<class>/*`; --image-size required,
    the size training crops to). `overrides`: `data.key=value` (or `key=value`) on top, as `fae train` takes them."""
    from fae.config import apply_overrides, from_dict, section_overrides
    from fae.data import DataConfig

    path = Path(spec).expanduser()
    if path.suffix in YAML_SUFFIXES:
        block = data_block(path, image_size=image_size, missing="error")
    elif spec == "fashion_mnist":
        block = data_block(kind="fashion_mnist", image_size=image_size)
    elif path.is_dir():
        if image_size is None:
            raise ConfigError(f"--data {spec}: an image folder needs --image-size N, the size training centre-crops "
                              "its images to (the `data.image_size` of the stage configs)")
        block = data_block(kind="image_folder", root=str(path), image_size=image_size)
    else:
        raise FileNotFoundError(f"--data {spec}: neither a stage YAML (.yaml), fashion_mnist, nor an image folder")
    block = apply_overrides(block, section_overrides(overrides, "data"))
    return from_dict(DataConfig, {**block, "limit": limit}, "data")   # checks every key and validates
