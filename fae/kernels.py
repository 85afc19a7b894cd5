"""Kernels chosen by measuring this machine, never by assuming it.

Where two kernels compute the same thing and which one is faster depends on the CPU (vendor, ISA, library build),
fae times both the first time it meets a size class and uses the faster:

    linear       an fp32 CPU matrix product of a Linear, each of forward, grad input and grad weight on its own:
                 oneDNN or ATen (MKL's sgemm). MKL runs its AVX2 kernels on AMD CPUs, AVX-512 ones on Intel, so
                 oneDNN wins on one vendor and loses on the other (docs/benchmarks.md, issue 26).
    linear_gelu  inference linear + tanh-GELU: one oneDNN primitive, or fae's linear then its GELU in place.
    gelu         fp32 tanh-GELU: ATen's kernel or four elementwise passes (its vectorised tanh is slow under AVX2).
    attention    CPU softmax attention: the fused SDPA kernel or matmul-softmax, per dtype and with/without backward.
    cfg_batch    a guided evaluation on a CPU: conditional and unconditional halves as one batch or as two calls
                 (fae.transport.GuidedVelocity), per model, dtype and batch.
    batch_split  a CPU model call (inference, or forward and backward) as one batch on all threads, or split into one
                 part per thread, the parts at once (fae.threads), per model, dtype, batch, thread count and with or
                 without backward. Timed in wall-clock time (the point is several threads at once), outside the
                 lock: the parts meet size classes of their own.

Timing follows fae.precision's bf16 probe: one thread, the thread's CPU time, the best of a few interleaved runs,
so a busy machine cannot tip a verdict. Verdicts are kept per process and on disk per machine
(`<fae.io.cache_root()>/kernels/<fingerprint>.json`, written under a file lock), so the processes of one machine
(the ranks of a run, the two halves of an exactness test, a resumed run) compute with the same kernels. The
fingerprint holds the probes' version, the CPU model, torch's version and every variable that caps an ISA, so an emulated AVX2 run
never reads a native verdict. Products too small to time reliably use ATen (stock PyTorch).

Overrides (benchmarks, comparisons): FAE_LINEAR_BACKEND=onednn|aten|auto (linear, linear_gelu and gelu: `aten` is
stock PyTorch, `onednn` fae's own kernels everywhere), FAE_ATTENTION_BACKEND=sdpa|math|auto,
FAE_CFG_BATCH=concat|separate|auto, FAE_BATCH_SPLIT=split|whole|auto, FAE_KERNEL_CACHE=0 (measure in every process, keep nothing).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fae.io import cache_root

# variables that change which kernels a process may run (fingerprint of the on-disk verdicts)
_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                  "MKL_DEBUG_CPU_TYPE", "MKL_CBWR")
OVERRIDES = {"linear": "FAE_LINEAR_BACKEND", "linear_gelu": "FAE_LINEAR_BACKEND", "gelu": "FAE_LINEAR_BACKEND",
             "attention": "FAE_ATTENTION_BACKEND", "cfg_batch": "FAE_CFG_BATCH", "batch_split": "FAE_BATCH_SPLIT"}
# what each override value means for each kind (`aten` = stock PyTorch)
_FORCED = {"linear": {"onednn": "onednn", "aten": "aten"}, "linear_gelu": {"onednn": "onednn", "aten": "separate"},
           "gelu": {"onednn": "composed", "aten": "aten"},
           "attention": {"sdpa": "sdpa", "math": "math"}, "cfg_batch": {"concat": "concat", "separate": "separate"},
           "batch_split": {"split": "split", "whole": "whole"}}


# what the candidates of each kind are; bumped when a probe changes what it times, so that no machine keeps a
# verdict measured between other candidates (2: linear_gelu's `separate` became fae's own linear + GELU, issue 26)
PROBES_VERSION = 2


@dataclass(frozen=True)
class Verdict:
    """The kernel chosen for one size class, and why: `source` is measured (here), cached (an earlier process on
    this machine measured it), forced (an environment override) or small (too small to time: stock ATen)."""

    kind: str
    key: str
    choice: str
    source: str
    ms: dict[str, float]

    def describe(self) -> str:
        times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in self.ms.items())
        return f"{self.kind} {self.key}: {self.choice} ({self.source}{'; ' + times if times else ''})"


_verdicts: dict[tuple[str, str], Verdict] = {}


def measure(candidates: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` milliseconds of each candidate: one thread, the thread's CPU time, interleaved, after one
    warm-up call each (first calls pick and JIT kernels). Tests replace this function to fake a machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _best_of(candidates, repeats, time.thread_time)
    finally:
        torch.set_num_threads(threads)


def measure_wall(candidates: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """As `measure`, in wall-clock time on the caller's threads: for choices about several threads at once."""
    return _best_of(candidates, repeats, time.perf_counter)


def _best_of(candidates: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    for run in candidates.values():
        run()
    best = dict.fromkeys(candidates, math.inf)
    for _ in range(repeats):
        for name, run in candidates.items():
            start = clock()
            run()
            best[name] = min(best[name], clock() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def forced(kind: str) -> str | None:
    """The kernel an environment variable forces for `kind`, or None for `auto`; a bad value is an error."""
    variable = OVERRIDES[kind]
    value = os.environ.get(variable, "auto") or "auto"
    if value == "auto":
        return None
    if value not in _FORCED[kind]:
        raise ValueError(f"{variable} must be one of auto, {', '.join(_FORCED[kind])}; not {value!r}")
    return _FORCED[kind][value]


def choose(kind: str, key: str, candidates: Callable[[], dict[str, Callable[[], object]]],
           untimed: str | None = None, wall: bool = False) -> str:
    """The kernel for (`kind`, `key`): forced, known to this process, `untimed` (a class too small to time, noted
    as `small`), known to this machine, or measured now. `candidates` builds the timed calls (name -> call) only
    when a measurement is needed. `wall`: timed in wall-clock time on all threads (`measure_wall`) and outside the
    machine's lock, for candidates that run work on other threads (a worker meeting a size class of its own would
    wait for the lock its caller holds); a verdict another process stored meanwhile wins."""
    override = forced(kind)
    if override is not None:
        return override
    known = _verdicts.get((kind, key))
    if known is not None:
        return known.choice
    if untimed is not None:
        _verdicts[(kind, key)] = Verdict(kind, key, untimed, "small", {})
        return untimed
    measured: dict[str, float] | None = None
    with _machine_verdicts() as on_disk:
        stored = on_disk.get(f"{kind} {key}")
        if stored is None and not wall:
            stored = _store(on_disk, kind, key, measured := measure(candidates()))
    if stored is None:  # wall: timed outside the lock, then stored unless another process stored one meanwhile
        measured = measure_wall(candidates())
        with _machine_verdicts() as on_disk:
            stored = _store(on_disk, kind, key, measured)
    source = "measured" if stored["ms"] is measured else "cached"
    verdict = Verdict(kind, key, stored["choice"], source, stored["ms"])
    _verdicts[(kind, key)] = verdict
    return verdict.choice


def _store(table: dict[str, dict], kind: str, key: str, ms: dict[str, float]) -> dict:
    """The faster of `ms` as the machine's verdict for (`kind`, `key`), or the one already stored there."""
    return table.setdefault(f"{kind} {key}", {"choice": min(ms, key=ms.__getitem__), "ms": ms})


def verdicts() -> list[Verdict]:
    return list(_verdicts.values())


def summary() -> dict[str, object]:
    """What run.json and benchmark reports record: the overrides in force and every verdict with its timings."""
    return {"overrides": {variable: os.environ.get(variable, "auto") for variable in sorted(set(OVERRIDES.values()))},
            "fingerprint": fingerprint(), "verdicts": [asdict(v) for v in _verdicts.values()]}


def reset() -> None:
    """Forget this process's verdicts (tests); the machine's file stays."""
    _verdicts.clear()


def model_call(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, int]:
    """The size class of a model call on the batch `x` (the model's class and parameter count, the dtype it computes
    in under CPU autocast, the batch rounded up to a power of two, a sample's shape), and the parameter count."""
    params = sum(p.numel() for p in model.parameters())
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    key = (f"{type(model).__name__} {params} {str(dtype).removeprefix('torch.')} "
           f"{size_bucket(x.shape[0])}x{'x'.join(map(str, x.shape[1:]))}")
    return key, params


def size_bucket(rows: int) -> int:
    """Rows (tokens x batch) rounded up to a power of two: one verdict per bucket, not per batch size."""
    return 1 << max(0, rows - 1).bit_length()


def proc_field(table: str, field: str) -> str | None:
    """The first value of `field` in /proc/<table> (cpuinfo, meminfo, ...), read now; None where there is none."""
    with contextlib.suppress(OSError):
        for line in (Path("/proc") / table).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    return None


@functools.cache
def cpuinfo(field: str) -> str | None:
    """The first value of `field` (model name, vendor_id, ...) in /proc/cpuinfo, read once; None where there is
    none."""
    return proc_field("cpuinfo", field)


def _cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def fingerprint() -> str:
    """What the on-disk verdicts of this process hold for: the probes, CPU, torch, oneDNN, the ISA caps in force."""
    parts = [f"probes {PROBES_VERSION}", _cpu_model(), torch.__version__, torch.backends.cpu.get_cpu_capability(),
             str(torch.backends.mkldnn.is_available()),
             *(f"{v}={os.environ.get(v, '')}" for v in _ISA_VARIABLES)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


_held: dict[str, dict] | None = None  # the table while this process holds the machine's lock
_process_lock = threading.RLock()


@contextlib.contextmanager
def _machine_verdicts() -> Iterator[dict[str, dict]]:
    """The machine's verdicts, locked for the time of the block and written back (atomically) if it changed them;
    with FAE_KERNEL_CACHE=0, or where the cache folder cannot be written, a dict of this process only. Re-entrant:
    a measurement may run code that meets other size classes (a guided model call times its linears), and a second
    flock from the same process would wait for itself."""
    global _held
    with _process_lock:
        if _held is not None:
            yield _held
            return
        folder = cache_root() / "kernels"
        path = folder / f"{fingerprint()}.json"
        lock = None
        if os.environ.get("FAE_KERNEL_CACHE", "1") != "0":
            with contextlib.suppress(OSError):
                folder.mkdir(parents=True, exist_ok=True)
                lock = open(folder / f"{fingerprint()}.lock", "w")  # noqa: SIM115  # closed by the `with` below
        if lock is None:  # this process only
            _held = {}
            try:
                yield _held
            finally:
                _held = None
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process measuring the same class: wait, then read its verdict
            try:
                table = json.loads(path.read_text()) if path.exists() else {}
            except (OSError, ValueError):
                table = {}  # a damaged file is measured again, not trusted
            before, _held = dict(table), table
            try:
                yield table
            finally:
                _held = None
            if table != before:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
                os.replace(tmp, path)
