"""The GPU check of issue 15, sized for one H200 in under 8 minutes; also runs on CPU at tiny size (for its test).

    python benchmarks/gpu_check.py --out runs/gpu_check              # on the GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gc  # seconds, no pytest

Sections (each one timed, and one failing section does not stop the others; its error goes to the report):
  pytest      the test suite with CUDA visible (pytest -x -q, capped at --pytest-timeout s; skipped on CPU)
  dit_train   LightningDiT-XL/1 (configs/paper/dit_lightningdit_xl1.yaml) bf16 train step, eager and torch.compile:
              step time, model FLOPs utilisation (FlopCounterMode count / step time / --peak-tflops, 989 dense bf16
              on H200), peak memory (torch.cuda.max_memory_allocated)
  ddp         torchrun --nproc_per_node 1 of a short DDP training run of the DiT (this file's --ddp-worker)
  sampling    XL/1 images/s at 250 Euler steps with guidance 1.5 (halves in one batch), bf16
  vs_diffusers benchmarks/vs_diffusers.py at XL size (depth 28, width 1152, heads 16, 16x16x32, patch 1), bf16
  paper_models one bf16 train step and a short forward-only run (8 calls) of every paper-size model: the FAE stage
              with a randomly initialised DINOv2-g encoder of the real architecture in front (no weights on the
              machine), the pixel decoder, LightningDiT-XL/1, STARFlow 1.4B, MMDiT
Writes <out>/gpu_check.json and <out>/gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (a sibling script)
import vs_diffusers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("fae", "pixel-decoder", "dit", "flow", "mmdit")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def amp(device: torch.device, precision: str) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step_fn(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
                  precision: str) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with amp(device, precision):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def section_pytest(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "not on CUDA"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.pytest_timeout)
        return {"rc": proc.returncode, "seconds": time.perf_counter() - start, "tail": proc.stdout[-1500:]}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"rc": "timeout", "seconds": args.pytest_timeout, "tail": out[-1500:]}


def dit_size(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "paper"


def _backward(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One forward and backward pass of `loss_fn`."""
    return lambda: loss_fn().backward()


def _with_encoder(loss_fn: Callable[[], torch.Tensor], encoder: torch.nn.Module,
                  images: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`loss_fn` preceded by a no-grad forward of the frozen `encoder` on `images` (what the FAE stage runs)."""

    def loss() -> torch.Tensor:
        with torch.no_grad():
            encoder(pixel_values=images)
        return loss_fn()

    return loss


def _forwards(loss_fn: Callable[[], torch.Tensor], device: torch.device, precision: str,
              times: int) -> Callable[[], None]:
    """`times` no-grad forwards of `loss_fn`, each in its own autocast context."""

    def forwards() -> None:
        for _ in range(times):
            with torch.no_grad(), amp(device, precision):
                loss_fn()

    return forwards


def section_dit_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for compiled in (False, True):
        if compiled and device.type == "cpu":
            out["compiled"] = {"skipped": "compile is off on CPU (slow to build, does not pay)"}
            continue
        reset_memory(device)
        torch.manual_seed(0)
        model, loss_fn, batch = throughput.build_case("dit", dit_size(args), device, args.batch)
        model.train()
        flops = count_flops(_backward(loss_fn))  # forward + backward, fp32 count = bf16 count
        model.zero_grad(set_to_none=True)
        if compiled:
            model.forward = torch.compile(model.forward)
        step = train_step_fn(model, loss_fn, device, args.precision)
        start = time.perf_counter()
        step()  # warm-up (compiles)
        sync(device)
        first = time.perf_counter() - start
        seconds = timed(step, device, args.repeats, warmup=1)
        out["compiled" if compiled else "eager"] = {
            "batch": batch, "step_s": seconds, "first_step_s": first, "images_per_s": batch / seconds,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / (args.peak_tflops * 1e12),
            "peak_memory_gib": peak_memory_gib(device)}
        del model, step
    return out


def section_sampling(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from fae.transport import GuidanceSchedule, GuidedVelocity, SamplerConfig, sample

    torch.manual_seed(0)
    model, _, batch = throughput.build_case("dit", dit_size(args), device, args.sample_batch)
    model.eval()
    cfg = model.config
    guidance = GuidanceSchedule.constant(1.5)
    velocity = GuidedVelocity(model, guidance)
    noise = torch.randn(batch, cfg.in_channels, *cfg.input_size, device=device)
    y = torch.arange(batch, device=device) % cfg.num_classes
    sampler = SamplerConfig(steps=args.sample_steps, guidance=guidance)

    def run() -> None:
        with torch.no_grad(), amp(device, args.precision):
            sample(velocity, noise, y, sampler)

    seconds = timed(run, device, repeats=1, warmup=0 if not args.tiny else 1)
    return {"batch": batch, "steps": args.sample_steps, "seconds": seconds, "images_per_s": batch / seconds}


def section_vs_diffusers(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    argv = ["--device", str(device), "--precision", args.precision, "--rounds", str(args.repeats)]
    argv += ["--tiny"] if args.tiny else ["--depth", "28", "--width", "1152", "--heads", "16", "--batch", "32"]
    return vs_diffusers.main(argv)


def dinov2_giant(tiny: bool, device: torch.device) -> torch.nn.Module:
    """DINOv2-g/14 of the real architecture, randomly initialised (no weights can be downloaded on the machine)."""
    from transformers import Dinov2Config, Dinov2Model

    if tiny:
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    else:
        cfg = Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                           use_swiglu_ffn=True, image_size=224, patch_size=14)
    return Dinov2Model(cfg).to(device).eval()


def section_paper_models(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size = "tiny" if args.tiny else "paper"
    out: dict[str, Any] = {}
    for name in MODELS:
        try:
            reset_memory(device)
            torch.manual_seed(0)
            model, loss_fn, batch = throughput.build_case(name, size, device, args.batch)
            model.train()
            row: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "batch": batch}
            if name == "fae":  # the stage also runs the frozen encoder on the images, every step
                encoder = dinov2_giant(args.tiny, device)
                side = encoder.config.image_size
                images = torch.rand(batch, 3, side, side, device=device)
                loss_fn = _with_encoder(loss_fn, encoder, images)
                row["encoder_params"] = sum(p.numel() for p in encoder.parameters())
            step = train_step_fn(model, loss_fn, device, args.precision)
            row["train_step_s"] = timed(step, device, repeats=1)
            model.eval()
            row["forward_x8_s"] = timed(_forwards(loss_fn, device, args.precision, 8), device, repeats=1)
            row["peak_memory_gib"] = peak_memory_gib(device)
            out[name] = row
            del model, step
        except Exception as e:  # a missing or broken model is a finding, not a stop
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def section_ddp(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
           "--ddp-worker", "--device", str(device), "--precision", args.precision]
    if args.tiny:
        cmd.append("--tiny")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    result: dict[str, Any] = {"rc": proc.returncode, "seconds": time.perf_counter() - start}
    for line in proc.stdout.splitlines():
        if line.startswith("DDP "):
            result.update(json.loads(line[4:]))
    if proc.returncode:
        result["stderr"] = proc.stderr[-1500:]
    return result


def ddp_worker(args: argparse.Namespace) -> None:
    """A short DDP training run (10 steps) of the DiT, launched by torchrun."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model, _, batch = throughput.build_case("dit", "tiny" if args.tiny else "paper", device, args.batch)
    ddp = DistributedDataParallel(model)
    from fae.transport import TransportConfig, flow_matching_loss

    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    step = train_step_fn(ddp, lambda: flow_matching_loss(ddp, x, y, TransportConfig())[0], device, args.precision)
    losses = []
    seconds = timed(step, device, repeats=10)
    with torch.no_grad(), amp(device, args.precision):
        losses.append(float(flow_matching_loss(ddp, x, y, TransportConfig())[0]))
    if dist.get_rank() == 0:
        print("DDP " + json.dumps({"world_size": dist.get_world_size(), "step_s": seconds, "batch": batch,
                                   "loss_after": losses[-1]}))
    dist.destroy_process_group()


SECTIONS = {"pytest": section_pytest, "dit_train": section_dit_train, "ddp": section_ddp,
            "sampling": section_sampling, "vs_diffusers": section_vs_diffusers, "paper_models": section_paper_models}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the demo configs), for a CPU test")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=None, help="train batch (default: 8 at paper size, demo at tiny)")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H200: 989)")
    ap.add_argument("--pytest-timeout", type=int, default=240)
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.sample_batch, args.sample_steps, args.repeats = 4, 4, 1
        args.batch = args.batch or 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return {}
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training policy on GPU (fp32 parts only; bf16 is autocast)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                              f"CPU {torch.backends.cpu.get_cpu_capability()}", "torch": torch.__version__,
                              "precision": args.precision, "tiny": args.tiny, "sections": {}}
    for name in args.sections:
        start = time.perf_counter()
        try:
            result = SECTIONS[name](args, device)
        except Exception as e:  # record and go on: the other sections still tell something
            result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        report["sections"][name] = result
        report.setdefault("section_seconds", {})[name] = time.perf_counter() - start
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    s = report["sections"]
    lines = [f"GPU check: {report['device']}, torch {report['torch']}, {report['precision']}"
             f"{' (tiny)' if report['tiny'] else ''}", ""]
    if "pytest" in s:
        lines.append(f"- pytest: {s['pytest'].get('rc', s['pytest'].get('skipped', s['pytest'].get('error')))}")
    for mode, r in s.get("dit_train", {}).items():
        if isinstance(r, dict) and "step_s" in r:
            mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
            lines.append(f"- DiT train ({mode}): batch {r['batch']}, {1000 * r['step_s']:.0f} ms/step, "
                         f"{r['images_per_s']:.1f} img/s, {r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}%, "
                         f"peak {mem} (first step {r['first_step_s']:.1f} s)")
    if "step_s" in s.get("ddp", {}):
        lines.append(f"- DDP (torchrun, {s['ddp']['world_size']} process): {1000 * s['ddp']['step_s']:.0f} ms/step")
    if "images_per_s" in s.get("sampling", {}):
        r = s["sampling"]
        lines.append(f"- sampling: {r['steps']} steps, guidance 1.5, batch {r['batch']}: {r['images_per_s']:.2f} img/s")
    for r in s.get("vs_diffusers", {}).get("results", []):
        lines.append(f"- vs diffusers {r['precision']} {r['op']}: fae {1000 * r['fae_s']:.1f} ms, diffusers "
                     f"{1000 * r['diffusers_s']:.1f} ms, ratio {r['ratio']:.2f}x")
    if s.get("paper_models"):
        lines += ["", "| model | params | batch | train step s | 8 forwards s | peak GiB |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in s["paper_models"].items():
            if not isinstance(r, dict) or "error" in r or "train_step_s" not in r:
                lines.append(f"| {name} | error: {r.get('error') if isinstance(r, dict) else r} | | | | |")
                continue
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
            lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['train_step_s']:.2f} | "
                         f"{r['forward_x8_s']:.2f} | {mem} |")
    errors = [f"- {name}: {r['error']}" for name, r in s.items() if isinstance(r, dict) and "error" in r]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else [])) + "\n"


if __name__ == "__main__":
    main()
