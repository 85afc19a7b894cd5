"""How every fae DataLoader is set up: the training loop, `fae encode`, feature caches and evaluation passes.

- Workers (`num_workers > 0`) stay alive between passes (`persistent_workers`): a new epoch or a second pass does
  not pay the worker start-up again (imports, opening every shard's memory map).
- Each worker keeps `PREFETCH_BATCHES` batches ready, enough to hide a slow item (a large JPEG) behind the step.
- On CUDA, batches are collated into pinned (page-locked) memory, so the copy to the device can be asynchronous:
  callers copy with `non_blocking=True` and the host goes on preparing the next batch.
"""
from __future__ import annotations

from typing import Any

import torch

PREFETCH_BATCHES = 4


def loader_options(num_workers: int, device: torch.device | str | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments for `num_workers` worker processes feeding `device`."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, not {num_workers}")
    options: dict[str, Any] = {"num_workers": num_workers,
                               "pin_memory": device is not None and torch.device(device).type == "cuda"}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES)
    return options



def num_items(dataset: Any) -> int:
    """len() of a map-style data set: torch's `Dataset` type declares no __len__, though every fae data set has one
    (one place for the cast mypy needs, instead of one per call)."""
    return len(dataset)
