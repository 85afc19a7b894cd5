"""Data keys: an int index, or an `(index, seed)` pair whose seed drives the item's augmentation."""
from __future__ import annotations

from typing import Any

import torch

DataKey = int | tuple[int, int]


def split_key(key: Any) -> tuple[int, torch.Generator | None]:
    """`index` -> (index, None); `(index, seed)` -> (index, a CPU generator seeded with seed)."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a data key is an index or an (index, seed) pair, got {key!r}")
        index, seed = int(key[0]), int(key[1])
        return index, torch.Generator().manual_seed(seed)
    if isinstance(key, torch.Tensor):
        key = key.item()
    return int(key), None


def flip_coin(generator: torch.Generator | None) -> bool:
    """Whether to flip this item horizontally: no generator (plain index) means never; else a fair coin, the
    generator's first draw. Every data set and cache uses this one function, so image and features agree."""
    if generator is None:
        return False
    return bool(torch.rand((), generator=generator) < 0.5)


def check_index(index: int, length: int, name: str) -> int:
    """`index` within [0, length), negative counting from the end; an IndexError naming the data set otherwise."""
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"{name}: index {index} out of range for {length} items")
    return index
