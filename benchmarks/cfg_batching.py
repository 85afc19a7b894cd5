"""Guided sampling: conditional and unconditional halves as one concatenated batch vs two calls.

    python benchmarks/cfg_batching.py [--threads 2] [--batch 64 256] [--bf16]

Times one guided velocity evaluation of a DiT (depth 6, width 384, 8x8x32 latents, the environment.md workload)
with `GuidedVelocity(batch="concat")` and `batch="separate"`; prints the median of several runs.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from fae.models.dit import DiT, DiTConfig
from fae.transport import GuidanceSchedule, GuidedVelocity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = DiT(DiTConfig(input_size=(8, 8), in_channels=32, hidden_size=384, depth=6, num_heads=6,
                          num_classes=10)).eval()
    guidance = GuidanceSchedule.constant(2.0)
    amp = torch.autocast("cpu", torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    for b in args.batch:
        x, y = torch.randn(b, 32, 8, 8), torch.arange(b) % 10
        row = []
        for mode in ("concat", "separate"):
            fn = GuidedVelocity(model, guidance, batch=mode)
            times = []
            with torch.no_grad(), amp:
                fn(x, 0.5, y)  # warm-up
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(x, 0.5, y)
                    times.append(time.perf_counter() - t0)
            row.append(f"{mode} {1000 * statistics.median(times):.0f} ms")
        print(f"batch {b} ({'bf16' if args.bf16 else 'fp32'}, {args.threads} threads): " + ", ".join(row))


if __name__ == "__main__":
    main()
