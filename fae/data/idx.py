"""Fashion-MNIST from the standard IDX files (Debian package `dataset-fashion-mnist`), as 3-channel images.

The 28x28 grey images are repeated to RGB and brought to `image_size` either by antialiased bilinear resize
(`fit="resize"`, any size) or by centred zero padding (`fit="pad"`, e.g. 28 -> 32 with 2 black pixels per side,
no interpolation blur; the background is black, so padding is invisible).
"""
from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fae.data.keys import check_index, flip_coin, split_key

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its magic number, rank and size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    rank = data[3]
    if ndim is not None and rank != ndim:
        raise ValueError(f"{path}: expected an IDX array of rank {ndim}, the header says rank {rank}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: header shape {shape} needs {expected} bytes of data, the file has "
                         f"{len(data) - header} (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {root / (stem + '.gz')} not found. Install it with "
                            "`apt-get install dataset-fashion-mnist`, or pass root= a folder holding the IDX files")


class FashionMNIST(Dataset):
    """Fashion-MNIST (60k train / 10k test, 10 classes) as {"image": (3,S,S) in [0,1], "label": int64}."""

    def __init__(self, root: str | Path | None = None, split: str = "train", image_size: int = 32,
                 hflip: bool = False, limit: int | None = None, fit: Literal["resize", "pad"] = "resize") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"Fashion-MNIST split must be train or test, not {split!r}")
        if fit not in ("resize", "pad"):
            raise ValueError(f"fit must be resize or pad, not {fit!r}")
        if image_size < 1 or (fit == "pad" and image_size < 28):
            raise ValueError(f"image_size {image_size} is too small" + (" to pad 28x28 into" if fit == "pad" else ""))
        self.root = Path(root) if root is not None else FASHION_MNIST_DIR
        prefix = "train" if split == "train" else "t10k"
        images_path = _find(self.root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(self.root, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise ValueError(f"{images_path}: expected uint8 28x28 images, got {images.dtype} {images.shape[1:]}")
        if len(labels) != len(images):
            raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise ValueError(f"{labels_path}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]  # the files are already class-shuffled
        self.images = torch.from_numpy(images.astype(np.uint8))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.split, self.image_size, self.hflip, self.fit = split, image_size, hflip, fit
        self.class_names = list(FASHION_MNIST_CLASSES)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def signature(self) -> dict[str, Any]:
        """What identifies this data set's content, for cache invalidation."""
        return {"class": type(self).__name__, "split": self.split, "image_size": self.image_size, "fit": self.fit,
                "length": len(self), "sha1": hashlib.sha1(self.images.numpy().tobytes()).hexdigest()}

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor]:
        index, generator = split_key(key)
        index = check_index(index, len(self), "FashionMNIST")
        x = self.images[index].float().div_(255.0)[None, None]  # (1,1,28,28)
        s = self.image_size
        if self.fit == "pad":
            before = (s - 28) // 2
            x = F.pad(x, (before, s - 28 - before, before, s - 28 - before))
        elif s != 28:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False).clamp_(0.0, 1.0)
        image = x[0].expand(3, s, s).contiguous()
        if self.hflip and flip_coin(generator):
            image = image.flip(-1)
        return {"image": image, "label": self.labels[index].clone()}
