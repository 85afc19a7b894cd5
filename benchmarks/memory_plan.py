"""Expected GPU memory per process of every paper config, computed (nothing is trained): the table in docs/scaling.md.

    python benchmarks/memory_plan.py [--gpus 8 64] [--micro-batch N] [--configs NAME ...]
    python benchmarks/memory_plan.py --recipes 24 80     # docs/scaling.md's one-GPU recipes: every paper config

Per process, for a run of the config's global batch on `--gpus` processes without gradient accumulation (or at
`--micro-batch`). The accounting is the library's (fae.planning, which `fae plan CONFIG --gpus N --gpu-memory GiB`
prints for one config with the micro-batch and grad_accum that fit): training state, frozen networks, and the
activations autograd saves, counted on the meta device.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fae.planning import (  # noqa: E402
    MODE_NAMES,
    GiB,
    MemoryProfile,
    PlanError,
    format_plan,
    make_plan,
    profile,
    recommended,
    saved_bytes_per_sample,
)

PAPER = ROOT / "fae/configs/paper"

CONFIGS = ["fae_dinov2_g14", "pixel_decoder_dinov2_g14", "dit_lightningdit_xl1", "dit_sit_xl1",
           "flow_starflow_1p4b", "mmdit_cc12m", "fae_dinov2_g14_512", "pixel_decoder_dinov2_g14_512",
           "dit_lightningdit_xl1_512"]


def plan(config: str) -> dict[str, Any]:
    """One config's profile (fae.planning.profile) as a dict."""
    return dataclasses.asdict(profile(config))


def table(rows: list[dict[str, Any]], gpus: list[int], micro: int | None) -> str:
    """Per GPU count: the per-process batch, then GiB per process with DDP, DDP + activation checkpointing, and
    FSDP2 + checkpointing (generator stages only)."""
    head = "| config | parameters trained | frozen | activations / sample: kept, checkpointed |"
    head += "".join(f" {g} GPUs: batch/GPU: DDP, +ckpt, FSDP+ckpt |" for g in gpus)
    lines = [head, "|" + "---|" * (4 + len(gpus))]
    for r in rows:
        p = MemoryProfile(**r)
        cells = [p.config, f"{p.trainable / 1e6:,.1f} M", f"{p.frozen / 1e6:,.0f} M" if p.frozen else "-",
                 f"{p.activation_per_sample / 2**20:,.0f} MiB, {p.checkpointed_per_sample / 2**20:,.0f} MiB"]
        for g in gpus:
            per_gpu = micro or max(1, p.batch // g)
            ddp, ckpt = (p.bytes_per_gpu(mode, per_gpu, g) / GiB for mode in ("ddp", "ddp+ckpt"))
            sharded = f"{p.bytes_per_gpu('fsdp+ckpt', per_gpu, g) / GiB:,.1f}" if p.shardable else "-"
            cells.append(f"{per_gpu}: {ddp:,.1f}, {ckpt:,.1f}, {sharded} GiB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipes(memories: list[float], gpus: int = 1) -> str:
    """A summary table of every paper config on one GPU of each memory (the mode `fae plan` recommends, its
    micro-batch x grad_accum and memory), then each `fae plan` output in full."""
    names = sorted(p.stem for p in PAPER.glob("*.yaml") if "finetune" not in p.stem)
    head = "| config | " + " | ".join(f"{m:g} GB: mode, micro-batch x grad_accum, memory" for m in memories) + " |"
    rows, outputs = [head, "|" + "---|" * (1 + len(memories))], []
    for name in names:
        prof = profile(name)
        cells = [name]
        for memory in memories:
            command = f"fae plan {name} --gpus {gpus} --gpu-memory {memory:g}"
            try:
                plan = make_plan(prof, gpus, memory)
            except PlanError as exc:
                cells.append("does not fit")
                outputs.append(f"$ {command}\nfae: error: {exc}")
                continue
            chosen = recommended(plan)
            assert chosen is not None
            cells.append(f"{MODE_NAMES[chosen.mode]}, {chosen.micro_batch} x {chosen.grad_accum}, "
                         f"{chosen.bytes_per_gpu / GiB:,.1f} GiB")
            outputs.append(f"$ {command}\n{format_plan(plan)}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + "\n\n".join(outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--micro-batch", type=int, help="samples per process (default: the config's batch / GPUs)")
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--recipes", type=float, nargs="+", metavar="GiB",
                    help="instead: every paper config on one GPU of each of these memories")
    args = ap.parse_args()
    if args.recipes:
        print(recipes(args.recipes))
        return
    rows = [plan(c) for c in args.configs]
    print(table(rows, args.gpus, args.micro_batch))


__all__ = ["plan", "recipes", "saved_bytes_per_sample", "table"]

if __name__ == "__main__":
    main()
