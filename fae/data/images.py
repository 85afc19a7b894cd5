"""Image folders: ADM centre crop to the training size, optional horizontal flip, labels from sub-folders.

A corrupt or unreadable file never kills a run: the item is None (fae.data.readable), with a warning that names
the file, counted in `dataset.skipped`; loaders drop it, so it is never replaced by a copy of a neighbour.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fae.data.keys import check_index, flip_coin, split_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used by DiT/SiT/RAE): halve with BOX filtering while the short side
    is at least twice the target, resize with BICUBIC so the short side equals the target, then crop the centre.
    Returns uint8 HWC."""
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float (C,H,W) in [0,1]."""
    # np.array copies: arrays viewing a PIL image are read-only
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _is_image(path: Path, extensions: Sequence[str]) -> bool:
    return path.is_file() and path.suffix.lower() in extensions and not path.name.startswith(".")


class ImageFolderDataset(Dataset):
    """Images under `root`, labelled by sorted sub-folder name (`root/<class>/**/<file>`); a flat folder is one
    class. Files are sorted, so indices are stable across runs and machines."""

    def __init__(self, root: str | Path, image_size: int, hflip: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, limit: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, not {image_size}")
        self.image_size = image_size
        self.hflip = hflip
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        samples: list[tuple[Path, int]] = []
        names: list[str] = []
        for d in class_dirs:
            files = sorted(p for p in d.rglob("*") if _is_image(p, exts))
            if files:
                samples += [(p, len(names)) for p in files]
                names.append(d.name)
        if not samples:  # flat folder: a single unnamed class
            samples = [(p, 0) for p in sorted(self.root.iterdir()) if _is_image(p, exts)]
            names = [self.root.name]
        elif any(_is_image(p, exts) for p in self.root.iterdir()):
            warnings.warn(f"{self.root}: images directly in the root are ignored because class sub-folders exist",
                          RuntimeWarning, stacklevel=2)
        if not samples:
            raise FileNotFoundError(f"no images ({', '.join(exts)}) found in {self.root} or its sub-folders")
        if limit is not None and limit < len(samples):
            # evenly spaced over the sorted list, so every class keeps its share
            samples = [samples[i * len(samples) // limit] for i in range(limit)]
        self.samples = samples
        self.class_names = names
        self.skipped = 0  # corrupt files met by this process (DataLoader workers count their own)
        self._bad: set[int] = set()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def signature(self) -> dict[str, Any]:
        """What identifies this data set's content, for cache invalidation."""
        files = "\n".join(f"{p.relative_to(self.root)}\t{label}" for p, label in self.samples)
        return {"class": type(self).__name__, "root": str(self.root.resolve()), "image_size": self.image_size,
                "length": len(self), "files_sha1": hashlib.sha1(files.encode()).hexdigest()}

    def load(self, index: int) -> np.ndarray:
        """The centre-cropped uint8 HWC image of item `index` (raises on a corrupt file)."""
        path = self.samples[index][0]
        with Image.open(path) as img:
            img.load()
            return center_crop_arr(img.convert("RGB"), self.image_size)

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor] | None:
        index, generator = split_key(key)
        index = check_index(index, len(self), "ImageFolderDataset")
        try:
            arr = self.load(index)
        except Exception as exc:  # PIL raises many types for bad files; none may stop training
            if index not in self._bad:
                self._bad.add(index)
                self.skipped += 1
                warnings.warn(f"skipping unreadable image {self.samples[index][0]} ({type(exc).__name__}: {exc}); "
                              "it is dropped from the data set", RuntimeWarning, stacklevel=2)
            return None  # dropped by fae.data.readable.collate_present, never replaced by a neighbour
        image = to_tensor(arr)
        if self.hflip and flip_coin(generator):
            image = image.flip(-1)
        return {"image": image, "label": torch.tensor(self.samples[index][1], dtype=torch.int64)}
