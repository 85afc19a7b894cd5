"""fae's DiT (plain SiT form) against diffusers' `DiTTransformer2DModel`, side by side in one process.

    python benchmarks/vs_diffusers.py [--depth 12 --width 384 --heads 6 --latent 16 16 32 --patch 1 --batch 16]
                                      [--threads 2] [--rounds 3] [--precision fp32 bf16] [--device cpu]
                                      [--json out.json] [--tiny]

Both models have the same depth, width, heads, patch and token count, out_channels = in_channels (neither learns
sigma), and the same structure: adaLN-Zero blocks, LayerNorm without affine, tanh-GELU MLP of width 4d, fixed sin-cos
position table, no RoPE. Measured:
  train   forward + MSE loss + backward + AdamW step (train mode)
  nfe     one sampling network evaluation of the batch B (no grad, eval mode)
  nfe-cfg one guided evaluation: the conditional and unconditional halves as one batch of 2B
Rounds interleave the two models (ours, theirs, ours, theirs, ...) after a warm-up call of each, so a machine whose
load drifts slows both alike; the tables give medians and the ratio theirs/ours (> 1: fae is faster). fae runs as a
user's process would: its kernel verdicts (fae.kernels) are measured or read in the warm-up, including whether its
batch is split over the threads, at inference and in training (fae.threads; `--ablate`'s "whole batch" takes that
out).

FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` on fae's model with attention as explicit
matmuls (the CPU SDPA kernel is not counted by FlopCounterMode), and the same count serves both models: they
compute the same network (diffusers adds one tiny t/y embedding MLP per block, on B vectors). The matmul peak is the
best rate of large square matmuls (ATen's and oneDNN's) on the same thread count and precision; "% peak" is achieved / peak.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import cpu_kinds  # benchmarks/ is on sys.path when this script runs (tests add it)
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fae import kernels
from fae.models.dit import DiT, dit_config
from fae.nn import set_attention_backend
from fae.precision import bf16_native
from fae.training import OptimConfig, make_adamw

NUM_CLASSES = 1000


@dataclass(frozen=True)
class Shape:
    depth: int
    width: int
    heads: int
    height: int
    width_px: int
    channels: int
    patch: int
    batch: int

    def describe(self) -> str:
        return (f"depth {self.depth}, width {self.width}, heads {self.heads}, latent {self.height}x{self.width_px}x"
                f"{self.channels}, patch {self.patch}, batch {self.batch}")


def build_fae(shape: Shape) -> DiT:
    cfg = dit_config(f"SiT-S/{shape.patch}", depth=shape.depth, hidden_size=shape.width, num_heads=shape.heads,
                     input_size=(shape.height, shape.width_px), in_channels=shape.channels, num_classes=NUM_CLASSES)
    return DiT(cfg)


def build_diffusers(shape: Shape) -> nn.Module:
    from diffusers import DiTTransformer2DModel  # diffusers: pinned in requirements/common.txt

    if shape.height != shape.width_px:
        raise ValueError(f"diffusers' DiT takes square latents, got {shape.height}x{shape.width_px}")
    return DiTTransformer2DModel(num_attention_heads=shape.heads, attention_head_dim=shape.width // shape.heads,
                                 in_channels=shape.channels, out_channels=shape.channels, num_layers=shape.depth,
                                 sample_size=shape.height, patch_size=shape.patch, num_embeds_ada_norm=NUM_CLASSES)


def fae_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """fae's trainer's AdamW (fae.training.make_adamw: the fused kernel)."""
    return make_adamw(params, OptimConfig(lr=1e-4, weight_decay=0.01), torch.device("cpu") if not params else params[0].device)


def stock_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """torch.optim.AdamW with torch's defaults (the foreach kernel), as diffusers' training examples build it."""
    return torch.optim.AdamW(params, lr=1e-4)


def fae_call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, t, y)


def diffusers_call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # diffusers' DiT embeds integer-scale diffusion steps; fae takes t in [0, 1] and scales by 1000 inside
    return model(x, timestep=t * 1000, class_labels=y).sample


Call = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Workload:
    """One model's three measured operations, on fixed inputs."""

    def __init__(self, model: nn.Module, call: Call, shape: Shape, precision: str, device: torch.device,
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        self.model, self.call, self.precision, self.device = model.to(device), call, precision, device
        g = torch.Generator().manual_seed(0)
        b = shape.batch
        self.x = torch.randn(b, shape.channels, shape.height, shape.width_px, generator=g).to(device)
        self.target = torch.randn(self.x.shape, generator=g).to(device)
        self.t = torch.rand(b, generator=g).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (b,), generator=g).to(device)
        self.x2, self.t2 = torch.cat([self.x, self.x]), torch.cat([self.t, self.t])
        self.y2 = torch.cat([self.y, torch.full_like(self.y, NUM_CLASSES - 1)])
        self.optimizer = optimizer([p for p in self.model.parameters() if p.requires_grad])

    def train(self) -> None:
        self.model.train()
        with autocast(self.precision, self.device):
            loss = F.mse_loss(self.call(self.model, self.x, self.t, self.y).float(), self.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def nfe(self) -> None:
        self.model.eval()
        with torch.no_grad(), autocast(self.precision, self.device):
            self.call(self.model, self.x, self.t, self.y)

    def nfe_cfg(self) -> None:
        self.model.eval()
        with torch.no_grad(), autocast(self.precision, self.device):
            self.call(self.model, self.x2, self.t2, self.y2)


OPERATIONS = ("train", "nfe", "nfe-cfg")


def run_op(work: Workload, op: str) -> float:
    fn = {"train": work.train, "nfe": work.nfe, "nfe-cfg": work.nfe_cfg}[op]
    if work.device.type == "cuda":
        torch.cuda.synchronize(work.device)
    start = time.perf_counter()
    fn()
    if work.device.type == "cuda":
        torch.cuda.synchronize(work.device)
    return time.perf_counter() - start


def count_flops(shape: Shape) -> dict[str, float]:
    """FLOPs of each operation, counted on fae's model with attention as explicit matmuls (fp32, on CPU) and its
    linears as F.linear: FlopCounterMode counts neither the CPU SDPA kernel nor oneDNN's linear op."""
    import fae.nn

    set_attention_backend("math")
    onednn, fae.nn._ONEDNN_AVAILABLE = fae.nn._ONEDNN_AVAILABLE, False
    try:
        work = Workload(build_fae(shape), fae_call, shape, "fp32", torch.device("cpu"), fae_optimizer)
        flops = {}
        for op in OPERATIONS:
            with FlopCounterMode(display=False) as counter:
                {"train": work.train, "nfe": work.nfe, "nfe-cfg": work.nfe_cfg}[op]()
            flops[op] = float(counter.get_total_flops())
    finally:
        set_attention_backend("auto")
        fae.nn._ONEDNN_AVAILABLE = onednn
    return flops


def matmul_peak(precision: str, device: torch.device, sizes: tuple[int, ...], repeats: int = 5) -> float:
    """Best measured GFLOP/s of square matmuls in this precision (bf16 tensors for bf16, not autocast)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        kernels: list[Callable[[], torch.Tensor]] = [functools.partial(torch.matmul, a, b)]
        if device.type == "cpu":  # oneDNN too: fae's fp32 linears run on it (fae.nn.Linear), and beat MKL on AMD
            kernels.append(functools.partial(torch.ops.mkldnn._linear_pointwise, a, b, None, "none", [], ""))
        for kernel in kernels:
            kernel()
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                kernel()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


# fae with one of its differences from stock PyTorch taken out (--ablate): what each is worth, measured in the same
# interleaved rounds. Each entry patches fae.nn while that variant runs.
ABLATIONS: dict[str, dict[str, object]] = {
    "foreach AdamW": {},  # the optimizer, not a patch: see Workload construction below
    "ATen tanh-GELU": {"gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
                       "gelu_tanh_": lambda h: torch.ops.aten.gelu_(h, approximate="tanh")},
    "autograd addcmul": {"_Modulate": SimpleNamespace(apply=lambda x, shift, scale: torch.addcmul(
                             shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))),
                         "_GatedResidual": SimpleNamespace(apply=lambda x, gate, update: torch.addcmul(
                             x, gate.unsqueeze(1), update))},
    "oneDNN linears": {"linear_backend": lambda *args, **kwargs: "onednn"},
    "no fused linear+GELU": {"fused_gelu_wins": lambda *args: False},
    "whole batch": {"fae.models.dit.splittable": lambda *args: False},  # no split over threads (fae.threads)
}


@contextlib.contextmanager
def patched(name: str) -> Iterator[None]:
    """ABLATIONS[name] in force: each entry an attribute of fae.nn, or a dotted module path and attribute."""
    import importlib

    def target(attr: str) -> tuple[object, str]:
        module, _, leaf = attr.rpartition(".")
        return importlib.import_module(module or "fae.nn"), leaf
    saved = {attr: getattr(*target(attr)) for attr in ABLATIONS.get(name, {})}
    for attr, value in ABLATIONS.get(name, {}).items():
        setattr(*target(attr), value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(*target(attr), value)


def compare(shape: Shape, precision: str, device: torch.device, rounds: int, warmup: int,
            ops: tuple[str, ...] = OPERATIONS, ablate: bool = False) -> dict[str, dict[str, float]]:
    """Median seconds per operation for each model (and, with `ablate`, each fae variant), rounds interleaved."""
    torch.manual_seed(0)
    works = {"fae": Workload(build_fae(shape), fae_call, shape, precision, device, fae_optimizer),
             "diffusers": Workload(build_diffusers(shape), diffusers_call, shape, precision, device, stock_optimizer)}
    if ablate:
        for name in ABLATIONS:
            optimizer = stock_optimizer if name == "foreach AdamW" else fae_optimizer
            works[f"fae - {name}"] = Workload(build_fae(shape), fae_call, shape, precision, device, optimizer)
    results: dict[str, dict[str, float]] = {}
    for op in ops:
        for _ in range(warmup):
            for name, work in works.items():
                with patched(name.removeprefix("fae - ")):
                    run_op(work, op)
        times: dict[str, list[float]] = {name: [] for name in works}
        for _ in range(rounds):
            for name, work in works.items():
                with patched(name.removeprefix("fae - ")):
                    times[name].append(run_op(work, op))
        results[op] = {name: statistics.median(ts) for name, ts in times.items()}
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--latent", type=int, nargs=3, default=[16, 16, 32], metavar=("H", "W", "C"))
    ap.add_argument("--patch", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on CUDA)")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per model and operation, interleaved")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="bf16 runs only where the device runs it natively")
    ap.add_argument("--ops", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    ap.add_argument("--ablate", action="store_true",
                    help="also time fae with each of its differences from stock PyTorch taken out (ABLATIONS)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run for tests: depth 1, width 32, 4x4x4")
    args = ap.parse_args(argv)
    if args.tiny:
        args.depth, args.width, args.heads, args.latent, args.batch = 1, 32, 2, [4, 4, 4], 2
        args.rounds, args.warmup = 1, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; the caller's torch thread count is restored on return (tests call this in-process)."""
    threads = torch.get_num_threads()
    try:
        return _compare_and_report(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _compare_and_report(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape = Shape(args.depth, args.width, args.heads, *args.latent, args.patch, args.batch)
    emulation = cpu_kinds.check_current() if device.type == "cpu" else {}  # all three AVX2 variables, each taken
    native, evidence = bf16_native(device)
    capability = torch.backends.cpu.get_cpu_capability()
    where = (f"CUDA {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU {cpu_kinds.describe()}, {torch.get_num_threads()} threads")
    print(f"{where}; bf16: {evidence}")
    print(f"shape: {shape.describe()}")
    flops = count_flops(shape)
    peak_sizes = (256,) if args.tiny else (512, 1024, 2048)
    report: dict = {"device": where, "cpu_capability": capability, "bf16_evidence": evidence, "emulation": emulation,
                    "shape": shape.__dict__, "flops": flops, "flop_count": "FlopCounterMode on fae, math attention",
                    "results": []}
    rows = []
    for precision in args.precision:
        if precision == "bf16" and not native:
            print("bf16 skipped: not native on this device")
            continue
        peak = matmul_peak(precision, device, peak_sizes)
        times = compare(shape, precision, device, args.rounds, args.warmup, tuple(args.ops), args.ablate)
        for op, by_model in times.items():
            ours, theirs = by_model["fae"], by_model["diffusers"]
            row = {"precision": precision, "op": op, "fae_s": ours, "diffusers_s": theirs,
                   "ratio": theirs / ours, "fae_gflops": flops[op] / ours / 1e9,
                   "diffusers_gflops": flops[op] / theirs / 1e9, "peak_gflops": peak}
            row["fae_peak_fraction"] = row["fae_gflops"] / peak
            row["diffusers_peak_fraction"] = row["diffusers_gflops"] / peak
            # each ablation: how much slower fae is without that difference (+ = it helps)
            row["ablations"] = {name.removeprefix("fae - "): seconds / ours - 1
                                for name, seconds in by_model.items() if name.startswith("fae - ")}
            rows.append(row)
    report["results"] = rows
    report["kernels"] = kernels.summary()  # fae's backend verdicts (linear, linear_gelu, attention) and their timings
    for verdict in kernels.verdicts():
        if verdict.source != "small":
            print(f"  kernel {verdict.describe()}")
    print(markdown(rows, where, shape))
    if args.ablate:
        print(ablation_markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def ablation_markdown(rows: list[dict]) -> str:
    names = list(ABLATIONS)
    lines = ["", "fae with one difference taken out: time against fae's (+ = that difference makes fae faster)", "",
             "| precision | operation | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['op']} | "
                     + " | ".join(f"{100 * r['ablations'][n]:+.1f}%" for n in names) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], where: str, shape: Shape) -> str:
    lines = [f"{where}; {shape.describe()}", "",
             "| precision | operation | fae ms | diffusers ms | ratio diffusers/fae | fae GFLOP/s | "
             "diffusers GFLOP/s | matmul peak GFLOP/s | fae % peak | diffusers % peak |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['op']} | {1000 * r['fae_s']:.1f} | {1000 * r['diffusers_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['fae_gflops']:.0f} | {r['diffusers_gflops']:.0f} | "
                     f"{r['peak_gflops']:.0f} | {100 * r['fae_peak_fraction']:.0f}% | "
                     f"{100 * r['diffusers_peak_fraction']:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
