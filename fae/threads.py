"""Sample-parallel CPU work: a batch split over the CPU's threads, each part through the whole network on one
thread, the parts at the same time; with autograd on, each part's backward runs on its thread too.

PyTorch runs every op of a forward (and of a backward) on all its threads in turn. The threads meet at the end of
each op, the elementwise ops between the matrix products are memory-bound and gain little from a second thread, and
a product on two threads reaches less than twice its one-thread rate (AMD EPYC, AVX2: 160 GFLOP/s against 2 x 86).
With the batch in parts, one per thread, one part's elementwise work overlaps another's products, and no op waits
for a barrier (issue 26: DiT-S nfe 3-10% and the train step 7-16% faster on that CPU, an MMDiT 13-20%;
docs/benchmarks.md). DiT and MMDiT take it.

Whether that wins depends on the CPU, the model, the batch and whether gradients are wanted, so it is measured like
every kernel choice (fae.kernels kind `batch_split`: `whole` or `split`), here in wall-clock time, since the point is
several threads at once, and kept per machine. FAE_BATCH_SPLIT=split|whole|auto overrides it. Each part is the same
computation as its rows of the whole batch (the linears of a smaller part may take another size class's verdict:
fp32 rounding, not the function); the parameters' gradients are the parts' gradients summed in part order, so a
split backward is as deterministic as a whole one.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fae import kernels

# calls of fewer parameters x samples than this are not timed (whole: a thread hand-off costs more than it saves)
SMALL_SPLIT = 1 << 26

_pool: tuple[int, int, concurrent.futures.ThreadPoolExecutor] | None = None  # (pid, threads, executor)
_pool_lock = threading.Lock()
R = TypeVar("R")


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
    """Whether `module`'s call on the batch `x` may be split: on a CPU, plain tensors (not traced or compiled), no
    dispatch or function mode in force (modes, such as FlopCounterMode, are per thread: the workers would run outside
    them), no module hook under `module` (a hook would see a part, on another thread), two threads or more and a
    sample for each. The caller splits only work that draws no random numbers (the workers would draw them in
    another order), so a DiT draws its label dropout before. A kernel measurement that calls the model, as CFG
    batching's does, runs on one thread, so it never splits: no worker waits for the machine's verdicts while its
    caller holds them."""
    return (x.device.type == "cpu" and type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled()
            and torch.get_num_threads() >= 2 and x.shape[0] >= 2 and not _hooked(module))


def _hooked(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as hooks  # the global hooks live there

    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


def _on_workers(jobs: Sequence[Callable[[], R]], threads: int) -> list[R]:
    """Each job on a worker at once, their results in order; every job done before an error is raised (none left
    running), and the caller's thread count as it was."""
    executor = _executor(threads)
    try:
        futures = [executor.submit(job) for job in jobs]
        concurrent.futures.wait(futures)
        return [f.result() for f in futures]
    finally:
        # a worker's torch.set_num_threads(1) also sets the count that threads started later begin with
        torch.set_num_threads(threads)


def _part(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor], grad: bool, inference: bool,
          autocast: torch.dtype | None) -> torch.Tensor:
    """fn(*args) on a worker, in the caller's grad and autocast modes (both are per thread in PyTorch)."""
    mode = torch.inference_mode() if inference else torch.enable_grad() if grad else torch.no_grad()
    cast = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with mode, cast:
        return fn(*args)


def _pieces(args: Sequence[torch.Tensor], threads: int) -> list[tuple[torch.Tensor, ...]]:
    """The batch in min(threads, batch) parts, each the tuple of every argument's rows."""
    count = min(threads, args[0].shape[0])
    return list(zip(*(a.tensor_split(count) for a in args), strict=True))


def _run_parts(fn: Callable[..., torch.Tensor], pieces: Sequence[Sequence[torch.Tensor]], threads: int,
               grad: bool = False) -> list[torch.Tensor]:
    """fn on each part at once, one output per part; with `grad`, each part records a graph of its own."""
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    run = functools.partial(_part, fn, grad=grad, inference=torch.is_inference_mode_enabled(), autocast=autocast)
    return _on_workers([functools.partial(run, piece) for piece in pieces], threads)


def _split(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor], threads: int) -> torch.Tensor:
    """fn over the batch in parts at once, the outputs concatenated in order (no autograd)."""
    return torch.cat(_run_parts(fn, _pieces(args, threads), threads))


class _SplitWithGrad(torch.autograd.Function):
    """fn over the batch in parts on the workers, under autograd: each part records its graph on its worker in
    forward and runs its backward there as well. The inputs' gradients are the parts' rows in order, the
    parameters' the parts' summed in part order (out of place: a part's gradient may be the very tensor it was
    given)."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., torch.Tensor], threads: int, count: int,
                *tensors: torch.Tensor) -> torch.Tensor:
        leaves = [[a.detach().requires_grad_(a.requires_grad) for a in piece]
                  for piece in _pieces(tensors[:count], threads)]
        outputs = _run_parts(fn, leaves, threads, grad=True)
        ctx.graphs = list(zip(leaves, outputs, strict=True))
        ctx.threads, ctx.count, ctx.params = threads, count, tensors[count:]
        return torch.cat([out.detach() for out in outputs])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.graphs is None:
            raise RuntimeError("backward through a batch split over the threads a second time: its parts' graphs "
                               "were freed by the first (pass retain_graph=True to it, or set FAE_BATCH_SPLIT=whole)")
        graphs = ctx.graphs
        keep = _keeps_graph()  # backward(retain_graph=True): the parts keep theirs too
        if not keep:
            ctx.graphs = None  # the parts' graphs go with this backward
        wanted = ctx.needs_input_grad[3:]
        params = [p for p, want in zip(ctx.params, wanted[ctx.count:], strict=True) if want]

        def part_grads(leaves: list[torch.Tensor], out: torch.Tensor, part: torch.Tensor) -> list:
            inputs = [leaf for leaf, want in zip(leaves, wanted, strict=False) if want]
            grads = torch.autograd.grad(out, inputs + params, part, retain_graph=keep, allow_unused=True)
            # an input the function did not use has zero gradient rows; an unused parameter keeps None
            return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=False)] + \
                list(grads[len(inputs):])
        results = _on_workers([functools.partial(part_grads, leaves, out, part) for (leaves, out), part
                               in zip(graphs, grad.tensor_split(len(graphs)), strict=True)], ctx.threads)
        del graphs
        columns = iter(zip(*results, strict=True))  # each wanted input's gradients, one per part
        grads: list[torch.Tensor | None] = []
        for i, want in enumerate(wanted):
            if not want:
                grads.append(None)
            elif i < ctx.count:
                grads.append(torch.cat(next(columns)))
            else:
                present = [g for g in next(columns) if g is not None]
                grads.append(functools.reduce(torch.add, present) if present else None)
        return (None, None, None, *grads)


def _keeps_graph() -> bool:
    """Whether the backward now running was asked to retain its graph (PyTorch exposes this only privately; where
    it is missing, a split's graph goes with its first backward)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(keep_graph()) if keep_graph is not None else False


def _gradient_copies(params: Sequence[torch.Tensor], parts: int) -> int:
    """Bytes a split backward holds beyond a whole one: every part but the first has its own gradient of each
    parameter until the parts' gradients are summed."""
    return (parts - 1) * sum(p.numel() * p.element_size() for p in params)


def _free_memory() -> int:
    """Bytes a process may still allocate on this machine (Linux's MemAvailable: free memory and the cache it can
    drop); where the OS does not say, no limit."""
    available = kernels.proc_field("meminfo", "MemAvailable")  # "123456 kB"
    with contextlib.suppress(ValueError, IndexError):
        if available is not None:
            return int(available.split()[0]) * 1024
    return 1 << 62


def _with_backward(call: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    """A timed call with its backward (the gradients returned, none accumulated into .grad)."""
    torch.autograd.grad(call().sum(), list(inputs), allow_unused=True)


def batch_parallel(model: torch.nn.Module, fn: Callable[..., torch.Tensor],
                   args: Sequence[torch.Tensor]) -> torch.Tensor:
    """`fn(*args)`, a call of `model` with dim 0 of every tensor in `args` the batch (args[0] the input it is sized
    by): as one call, or split over this process's threads where this machine measured that faster for the model,
    dtype, batch class, thread count and whether gradients are wanted (then timed with its backward; parameters x
    samples below SMALL_SPLIT: not timed, whole). `fn` draws no random numbers. Call only where `splittable`
    holds."""
    threads = torch.get_num_threads()
    key, params = kernels.model_call(model, args[0])
    trainable = [p for p in model.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    grad = bool(trainable) or (torch.is_grad_enabled() and any(a.requires_grad for a in args))
    if grad and _gradient_copies(trainable, min(threads, args[0].shape[0])) > _free_memory() // 4:
        return fn(*args)  # each part's gradients of every parameter at once would crowd this machine's memory

    def split(*batch: torch.Tensor) -> torch.Tensor:
        if grad:
            return _SplitWithGrad.apply(fn, threads, len(batch), *batch, *trainable)
        return _split(fn, batch, threads)

    def candidates() -> dict[str, Callable[[], object]]:
        if not grad:
            return {"whole": functools.partial(fn, *args), "split": functools.partial(split, *args)}
        # timed from leaves: a backward into the graph that made `args` would free it for the call itself
        leaves = [a.detach().requires_grad_(a.requires_grad) for a in args]
        inputs = [t for t in (*leaves, *trainable) if t.requires_grad]
        return {"whole": functools.partial(_with_backward, functools.partial(fn, *leaves), inputs),
                "split": functools.partial(_with_backward, functools.partial(split, *leaves), inputs)}
    choice = kernels.choose("batch_split", f"{key} threads {threads}" + (" backward" if grad else ""), candidates,
                            untimed="whole" if params * args[0].shape[0] < SMALL_SPLIT else None, wall=True)
    return split(*args) if choice == "split" else fn(*args)
