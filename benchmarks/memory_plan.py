"""Expected GPU memory per process of every paper config, computed (nothing is trained): the table in docs/scaling.md.

    python benchmarks/memory_plan.py [--gpus 8 64] [--micro-batch N]

Per process, for a run of the config's global batch on `--gpus` processes without gradient accumulation:
- training state: fp32 weights, gradients and AdamW's two moments (16 bytes per trainable parameter) and the fp32
  EMA (4 bytes): all on every process under DDP, divided by the process count under `train.fsdp: true`;
- a frozen encoder computing features on the fly: its fp32 weights (4 bytes per parameter) on every process;
- activations: the bytes autograd keeps for backward in one training forward, counted exactly with saved-tensor
  hooks on the meta device (difference between two batch sizes, so weights saved for backward are not counted),
  times the per-process micro-batch. Counted in fp32, an upper bound: under bf16 autocast most saved tensors are
  matmul inputs stored at half the size. With `train.activation_checkpointing` only each block's input is kept.
Not counted: the CUDA context and allocator slack (~1-3 GB), losses' networks (LPIPS/ConvNeXt, discriminator) of the
pixel-decoder stage, temporary buffers of the optimizer step.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fae.nn import count_parameters, set_activation_checkpointing  # noqa: E402
from fae.stages import load_stage_config, stage_module  # noqa: E402

GiB = 2**30
CONFIGS = ["fae_dinov2_g14", "pixel_decoder_dinov2_g14", "dit_lightningdit_xl1", "dit_sit_xl1",
           "flow_starflow_1p4b", "mmdit_cc12m"]


def training_forward(name: str, cfg: Any, parts: dict[str, nn.Module]) -> Callable[[int], Any]:
    """batch -> one training forward of the stage's trainable network on meta inputs of that batch size."""
    meta = dict(device="meta")
    if name == "dit":
        model, (h, w), c = parts["dit"], cfg.model.input_size, cfg.model.in_channels
        return lambda b: model(torch.randn(b, c, h, w, **meta), torch.rand(b, **meta), None)
    if name == "flow":
        model, (h, w), c = parts["flow"], cfg.model.input_size, cfg.model.in_channels
        return lambda b: model(torch.randn(b, c, h, w, **meta), None)[0]
    if name == "mmdit":
        from fae.models.mmdit import TextCondition

        model, m = parts["mmdit"], cfg.model
        (h, w), c = m.input_size, m.in_channels

        def forward(b: int) -> Any:
            text = TextCondition(torch.randn(b, m.text_tokens, m.text_dim, **meta),
                                 torch.ones(b, m.text_tokens, dtype=torch.bool, **meta), torch.randn(b, m.text_dim, **meta))
            return model(torch.randn(b, c, h, w, **meta), torch.rand(b, **meta), text)
        return forward
    if name == "fae":
        from fae.models.autoencoder import FeatureAutoEncoder

        model = FeatureAutoEncoder(cfg.model)
        tokens = cfg.model.grid[0] * cfg.model.grid[1]
        return lambda b: model(torch.randn(b, tokens, cfg.model.feature_dim, **meta))[0]
    if name == "pixel-decoder":
        decoder = parts["pixel decoder"]
        return lambda b: decoder(torch.randn(b, decoder.config.num_tokens, decoder.config.in_dim, **meta))
    raise ValueError(name)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Meta tensors take SDPA's math path, which keeps the N x N attention matrix for backward; GPUs (and CPUs in
    fp32) run a fused kernel that keeps only the output and the log-sum-exp. Count what the fused kernel keeps."""
    original = F.scaled_dot_product_attention

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, **_: Any) -> torch.Tensor:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes_per_sample(forward: Callable[[int], Any]) -> float:
    def saved(batch: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention():
            forward(batch)
        return total

    return (saved(4) - saved(2)) / 2


def plan(config: str) -> dict[str, Any]:
    name, cfg = load_stage_config(ROOT / "fae/configs/paper" / f"{config}.yaml")
    with torch.device("meta"):
        parts = stage_module(name).components(cfg)
        trainable = sum(count_parameters(m) for k, m in parts.items() if k != "discriminator")
        frozen = 0
        if name == "pixel-decoder" or (name == "fae" and getattr(cfg, "features", "on_the_fly") != "cache"):
            from fae.encoders import FrozenEncoder
            from fae.encoders.image import KNOWN_ENCODERS

            known = next(k for k, v in KNOWN_ENCODERS.items() if v.hub_id == cfg.encoder.name_or_path)
            frozen = count_parameters(FrozenEncoder.skeleton(known))
        if name == "dit":
            parts = {"dit": parts[next(iter(parts))]}
        elif name in ("flow", "mmdit"):
            parts = {name: parts[next(iter(parts))]}
        forward = training_forward(name, cfg, parts)
        activation = saved_bytes_per_sample(forward)
        for module in _modules_of(forward):
            set_activation_checkpointing(module, True)
        checkpointed = saved_bytes_per_sample(forward)
    return {"config": config, "stage": name, "trainable": trainable, "frozen": frozen,
            "batch": cfg.train.batch_size, "activation_per_sample": activation,
            "checkpointed_per_sample": checkpointed}


def _modules_of(forward: Callable[[int], Any]) -> list[nn.Module]:
    """The networks a `training_forward` closure runs (its closure cells that are modules)."""
    cells = [c.cell_contents for c in (forward.__closure__ or ())]
    return [c for c in cells if isinstance(c, nn.Module)]


def table(rows: list[dict[str, Any]], gpus: list[int], micro: int | None) -> str:
    """Per GPU count: the per-process batch, then GiB per process with DDP, DDP + activation checkpointing, and
    FSDP + checkpointing (generator stages only; the block being recomputed adds about one block's activations)."""
    head = "| config | parameters trained | frozen encoder | activations / sample: kept, checkpointed |"
    head += "".join(f" {g} GPUs: batch/GPU: DDP, +ckpt, FSDP+ckpt |" for g in gpus)
    lines = [head, "|" + "---|" * (4 + len(gpus))]
    for r in rows:
        cells = [r["config"], f"{r['trainable'] / 1e6:,.1f} M", f"{r['frozen'] / 1e6:,.0f} M" if r["frozen"] else "-",
                 f"{r['activation_per_sample'] / 2**20:,.0f} MiB, {r['checkpointed_per_sample'] / 2**20:,.0f} MiB"]
        for g in gpus:
            per_gpu = micro or max(1, r["batch"] // g)
            frozen, state = 4 * r["frozen"], 20 * r["trainable"]
            ddp = state + frozen + per_gpu * r["activation_per_sample"]
            ckpt = state + frozen + per_gpu * r["checkpointed_per_sample"]
            fsdp = state / g + frozen + per_gpu * r["checkpointed_per_sample"]
            sharded = f"{fsdp / GiB:,.1f}" if r["stage"] in ("dit", "flow", "mmdit") else "-"   # train.fsdp stages
            cells.append(f"{per_gpu}: {ddp / GiB:,.1f}, {ckpt / GiB:,.1f}, {sharded} GiB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--micro-batch", type=int, help="samples per process (default: the config's batch / GPUs)")
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    args = ap.parse_args()
    rows = [plan(c) for c in args.configs]
    print(table(rows, args.gpus, args.micro_batch))


if __name__ == "__main__":
    main()
