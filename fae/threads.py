"""Sample-parallel CPU inference: an inference batch split over the CPU's threads, each part through the whole
network on one thread, the parts at the same time.

PyTorch runs every op of a forward on all its threads in turn. The threads meet at the end of each op, the
elementwise ops between the matrix products are memory-bound and gain little from a second thread, and a product
on two threads reaches less than twice its one-thread rate (AMD EPYC, AVX2: 160 GFLOP/s against 2 x 86). With
the batch in parts, one per thread, one part's elementwise work overlaps another's products, and no op waits for
a barrier (issue 26: DiT-S nfe 5-9% faster on that CPU, docs/benchmarks.md).

Whether that wins depends on the CPU, the model and the batch, so it is measured like every kernel choice
(fae.kernels kind `batch_split`: `whole` or `split`), here in wall-clock time, since the point is several threads
at once, and kept per machine. FAE_BATCH_SPLIT=split|whole|auto overrides it. Each part is the same computation as
its rows of the whole batch (the linears of a smaller part may take another size class's verdict: fp32 rounding,
not the function).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fae import kernels

# calls of fewer parameters x samples than this are not timed (whole: a thread hand-off costs more than it saves)
SMALL_SPLIT = 1 << 26

_pool: tuple[int, int, concurrent.futures.ThreadPoolExecutor] | None = None  # (pid, threads, executor)
_pool_lock = threading.Lock()


def _executor(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """This process's workers, one intra-op thread each; made again after a fork (a child has no threads) or when
    the thread count changed."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[:2] != (os.getpid(), threads):
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fae-batch",
                                                             initializer=torch.set_num_threads, initargs=(1,))
            _pool = (os.getpid(), threads, executor)
        return _pool[2]


def splittable(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether `module`'s call on the batch `x` may be split: CPU inference (no autograd, eval mode: no label
    dropout draws), plain tensors (not traced or compiled), no dispatch or function mode in force (modes, such as
    FlopCounterMode, are per thread: the workers would run outside them), two threads or more and a sample for
    each. A kernel measurement that calls the model, as CFG batching's does, runs on one thread, so it never
    splits: no worker waits for the machine's verdicts while its caller holds them."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and not module.training
            and type(x) is torch.Tensor and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled() and torch.get_num_threads() >= 2 and x.shape[0] >= 2)


def _part(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor], inference: bool,
          autocast: torch.dtype | None) -> torch.Tensor:
    """fn(*args) on a worker, in the caller's grad and autocast modes (both are per thread in PyTorch)."""
    mode = torch.inference_mode() if inference else torch.no_grad()
    cast = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with mode, cast:
        return fn(*args)


def _split(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor], threads: int) -> torch.Tensor:
    """fn over the batch in `threads` parts at once, the outputs concatenated in order."""
    parts = min(threads, args[0].shape[0])
    pieces = [a.tensor_split(parts) for a in args]
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    run = functools.partial(_part, fn, inference=torch.is_inference_mode_enabled(), autocast=autocast)
    executor = _executor(threads)
    try:
        futures = [executor.submit(run, [p[i] for p in pieces]) for i in range(parts)]
        concurrent.futures.wait(futures)  # every part done before an error is raised: none left running
        return torch.cat([f.result() for f in futures])
    finally:
        # a worker's torch.set_num_threads(1) also sets the count that threads started later begin with
        torch.set_num_threads(threads)


def batch_parallel(model: torch.nn.Module, fn: Callable[..., torch.Tensor],
                   args: Sequence[torch.Tensor]) -> torch.Tensor:
    """`fn(*args)`, a call of `model` with dim 0 of every tensor in `args` the batch (args[0] the input it is sized
    by): as one call, or split over this process's threads where this machine measured that faster for the model,
    dtype, batch class and thread count (parameters x samples below SMALL_SPLIT: not timed, whole). Call only where
    `splittable` holds."""
    threads = torch.get_num_threads()
    key, params = kernels.model_call(model, args[0])

    def candidates() -> dict[str, Callable[[], object]]:
        return {"whole": functools.partial(fn, *args), "split": functools.partial(_split, fn, args, threads)}
    choice = kernels.choose("batch_split", f"{key} threads {threads}", candidates,
                            untimed="whole" if params * args[0].shape[0] < SMALL_SPLIT else None, wall=True)
    return _split(fn, args, threads) if choice == "split" else fn(*args)
