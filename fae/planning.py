"""Memory per GPU of a training config and the run layout that fits a GPU: `fae plan` and benchmarks/memory_plan.py.

Nothing is trained or downloaded: the networks are built on the meta device. Per process:
- training state: fp32 weights, gradients and AdamW's two moments (16 bytes per trained parameter) and the fp32 EMA
  (4 bytes, for the networks the stage keeps an EMA of); all on every process under DDP, 1/N of it under FSDP2
  (`train.fsdp`). DDP with more than one process also holds its gradient buckets (4 bytes per parameter: the trainer
  does not make gradients views of the buckets);
- frozen networks run every step (an encoder computing features on the fly, the pixel decoder's ConvNeXt loss
  network): their fp32 weights on every process;
- activations: the bytes autograd keeps for backward in one training forward, counted exactly with saved-tensor hooks
  (the difference between two batch sizes, so weights saved for backward are not counted), times the micro-batch.
  Counted in fp32, an upper bound: under bf16 autocast most saved tensors are matmul inputs kept at half the size.
  With activation checkpointing only each block's input is kept, and backward recomputes one block at a time, which
  adds one block's activations (kept - checkpointed) / blocks;
- FSDP2 gathers a block's full weights before it runs and prefetches the next, and holds one block's full gradients
  before they are reduce-scattered: 3 x 4 bytes per parameter of the largest block.
Not counted: the CUDA context and allocator slack (`reserve`, 2 GiB by default, is kept free for them), temporary
buffers of the optimizer step and of the frozen encoder's forward (it keeps nothing for backward), the discriminator's
own step in the pixel-decoder stage (it runs after the generator's graph is freed, on a smaller network).
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fae.config import PACKAGED_CONFIGS, ConfigError

GiB = 2**30
MODES = ("ddp", "ddp+ckpt", "fsdp+ckpt")
MODE_NAMES = {"ddp": "DDP", "ddp+ckpt": "DDP + checkpointing", "fsdp+ckpt": "FSDP2 + checkpointing"}
PLANNED_STAGES = ("fae", "pixel-decoder", "dit", "flow", "mmdit")
SHARDED_STAGES = ("dit", "flow", "mmdit")          # the stages that take train.fsdp=true
DEFAULT_RESERVE_GIB = 2.0
GOOD_MICRO_BATCH = 16  # below this per-GPU micro-batch, kernels of XL-size models stop filling a GPU (our rule)
RECOMPUTE_COST = 4 / 3  # checkpointing runs one more forward: ~4 forward-equivalents a step instead of 3


class PlanError(ConfigError):
    """A config that cannot be planned, or a GPU too small for it: a user error (one line, no traceback)."""


@dataclass(frozen=True)
class MemoryProfile:
    """What a config's training holds per process, independent of the GPU count and micro-batch."""

    config: str                      # a paper config's name, or the path given
    path: str                        # how `fae train --config` names it
    stage: str
    batch: int                       # train.batch_size: the global batch
    trainable: int                   # parameters of the networks the optimizers update (the discriminator included;
                                     # a frozen sin-cos table inside counts too: a few MB over)
    ema: int                         # of those, the parameters with an EMA copy
    frozen: int                      # frozen networks run every step
    activation_per_sample: float     # bytes autograd keeps for backward, per sample
    checkpointed_per_sample: float   # the same with activation checkpointing
    blocks: int                      # checkpointed / FSDP units (transformer blocks; STARFlow's layers)
    block_parameters: int            # parameters of the largest block

    @property
    def shardable(self) -> bool:
        return self.stage in SHARDED_STAGES

    def per_sample(self, mode: str) -> float:
        if mode == "ddp":
            return self.activation_per_sample
        recompute = (self.activation_per_sample - self.checkpointed_per_sample) / max(1, self.blocks)
        return self.checkpointed_per_sample + recompute

    def fixed_bytes(self, mode: str, gpus: int) -> float:
        """Bytes per process that do not grow with the micro-batch."""
        state = 16 * self.trainable + 4 * self.ema
        if mode == "fsdp+ckpt" and gpus > 1:
            return state / gpus + 4 * self.frozen + 3 * 4 * self.block_parameters
        buckets = 4 * self.trainable if gpus > 1 else 0   # one process runs without DDP
        return state + buckets + 4 * self.frozen

    def bytes_per_gpu(self, mode: str, micro_batch: int, gpus: int) -> float:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        return self.fixed_bytes(mode, gpus) + micro_batch * self.per_sample(mode)

    def largest_micro_batch(self, mode: str, gpus: int, budget: float) -> int:
        """The largest micro-batch whose bytes per GPU are at most `budget` (0: not even one sample)."""
        room = budget - self.fixed_bytes(mode, gpus)
        return max(0, math.floor(room / self.per_sample(mode))) if room > 0 else 0

    def modes(self) -> tuple[str, ...]:
        return MODES if self.shardable else MODES[:2]


@dataclass(frozen=True)
class ModePlan:
    mode: str
    fits: int                        # the largest micro-batch that fits (0: none)
    micro_batch: int                 # the one the plan uses (0: does not fit)
    grad_accum: int
    global_batch: int                # micro_batch x grad_accum x gpus
    bytes_per_gpu: float             # at micro_batch (at 1 when nothing fits)
    seconds_per_step: float | None


@dataclass(frozen=True)
class Plan:
    profile: MemoryProfile
    gpus: int
    gpu_memory_gib: float
    reserve_gib: float
    rate: float | None               # measured images/s per GPU without checkpointing
    modes: tuple[ModePlan, ...]


def layout(batch: int, gpus: int, fits: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with micro_batch <= fits and micro_batch x grad_accum x gpus == batch where the
    batch divides by the GPU count (the largest divisor of the per-GPU share that fits); otherwise the largest
    micro-batch that fits and the accumulation nearest the batch (the global batch then changes)."""
    if fits < 1:
        return 0, 0
    if batch % gpus == 0:
        share = batch // gpus
        micro = max(d for d in range(1, min(share, fits) + 1) if share % d == 0)
        return micro, share // micro
    micro = min(fits, math.ceil(batch / gpus))
    return micro, max(1, round(batch / (gpus * micro)))


def make_plan(profile: MemoryProfile, gpus: int, gpu_memory_gib: float, reserve_gib: float = DEFAULT_RESERVE_GIB,
              rate: float | None = None) -> Plan:
    """Each mode's largest micro-batch within `gpu_memory_gib - reserve_gib`, the grad_accum that keeps the config's
    global batch, and (with `rate`, images/s per GPU measured without checkpointing) the time per optimizer step."""
    if gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {gpus}")
    if rate is not None and rate <= 0:
        raise PlanError(f"--rate must be positive, got {rate}")
    budget = (gpu_memory_gib - reserve_gib) * GiB
    plans = []
    for mode in profile.modes():
        fits = profile.largest_micro_batch(mode, gpus, budget)
        micro, accum = layout(profile.batch, gpus, fits)
        seconds = None
        if rate is not None and micro:
            seconds = micro * accum / rate * (RECOMPUTE_COST if mode != "ddp" else 1.0)   # images per GPU / rate
        plans.append(ModePlan(mode, fits, micro, accum, micro * accum * gpus,
                              profile.bytes_per_gpu(mode, max(micro, 1), gpus), seconds))
    if not any(p.micro_batch for p in plans):
        need = min(profile.bytes_per_gpu(m, 1, gpus) for m in profile.modes()) / GiB + reserve_gib
        raise PlanError(f"{profile.config}: micro-batch 1 needs {need:.1f} GiB per GPU on {gpus} GPU(s) (with "
                        f"{reserve_gib:g} GiB kept for the CUDA context), more than the {gpu_memory_gib:g} GiB given; "
                        f"use more GPUs{' (FSDP2 shards the state)' if profile.shardable else ''} or larger ones")
    return Plan(profile, gpus, gpu_memory_gib, reserve_gib, rate, tuple(plans))


def format_plan(plan: Plan) -> str:
    """The plan as a header line and a Markdown table (what `fae plan` prints)."""
    p = plan.profile
    lines = [f"{p.config} ({p.stage}): {p.trainable / 1e6:,.1f}M parameters trained"
             + (f", {p.frozen / 1e6:,.0f}M frozen" if p.frozen else "")
             + f"; activations per sample {p.activation_per_sample / 2**20:,.0f} MiB kept, "
             f"{p.checkpointed_per_sample / 2**20:,.0f} MiB checkpointed; global batch {p.batch}",
             f"{plan.gpus} GPU(s) of {plan.gpu_memory_gib:g} GiB, {plan.reserve_gib:g} GiB kept free "
             "(CUDA context, allocator)", "",
             "| mode | largest micro-batch | micro-batch x grad_accum x GPUs | memory / GPU | time / step |",
             "|---|---|---|---|---|"]
    for m in plan.modes:
        if not m.micro_batch:
            cells = ["does not fit", "-", f"{m.bytes_per_gpu / GiB:,.1f} GiB at 1", "-"]
        else:
            layout_cell = f"{m.micro_batch} x {m.grad_accum} x {plan.gpus} = {m.global_batch}"
            if m.global_batch != p.batch:
                layout_cell += f" (config: {p.batch}; set train.batch_size={m.global_batch})"
            time = "-" if m.seconds_per_step is None else f"{m.seconds_per_step:,.2f} s"
            cells = [str(m.fits), layout_cell, f"{m.bytes_per_gpu / GiB:,.1f} GiB", time]
        lines.append(f"| {MODE_NAMES[m.mode]} | " + " | ".join(cells) + " |")
    if not p.shardable:
        lines.append(f"(FSDP2 is for the generator stages: {', '.join(SHARDED_STAGES)})")
    if plan.gpus == 1 and p.shardable:
        lines.append("(one process: FSDP2 has nothing to shard; its row equals DDP + checkpointing)")
    chosen = recommended(plan)
    settings = {"ddp": "", "ddp+ckpt": " train.activation_checkpointing=true",
                "fsdp+ckpt": " train.activation_checkpointing=true train.fsdp=true"}
    if chosen is not None:
        launch = "fae train" if plan.gpus == 1 else f"torchrun --nproc_per_node={plan.gpus} -m fae.cli train"
        lines.append(f"run: {launch} {p.stage} --config {p.path} --out RUN train.grad_accum={chosen.grad_accum}"
                     + (f" train.batch_size={chosen.global_batch}" if chosen.global_batch != p.batch else "")
                     + settings[chosen.mode])
    return "\n".join(lines)


def recommended(plan: Plan) -> ModePlan | None:
    """The first mode in the order DDP, + checkpointing, FSDP2 + checkpointing whose micro-batch reaches
    GOOD_MICRO_BATCH (or the whole per-GPU share): checkpointing costs one more forward (~1/3 more compute) where
    accumulation costs only smaller kernels. If none reaches it, the mode with the largest micro-batch."""
    fitting = [m for m in plan.modes if m.micro_batch]
    if not fitting:
        return None
    share = math.ceil(plan.profile.batch / plan.gpus)
    good = [m for m in fitting if m.micro_batch >= min(GOOD_MICRO_BATCH, share)]
    return good[0] if good else max(fitting, key=lambda m: m.micro_batch)


# ------------------------------------------------------------------------------------------------ profiling a config
def resolve_config(config: str | Path) -> Path:
    """A config file, or the name of a packaged paper config (`dit_lightningdit_xl1`)."""
    path = Path(config)
    if path.is_file() or path.suffix or len(path.parts) > 1:
        return path      # load_stage_config says clearly when it is missing
    paper = PACKAGED_CONFIGS / "paper" / f"{config}.yaml"
    if paper.is_file():
        return paper
    names = sorted(p.stem for p in (PACKAGED_CONFIGS / "paper").glob("*.yaml"))
    raise PlanError(f"no config {config!r}: give a YAML path or one of the paper configs: {', '.join(names)}")


def profile(config: str | Path, overrides: Sequence[str] = ()) -> MemoryProfile:
    """Count a config's parameters and the activations its training forward keeps, on the meta device."""
    from fae.nn import count_parameters, set_activation_checkpointing
    from fae.stages import buildable, load_stage_config, stage_module

    path = resolve_config(config)
    name, cfg = load_stage_config(path, overrides)
    if name not in PLANNED_STAGES:
        raise PlanError(f"{path}: fae plan covers the stages {', '.join(PLANNED_STAGES)}, not {name!r}")
    if name == "pixel-decoder" and cfg.decoder is None:
        raise PlanError(f"{path} fine-tunes a pixel decoder whose architecture comes from its Gaussian run: plan that "
                        "run's config (the same decoder and batch; this stage adds the FAE's fp32 weights)")
    with buildable(f"stage {name}"), torch.device("meta"):
        parts = stage_module(name).components(cfg)
        trained = sum(count_parameters(m) for m in parts.values())
        ema = sum(count_parameters(m) for k, m in parts.items() if k != "discriminator")
        networks, forward = _training_forward(name, cfg, parts)
        frozen = _frozen_parameters(name, cfg)
        activation = saved_bytes_per_sample(forward)
        for module in networks:
            set_activation_checkpointing(module, True)
        checkpointed = saved_bytes_per_sample(forward)
        units = [u for m in networks for u in _blocks(m)]
    if _uses_convnext(name, cfg):
        loss_network = _convnext_saved_per_sample()
        activation, checkpointed = activation + loss_network, checkpointed + loss_network
    paper = path.parent.resolve() == (PACKAGED_CONFIGS / "paper").resolve()
    label, shown = (path.stem, f"configs/paper/{path.name}") if paper else (str(config), str(config))
    return MemoryProfile(label, shown, name, cfg.train.batch_size, trained, ema, frozen, activation, checkpointed,
                         len(units), max((count_parameters(u) for u in units), default=0))


def _frozen_parameters(name: str, cfg: Any) -> int:
    from fae.nn import count_parameters

    frozen = 0
    if name == "pixel-decoder" or (name == "fae" and getattr(cfg, "features", "on_the_fly") != "cache"):
        from fae.encoders import FrozenEncoder
        from fae.encoders.image import KNOWN_ENCODERS

        def family(hub_id: str) -> str:   # a checkpoint of another resolution is the same network
            return re.sub(r"-\d+$", "", hub_id)

        known = next((k for k, v in KNOWN_ENCODERS.items()
                      if v.kind == cfg.encoder.kind and family(v.hub_id) == family(cfg.encoder.name_or_path)), None)
        if known is None:
            raise PlanError(f"fae plan counts the frozen encoder of the known encoders only, not "
                            f"{cfg.encoder.name_or_path!r} (known: {', '.join(KNOWN_ENCODERS)})")
        frozen += count_parameters(FrozenEncoder.skeleton(known, input_size=cfg.encoder.input_size))
    if _uses_convnext(name, cfg):
        from fae.losses import ConvNeXt

        frozen += count_parameters(ConvNeXt())
    return frozen


def _training_forward(name: str, cfg: Any, parts: dict[str, nn.Module]) -> tuple[list[nn.Module],
                                                                                   Callable[[int], Any]]:
    """The trained networks whose blocks checkpoint, and batch -> one training forward on meta inputs."""
    meta = torch.device("meta")
    if name in ("dit", "flow", "mmdit"):
        model = next(iter(parts.values()))
        m = cfg.model
        (h, w), c = m.input_size, m.in_channels
        if name == "dit":
            return [model], lambda b: model(torch.randn(b, c, h, w, device=meta), torch.rand(b, device=meta), None)
        if name == "flow":
            return [model], lambda b: model(torch.randn(b, c, h, w, device=meta), None)[0]
        from fae.models.mmdit import TextCondition

        def text_forward(b: int) -> Any:
            text = TextCondition(torch.randn(b, m.text_tokens, m.text_dim, device=meta),
                                 torch.ones(b, m.text_tokens, dtype=torch.bool, device=meta),
                                 torch.randn(b, m.text_dim, device=meta))
            return model(torch.randn(b, c, h, w, device=meta), torch.rand(b, device=meta), text)
        return [model], text_forward
    if name == "fae":
        from fae.models.autoencoder import FeatureAutoEncoder

        fae = FeatureAutoEncoder(cfg.model)
        tokens = cfg.model.grid[0] * cfg.model.grid[1]
        return [fae], lambda b: fae(torch.randn(b, tokens, cfg.model.feature_dim, device=meta))[0]
    decoder: Any = parts["pixel decoder"]   # a PixelDecoder: its config sizes the input
    discriminator = parts.get("discriminator")

    def pixel_forward(b: int) -> Any:
        # the generator's loss: the decoder, then the discriminator (frozen here) that the gradient passes through;
        # the ConvNeXt loss network's share is added by `profile` (`_convnext_saved_per_sample`)
        image = decoder(torch.randn(b, decoder.config.num_tokens, decoder.config.in_dim, device=meta))
        return image.sum() + (discriminator(image).sum() if discriminator is not None else 0)
    return [decoder], pixel_forward


@functools.cache
def _convnext_saved_per_sample() -> float:
    """What the ConvNeXt-S perceptual loss keeps for backward per sample: the same at any image size (it reads
    its input resized to 224 px, ConvNeXtPerceptual), so counted once."""
    from fae.losses import ConvNeXt

    with torch.device("meta"):
        net = ConvNeXt().requires_grad_(False)
        return saved_bytes_per_sample(lambda b: net(torch.randn(b, 3, 224, 224, requires_grad=True)))


def _uses_convnext(name: str, cfg: Any) -> bool:
    return name == "pixel-decoder" and cfg.losses.perceptual == "convnext" and cfg.losses.perceptual_weight > 0


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The units that checkpoint and that FSDP2 shards one by one (fae.sharding): elements of ModuleLists that hold
    no ModuleList themselves (transformer blocks; STARFlow's layers)."""
    return [block for child in module.modules() if isinstance(child, nn.ModuleList) for block in child
            if not any(isinstance(inner, nn.ModuleList) for inner in block.modules())]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Meta tensors take SDPA's math path, which keeps the N x N attention matrix for backward; GPUs (and CPUs in
    fp32) run a fused kernel that keeps only the output and the log-sum-exp. Count what the fused kernel keeps."""
    original = F.scaled_dot_product_attention

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, **_: Any) -> torch.Tensor:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused  # type: ignore[assignment]  # same call signature for our callers
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes_per_sample(forward: Callable[[int], Any]) -> float:
    """Bytes autograd keeps for backward per sample of `forward(batch)`: the difference between batches 4 and 2,
    so what does not grow with the batch (weights saved for backward) is left out."""
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


__all__ = ["DEFAULT_RESERVE_GIB", "GiB", "MODES", "MemoryProfile", "ModePlan", "Plan", "PlanError", "format_plan",
           "fused_attention", "layout", "make_plan", "profile", "recommended", "resolve_config", "saved_bytes_per_sample"]
