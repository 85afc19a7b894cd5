"""torch.distributed helpers: the same code runs single-process and under `torchrun` (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist

from fae.config import ConfigError


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group if launched by torchrun; return (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(_destroy)  # an undestroyed gloo group can abort the process at exit ("terminate called ...")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world, resolve_device("auto")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device a `--device` / `device:` setting names; "auto" (or None) is this process's GPU (cuda:LOCAL_RANK,
    so under torchrun each process its own) where CUDA is available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
            torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r}: not a device name (cpu, cuda, cuda:1, auto, ...): {exc}") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices; use "
                          "--device cpu or auto")
    return chosen


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over processes (itself when not distributed)."""
    if not is_distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()


def shard_of(n: int) -> range:
    """This process's contiguous share of `n` items (rank 0 gets the first ones: a grid of "the first images" stays
    the same at any process count)."""
    r, w = rank(), world_size()
    return range(n * r // w, n * (r + 1) // w)


def merged(accumulators: dict[str, Any]) -> dict[str, Any]:
    """Each named accumulator (it has `merge(other)`) merged with every other process's of the same name, one
    collective for all; a name some process lacks (it had no data) is taken from those that have it."""
    if not is_distributed():
        return accumulators
    total: dict[str, Any] = {}
    for part in all_gather_objects(accumulators):
        for name, acc in part.items():
            if name in total:
                total[name].merge(acc)
            else:
                total[name] = acc
    return total
