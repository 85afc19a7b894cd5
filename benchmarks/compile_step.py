"""torch.compile on vs off for one DiT training step (forward, flow-matching loss, backward, AdamW), side by side in
one process, plus activation checkpointing's cost. What `train.compile: auto` (off on CPU) rests on.

    python benchmarks/compile_step.py [--threads 2] [--size S] [--batch 16] [--repeats 5]

Prints the compile time (first step) and the median step time of each variant (timed round-robin), and their
ratios. Figures go to
docs/benchmarks.md with the date, the CPU capability and the precision (fp32 here: no autocast).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fae.models.dit import DiT, dit_config
from fae.nn import set_activation_checkpointing
from fae.transport import TransportConfig, flow_matching_loss


def make_step(model: DiT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    transport = TransportConfig(time_shift=0.4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = flow_matching_loss(model, x, y, transport)
        loss.backward()
        opt.step()
    return step


def first_call(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_medians(steps: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed round-robin so load changes on a shared machine hit all."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()  # type: ignore[operator]
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="S", help="DiT size of the registry (tiny, S, B, ...)")
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, fp32, "
          f"LightningDiT-{args.size}/1 on {args.grid}x{args.grid}x{args.channels}, batch {args.batch}")
    cfg = dit_config(f"LightningDiT-{args.size}/1", input_size=(args.grid, args.grid), in_channels=args.channels,
                     num_classes=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.grid, args.grid, generator=g)
    y = torch.randint(10, (args.batch,), generator=g)
    steps, firsts = {}, {}
    for name in ("eager", "checkpointed", "compiled"):
        torch.manual_seed(0)
        model = DiT(cfg).train()
        if name == "checkpointed":
            set_activation_checkpointing(model, True)
        if name == "compiled":
            torch._dynamo.reset()
            model.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[name] = make_step(model, opt, x, y)
        firsts[name] = first_call(steps[name])  # the compiled one compiles here
        steps[name]()                           # (a second warm-up: allocator, oneDNN primitive caches)
    medians = interleaved_medians(steps, args.repeats)
    for name in steps:
        print(f"{name:>12}: first step {firsts[name]:7.2f} s, then median {medians[name] * 1e3:8.1f} ms/step")
    for name in ("checkpointed", "compiled"):
        print(f"{name} / eager step time: {medians[name] / medians['eager']:.2f}x")

if __name__ == "__main__":
    main()
