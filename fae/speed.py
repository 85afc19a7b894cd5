"""Speed switches: torch.compile and activation checkpointing (docs/speed.md says what each costs and gains).

- `compile: auto | on | off` (training: `train.compile`; sampling: `generate(compile=...)`). `auto` compiles on
  CUDA and not elsewhere: on a CPU, inductor's C++ compile costs a minute or two per graph and input shape, paid
  back only over hundreds of steps (docs/benchmarks.md). Modules are compiled in place (`nn.Module.compile`): the
  same object, the same state_dict keys, so checkpoints, EMA and bundles do not notice (`torch.compile(module)`
  would return a wrapper whose keys gain an `_orig_mod.` prefix).
- `activation_checkpointing` (training: `train.activation_checkpointing`): the large models (DiT, MMDiT, STARFlow,
  the FAE feature decoder, the pixel decoder) recompute each transformer block in backward instead of keeping its
  activations (fae.nn.run_block). The switch is a plain attribute, never a weight: state_dict keys do not change.

The TF32 policy is in fae.precision (`training_tf32`, `strict_fp32`).
"""
from __future__ import annotations

import warnings
from typing import Any, Literal, get_args

import torch
from torch import nn

from fae.nn import set_activation_checkpointing

CompileMode = Literal["auto", "on", "off"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def compile_wanted(mode: str, device: torch.device | str) -> bool:
    """Whether `mode` (auto | on | off) compiles on `device`: `auto` = on CUDA only."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {list(COMPILE_MODES)}, not {mode!r}")
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda")


def compile_in_place(module: nn.Module) -> nn.Module:
    """`module.compile()` once (a second call would wrap the compiled call again); returns `module`. Compilation
    itself happens at the first call, per input shape and grad/autocast mode."""
    if not is_compiled(module):
        module.compile()
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def prepare_training(raw: dict[str, nn.Module], called: dict[str, nn.Module], cfg: Any,
                     device: torch.device) -> dict[str, Any]:
    """The Trainer's one hook, after its modules are wrapped for data parallelism and their EMA copies made (so the
    copies stay plain). Activation checkpointing goes on the `raw` modules (it is their forward loop that reads
    it); compilation on the modules the stage `called` (the DDP wrapper when there is one: compiling the wrapper
    lets dynamo split graphs at DDP's gradient buckets, so communication overlaps the backward). Returns what was
    switched on, for run.json."""
    checkpointed = {}
    if cfg.activation_checkpointing:
        checkpointed = {name: set_activation_checkpointing(module, True) for name, module in raw.items()}
        if not any(checkpointed.values()):
            warnings.warn(f"train.activation_checkpointing: none of {', '.join(raw)} has checkpointed blocks (DiT, "
                          "MMDiT, STARFlow, the FAE and pixel decoders do); the run trains as before", stacklevel=2)
    compiled = compile_wanted(cfg.compile, device)
    if compiled:
        for module in called.values():
            compile_in_place(module)
    return {"compile": compiled, "compile_mode": cfg.compile,
            "activation_checkpointing": sorted(n for n, found in checkpointed.items() if found)}
