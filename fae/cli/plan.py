"""`fae plan CONFIG --gpus N --gpu-memory GiB`: parse, then call fae.planning (profile, make_plan, format_plan)."""
from __future__ import annotations

import argparse
from typing import Any


def _cmd_plan(args: argparse.Namespace) -> int:
    from fae.planning import format_plan, make_plan, profile

    reserve = {} if args.reserve is None else {"reserve_gib": args.reserve}
    plan = make_plan(profile(args.config, args.overrides), args.gpus, args.gpu_memory, rate=args.rate, **reserve)
    print(format_plan(plan))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="memory per GPU of a training config, and the micro-batch and grad_accum that fit",
                       description="Count a training config's memory per GPU (meta device: nothing is trained or "
                       "downloaded) under DDP, DDP + activation checkpointing and FSDP2 + checkpointing; print the "
                       "largest micro-batch that fits --gpu-memory, the train.grad_accum that keeps the config's "
                       "global batch, and with --rate the time per optimizer step. docs/scaling.md says what is "
                       "counted.")
    p.add_argument("config", help="stage YAML, or the name of a paper config (e.g. dit_lightningdit_xl1)")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) in the run (default 1)")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GiB", help="memory of one GPU in GiB (e.g. 80)")
    p.add_argument("--reserve", type=float, metavar="GiB",
                   help="kept free for the CUDA context and allocator slack (default 2)")
    p.add_argument("--rate", type=float, metavar="IMAGES_PER_S_PER_GPU",
                   help="measured training images/s per GPU without checkpointing (the trainer's logged "
                   "images_per_s / GPUs): prints the time per optimizer step; checkpointing modes x 4/3")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size=256")
    p.set_defaults(func=_cmd_plan)
