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


def item_labels(dataset: Any) -> list[int] | None:
    """Every item's class label without loading an image, when the data set keeps them (image folders, IDX sets,
    and the feature caches that wrap them); None otherwise."""
    if hasattr(dataset, "samples"):
        return [int(label) for _, label in dataset.samples]
    if isinstance(getattr(dataset, "labels", None), torch.Tensor):
        return dataset.labels.tolist()
    base = getattr(dataset, "base", None)
    return item_labels(base) if base is not None else None


def class_strided_indices(dataset: Any, count: int, seed: int) -> list[int]:
    """`count` item indices that visit the classes in turn (a seeded order within each class, a seeded class
    order), so a small subset of a class-sorted set such as ImageNet holds every class in proportion rather than
    the first class only. Without labels: the first `count` items of a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    length = len(dataset)
    labels = item_labels(dataset)
    if labels is None or len(labels) != length:
        return torch.randperm(length, generator=g)[:count].tolist()
    by_class: dict[int, list[int]] = {}
    for index in torch.randperm(length, generator=g).tolist():
        by_class.setdefault(labels[index], []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    queues = [queues[i] for i in torch.randperm(len(queues), generator=g).tolist()]
    picked: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        picked += [q[depth] for q in queues if depth < len(q)]
        if len(picked) >= count:
            break
    return picked[:count]
