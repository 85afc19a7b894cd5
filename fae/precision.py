"""Numeric precision, chosen from the hardware.

`auto` (the default everywhere a precision is chosen) means bf16 autocast where the device runs bf16 natively and
fp32 elsewhere. On CUDA that is `torch.cuda.is_bf16_supported()`. On a CPU the flags are not enough: oneDNN may
be capped below the CPU's ISA (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`), and a CPU without AVX-512 BF16 / AMX
runs bf16 matmuls 15-60x slower than fp32. So `auto` times one small matmul of each kind (one thread, CPU time,
once per process) and takes bf16 only when it is actually faster. An explicit `bf16` still runs where it is slow,
with one warning.
The environment variable FAE_PRECISION=fp32|bf16 overrides what `auto` picks (for benchmarks and comparisons).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# storage dtypes by name (weights, caches)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CpuMatmulTiming:
    fp32_ms: float
    bf16_ms: float

    @property
    def bf16_native(self) -> bool:
        return self.bf16_ms < self.fp32_ms

    def describe(self) -> str:
        return f"256x256 matmul: bf16 {self.bf16_ms:.2f} ms, fp32 {self.fp32_ms:.2f} ms"


@functools.cache
def cpu_matmul_timing(size: int = 256, repeats: int = 5) -> CpuMatmulTiming:
    """Best-of-`repeats` time of one size x size matmul in fp32 and in bf16 on this process's CPU settings. One
    thread and the thread's CPU time, interleaved: a busy machine that preempts the process cannot tip the choice."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # outside any autocast a caller may be in: under bf16 autocast the "fp32" product would run in bf16 too
    with torch.autocast("cpu", enabled=False):
        return _timed_matmuls(a, b, a16, b16, repeats, threads)


def _timed_matmuls(a: torch.Tensor, b: torch.Tensor, a16: torch.Tensor, b16: torch.Tensor, repeats: int,
                   threads: int) -> CpuMatmulTiming:
    try:
        a @ b, a16 @ b16  # warm-up: first calls pick and JIT kernels
        best = {"fp32": math.inf, "bf16": math.inf}
        for _ in range(repeats):
            for name, (x, y) in (("fp32", (a, b)), ("bf16", (a16, b16))):
                start = time.thread_time()
                x @ y
                best[name] = min(best[name], time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return CpuMatmulTiming(fp32_ms=best["fp32"] * 1e3, bf16_ms=best["bf16"] * 1e3)


def bf16_native(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` runs bf16 natively (fast), and the evidence in words."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'supports' if ok else 'does not support'} bf16"
    if device.type != "cpu":
        return False, f"no bf16 check for device type {device.type!r}"
    timing = cpu_matmul_timing()
    capability = torch.backends.cpu.get_cpu_capability()
    verdict = "native" if timing.bf16_native else "not native (emulated, slow)"
    return timing.bf16_native, f"CPU {capability}, bf16 {verdict}: {timing.describe()}"


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in: `name` is fp32 or bf16 (never auto); `reason` says why, for logs and reports."""

    name: Literal["fp32", "bf16"]
    requested: str
    device_type: str
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast, or autocast explicitly off (so an outer autocast cannot change fp32 code)."""
        if self.device_type == "meta":  # shapes only: there is no autocast to set
            return contextlib.nullcontext()
        if self.name == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return torch.autocast(self.device_type, enabled=False)

    def describe(self) -> str:
        how = "auto" if self.requested == "auto" else "requested"
        return f"{self.name} ({how}; {self.reason})"

    def as_dict(self) -> dict[str, str]:
        return {"precision": self.name, "requested": self.requested, "device": self.device_type,
                "reason": self.reason}


# fp32 backends that may silently compute in a lower precision (TF32 on Ampere/Hopper, bf16 in oneDNN)
_FP32_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
# the CUDA ones, which TF32 speeds up (matmuls and cuDNN convolutions / RNNs)
_CUDA_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn")


def _fp32_backends(paths: tuple[str, ...]) -> list[object]:
    """The torch.backends objects with an `fp32_precision` setting (torch >= 2.9's API) among `paths`."""
    found = []
    for path in paths:
        backend: object = torch.backends
        for part in path.split("."):
            backend = getattr(backend, part, None)
        if backend is not None and hasattr(backend, "fp32_precision"):
            found.append(backend)
    return found


@contextlib.contextmanager
def _fp32_precision(paths: tuple[str, ...], value: str, legacy_tf32: bool) -> Iterator[None]:
    """Set `fp32_precision = value` on the backends in `paths` inside, restoring each on exit. Torch before that
    API: the legacy TF32 flags (and the global matmul precision) instead. The two APIs are never mixed: torch
    refuses to read the legacy one after the new one was set."""
    backends = _fp32_backends(paths)
    saved = [(b, b.fp32_precision) for b in backends]  # type: ignore[attr-defined]  # torch >= 2.9 only
    legacy = None
    if not backends:
        legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = legacy_tf32
        torch.set_float32_matmul_precision("high" if legacy_tf32 else "highest")
    for backend in backends:
        backend.fp32_precision = value  # type: ignore[attr-defined]  # torch >= 2.9 only
    try:
        yield
    finally:
        for backend, old in saved:
            backend.fp32_precision = old  # type: ignore[attr-defined]  # torch >= 2.9 only
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy[:2]
            torch.set_float32_matmul_precision(legacy[2])


def strict_fp32() -> contextlib.AbstractContextManager:
    """fp32 computed as IEEE fp32 inside, whatever the process set (TF32 matmuls/convolutions on Ampere and Hopper
    GPUs, bf16 in oneDNN); the previous settings come back on exit. Feature extraction for FID runs under it, so
    statistics match references computed without TF32 (the ADM evaluator's)."""
    return _fp32_precision(_FP32_BACKENDS, "ieee", legacy_tf32=False)


def training_tf32(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The training policy (`train.tf32`), restored on exit: on a CUDA device, fp32 matmuls and cuDNN convolutions
    run as TF32 (`enabled`: ~8x the fp32 matmul rate on Ampere/Hopper tensor cores, 10-bit mantissa inputs with
    fp32 accumulation, which training tolerates) or as IEEE fp32. Elsewhere nothing changes: TF32 is a CUDA
    format. Metric feature extraction is never under it: it runs under `strict_fp32`, which wins inside."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return _fp32_precision(_CUDA_BACKENDS, "tf32" if enabled else "ieee", legacy_tf32=enabled)


_warned: set[str] = set()


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> PrecisionChoice:
    """Turn a configured precision (auto | fp32 | bf16) into the one this device will use."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {requested!r}")
    device = torch.device(device)
    wanted, source = requested, f"{requested} requested"
    forced = os.environ.get("FAE_PRECISION", "")
    if requested == "auto" and forced:
        if forced not in ("fp32", "bf16"):
            raise ValueError(f"FAE_PRECISION must be fp32 or bf16, not {forced!r}")
        wanted, source = forced, f"FAE_PRECISION={forced}"
    if wanted == "fp32":
        return PrecisionChoice("fp32", requested, device.type, source)
    native, evidence = bf16_native(device)
    if wanted == "auto":
        return PrecisionChoice("bf16" if native else "fp32", requested, device.type, evidence)
    if not native and evidence not in _warned:
        _warned.add(evidence)
        warnings.warn(f"precision bf16 ({source}), but bf16 is not native here ({evidence}); it will run many "
                      "times slower than fp32. Use precision auto or fp32.", stacklevel=2)
    return PrecisionChoice("bf16", requested, device.type, f"{source}; {evidence}")
