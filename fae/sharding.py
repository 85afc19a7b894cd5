"""FSDP2 for the large generators: shard parameters, gradients, optimizer state and EMA over processes.

`shard(module)` applies `torch.distributed.fsdp.fully_shard` bottom-up: every element of every `nn.ModuleList` (the
transformer blocks: one block's weights are gathered at a time), then the module itself. Checkpoints of a sharded run
are written with torch.distributed.checkpoint (DCP): each process writes its own shards, and a resume on any number
of processes, one included, re-shards them (`save_state` / `load_state`). Both functions also work unsharded and
without a process group, so one checkpoint layout serves `train.fsdp: true` at every world size.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

DCP_FOLDER = "dcp"
__all__ = ["CheckpointException", "full_copy", "has_state", "load_state", "meta_copy", "save_state", "shard"]


def shard(module: nn.Module) -> nn.Module:
    """Shard `module` in place over the default process group (children of ModuleLists first, deepest first)."""
    from torch.distributed.fsdp import fully_shard

    lists = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.ModuleList)]
    units = [(f"{name}.{i}", block) for name, blocks in lists for i, block in enumerate(blocks)]
    for _, block in sorted(units, key=lambda item: -item[0].count(".")):  # FSDP2 wants inner units sharded first
        fully_shard(block)
    fully_shard(module)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def meta_copy(module: nn.Module) -> nn.Module:
    """A weightless copy of `module` (on the meta device) to receive the full weights of its sharded twin later."""
    return copy.deepcopy(module).to("meta")


def full_copy(sharded: nn.Module, shell: nn.Module, device: torch.device) -> nn.Module:
    """An ordinary module with the full weights of `sharded` on every process (a collective: all processes call)."""
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    module = copy.deepcopy(shell).to_empty(device=device)
    module.load_state_dict(state)
    return module


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """FSDP2's `no_sync`: skip the reduce-scatter on accumulation micro-batches that are not the last."""
    if is_sharded(module):
        module.set_requires_gradient_sync(sync)  # type: ignore[operator]  # FSDP2 adds it at runtime


def _state(container: nn.ModuleDict, ema_container: nn.ModuleDict,
           optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """The sharded (or, unsharded, plain) state of weights, EMA and optimizers, keyed `<module>.<parameter>`."""
    return {"model": get_model_state_dict(container), "ema": get_model_state_dict(ema_container),
            "optim": {g: get_optimizer_state_dict(container, opt) for g, opt in optimizers.items()}}


def save_state(folder: Path, modules: dict[str, nn.Module], ema: dict[str, nn.Module],
               optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Every process writes its shards under `folder/dcp` (all processes call; the folder must be shared)."""
    with warnings.catch_warnings():   # one process without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(nn.ModuleDict(modules), nn.ModuleDict(ema), optimizers), checkpoint_id=str(Path(folder) / DCP_FOLDER))


def load_state(folder: Path, modules: dict[str, nn.Module], ema: dict[str, nn.Module],
               optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Load what `save_state` wrote, re-sharded to the current processes (all processes call)."""
    container, ema_container = nn.ModuleDict(modules), nn.ModuleDict(ema)
    state = _state(container, ema_container, optimizers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(folder) / DCP_FOLDER))
    set_model_state_dict(container, state["model"])
    set_model_state_dict(ema_container, state["ema"])
    for group, opt in optimizers.items():
        set_optimizer_state_dict(container, opt, state["optim"][group])


def has_state(folder: Path) -> bool:
    return (Path(folder) / DCP_FOLDER).is_dir()
