"""Unreadable items are dropped, never replaced.

A data set returns None for an item it cannot read (a corrupt, truncated or non-image file; it warns once and
counts it). Loaders collate with `collate_present`, which leaves such items out, so a batch is one item smaller
rather than holding a copy of a neighbour: the data set a run sees is the set of readable files, and caches and run
logs say how many were dropped.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, default_collate

from fae.data.loading import loader_options, num_items


def collate_present(items: list[Any]) -> Any | None:
    """Collate the items that could be read; None when none could."""
    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None


class WithIndex(Dataset):
    """`base` items (plain integer keys) with their index added, so a loader that drops unreadable items still
    knows where each row belongs."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return num_items(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.base[index]
        return None if item is None else {**item, "index": index}


def item_name(dataset: Any, index: int) -> str:
    """The file behind item `index` when the data set has files, else its index."""
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if isinstance(samples, list) else f"item {index}"


def readable_batches(dataset: Dataset, batch_size: int, num_workers: int = 0, device: Any = None) -> Iterator[Any]:
    """The data set in order, in batches of the items that could be read (for evaluation passes); `device` is where
    the batches go (pinned memory on CUDA, fae.data.loading)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_present,
                        **loader_options(num_workers, device))
    return (batch for batch in loader if batch is not None)
