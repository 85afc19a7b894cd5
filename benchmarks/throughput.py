"""Train-step throughput (images/s) and peak memory per stage, and DiT sampling throughput, on this machine.

    python benchmarks/throughput.py [--models fae pixel-decoder dit flow mmdit] [--sizes tiny S B]
                                    [--precision fp32 bf16] [--sample-sizes tiny S] [--sample-steps 50 250]
                                    [--threads 2] [--steps 3] [--json out.json] [--quick]

Sizes: "tiny" is the model section of fae/configs/demo/<stage>.yaml at the demo's batch; "S" and "B" are the
registries' S and B widths on the paper's 16x16 grid (32 latent channels; DINOv2-S/B feature widths 384/768 for
the FAE and the pixel decoder) at batch 8 (pixel decoder: 4, at 256 px). The train step is forward + loss + backward
+ AdamW step; the losses are each stage's core term only (DiT/MMDiT flow matching, flow bits/dim, FAE feature MSE,
pixel-decoder pixel MSE; no perceptual or GAN terms, no frozen encoder). Sampling: the DiT with constant guidance
1.5 (conditional and unconditional halves in one batch), Euler, 50 and 250 steps.

Every case runs in its own child process, so its peak memory is that process's peak resident set
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`); the table gives it less the child's resident set after importing
torch and fae (the baseline, printed), i.e. model + optimizer + activations + allocator slack. bf16 runs only where
the CPU runs it natively. Times are medians of --steps calls after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "fae" / "configs" / "demo"
MODELS = ("fae", "pixel-decoder", "dit", "flow", "mmdit")
SIZES = ("tiny", "S", "B")
WIDTHS = {"S": (384, 6), "B": (768, 12)}  # width, heads
LATENT = dict(input_size=(16, 16), in_channels=32)


def demo_model(stage: str) -> Any:
    from fae.stages import load_stage_config

    file = {"pixel-decoder": "pixel_decoder"}.get(stage, stage)
    _, cfg = load_stage_config(DEMO / f"{file}.yaml")
    return cfg


Step = Callable[[], torch.Tensor]


PAPER = {"fae": "fae_dinov2_g14", "pixel-decoder": "pixel_decoder_dinov2_g14", "dit": "dit_lightningdit_xl1",
         "flow": "flow_starflow_1p4b", "mmdit": "mmdit_cc12m"}


def paper_model(stage: str) -> Any:
    from fae.stages import load_stage_config

    _, cfg = load_stage_config(ROOT / "configs" / "paper" / f"{PAPER[stage]}.yaml")
    return cfg.decoder if stage == "pixel-decoder" else cfg.model


def build_case(model_name: str, size: str, device: str | torch.device = "cpu", batch: int | None = None,
               ) -> tuple[nn.Module, Step, int]:
    """The model (on `device`), a function computing its training loss on a fixed synthetic batch, and the batch
    size. Sizes: tiny (demo config), S, B, or paper (configs/paper; `batch` then defaults to 8)."""
    model, step, size_batch = _build_case(model_name, size, torch.device(device), batch)
    return model, step, size_batch


class _Synthetic:
    """Seeded synthetic inputs on `device`: every case draws its batch from one generator seeded 0."""

    def __init__(self, device: torch.device) -> None:
        self.g, self.device = torch.Generator().manual_seed(0), device

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g).to(self.device)

    def labels(self, n: int, classes: int) -> torch.Tensor:
        return torch.randint(0, classes, (n,), generator=self.g).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g).to(self.device)


def _build_case(model_name: str, size: str, device: torch.device, batch_override: int | None,
                ) -> tuple[nn.Module, Step, int]:
    data = _Synthetic(device)
    if model_name in ("dit", "mmdit", "flow"):
        cfg, batch = _generator_config(model_name, size)
        return _generator_case(model_name, cfg, batch_override or batch, data)
    if model_name == "fae":
        return _fae_case(size, batch_override, data)
    if model_name == "pixel-decoder":
        return _pixel_decoder_case(size, batch_override, data)
    raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")


def _generator_config(model_name: str, size: str) -> tuple[Any, int]:
    """The model config of a generator (dit, mmdit, flow) at `size`, and its default batch."""
    if size == "paper":
        return paper_model(model_name), 8
    if size == "tiny":
        return demo_model(model_name).model, demo_model(model_name).train.batch_size
    if model_name == "dit":
        from fae.models.dit import dit_config

        return dit_config(f"LightningDiT-{size}/1", num_classes=1000, **LATENT), 8
    if model_name == "mmdit":
        from fae.models.mmdit import mmdit_config

        return mmdit_config(size, **LATENT), 8
    from fae.models.starflow import starflow_config

    width, heads = WIDTHS[size]
    return starflow_config("small", hidden_size=width, **LATENT), 8


def _generator_case(model_name: str, cfg: Any, batch: int, data: _Synthetic) -> tuple[nn.Module, Step, int]:
    device = data.device
    x = data.randn(batch, cfg.in_channels, *cfg.input_size)
    if model_name == "dit":
        from fae.models.dit import DiT
        from fae.transport import TransportConfig, flow_matching_loss

        model: nn.Module = DiT(cfg).to(device)
        y = data.labels(batch, cfg.num_classes)
        return model, lambda: flow_matching_loss(model, x, y, TransportConfig())[0], batch
    if model_name == "mmdit":
        from fae.models.mmdit import MMDiT, TextCondition
        from fae.transport import TransportConfig, flow_matching_loss

        model = MMDiT(cfg).to(device)
        text = TextCondition(data.randn(batch, cfg.text_tokens, cfg.text_dim),
                             torch.ones(batch, cfg.text_tokens, dtype=torch.bool, device=device),
                             data.randn(batch, cfg.text_dim))
        return model, lambda: flow_matching_loss(model, x, text, TransportConfig())[0], batch
    from fae.models.starflow import StarFlow, bits_per_dim

    model = StarFlow(cfg).to(device)
    y = data.labels(batch, cfg.num_classes)
    return model, lambda: bits_per_dim(*model(x + 0.3 * torch.randn_like(x), y)).mean(), batch


def _fae_case(size: str, batch_override: int | None, data: _Synthetic) -> tuple[nn.Module, Step, int]:
    from fae.models.autoencoder import FAEConfig, FeatureAutoEncoder

    if size == "paper":
        cfg, batch = paper_model("fae"), 8
    elif size == "tiny":
        cfg, batch = demo_model("fae").model, demo_model("fae").train.batch_size
    else:
        width, heads = WIDTHS[size]
        cfg = FAEConfig(feature_dim=width, grid=(16, 16), latent_channels=32, encoder_heads=heads,
                        encoder_head_dim=64, decoder_heads=heads)
        batch = 8
    batch = batch_override or batch
    model = FeatureAutoEncoder(cfg).to(data.device)
    feats = data.randn(batch, cfg.grid[0] * cfg.grid[1], cfg.feature_dim)
    return model, lambda: F.mse_loss(model(feats)[0], feats), batch


def _pixel_decoder_case(size: str, batch_override: int | None, data: _Synthetic) -> tuple[nn.Module, Step, int]:
    from fae.models.pixel_decoder import PixelDecoder, pixel_decoder_config

    if size == "paper":
        cfg, batch = paper_model("pixel-decoder"), 8
    elif size == "tiny":
        cfg, batch = demo_model("pixel-decoder").decoder, demo_model("pixel-decoder").train.batch_size
    else:
        cfg, batch = pixel_decoder_config(size, in_dim=WIDTHS[size][0], num_tokens=256, patch_size=16), 4
    batch = batch_override or batch
    model = PixelDecoder(cfg).to(data.device)
    feats = data.randn(batch, cfg.num_tokens, cfg.in_dim)
    images = data.rand(batch, cfg.out_channels, cfg.image_size, cfg.image_size)
    return model, lambda: F.mse_loss(model(feats), images), batch


def autocast(precision: str) -> Any:
    return torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")


def timed(fn: Callable[[], Any], steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_train(model_name: str, size: str, precision: str, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, loss_fn, batch = build_case(model_name, size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast(precision):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps)
    params = sum(p.numel() for p in model.parameters())
    return {"batch": batch, "step_s": seconds, "images_per_s": batch / seconds, "params": params}


def run_sample(size: str, precision: str, sample_steps: int, repeats: int) -> dict[str, Any]:
    from fae.models.dit import DiT, dit_config
    from fae.transport import GuidanceSchedule, GuidedVelocity, SamplerConfig, sample

    torch.manual_seed(0)
    if size == "tiny":
        cfg, batch = demo_model("dit").model, 64
    else:
        cfg, batch = dit_config(f"LightningDiT-{size}/1", num_classes=1000, **LATENT), 8
    model = DiT(cfg).eval()
    guidance = GuidanceSchedule.constant(1.5)
    velocity = GuidedVelocity(model, guidance)
    noise = torch.randn(batch, cfg.in_channels, *cfg.input_size)
    y = torch.arange(batch) % cfg.num_classes
    sampler = SamplerConfig(steps=sample_steps, guidance=guidance)

    def run() -> None:
        with torch.no_grad(), autocast(precision):
            sample(velocity, noise, y, sampler)

    seconds = timed(run, repeats)
    return {"batch": batch, "run_s": seconds, "images_per_s": batch / seconds}


def child(spec: dict[str, Any]) -> None:
    """Run one case in this (fresh) process and print its result as one JSON line."""
    torch.set_num_threads(spec["threads"])
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if spec["kind"] == "train":
        result = run_train(spec["model"], spec["size"], spec["precision"], spec["steps"])
    else:
        result = run_sample(spec["size"], spec["precision"], spec["sample_steps"], spec["repeats"])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result.update(baseline_mib=baseline_kib / 1024, peak_mib=peak_kib / 1024,
                  peak_over_baseline_mib=(peak_kib - baseline_kib) / 1024)
    print("RESULT " + json.dumps({**spec, **result}))


def in_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-3000:]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--sample-sizes", nargs="*", default=["tiny", "S"], choices=SIZES)
    ap.add_argument("--sample-steps", nargs="*", type=int, default=[50, 250])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per case (after one warm-up)")
    ap.add_argument("--json", help="also write all results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="tests: tiny sizes, fp32, one timed step, 2-step sampling")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.precision, args.steps = ["tiny"], ["fp32"], 1
        args.sample_sizes, args.sample_steps = ["tiny"], [2]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}
    from fae.precision import bf16_native

    native, evidence = bf16_native("cpu")
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU {capability}, {args.threads} threads; bf16: {evidence}")
    precisions = [p for p in args.precision if p == "fp32" or native]
    train, sampling = [], []
    for model_name in args.models:
        for size in args.sizes:
            for precision in precisions:
                spec = dict(kind="train", model=model_name, size=size, precision=precision, threads=args.threads,
                            steps=args.steps)
                train.append(in_child(spec))
                print(f"  train {model_name} {size} {precision}: {train[-1]['images_per_s']:.1f} img/s, peak "
                      f"{train[-1]['peak_mib'] - train[-1]['baseline_mib']:.0f} MiB", flush=True)
                _write_partial(args.json, capability, args.threads, evidence, train, sampling)
    for size in args.sample_sizes:
        for steps in args.sample_steps:
            for precision in precisions:
                spec = dict(kind="sample", size=size, precision=precision, threads=args.threads,
                            sample_steps=steps, repeats=1)
                sampling.append(in_child(spec))
                print(f"  sample dit {size} {steps} steps {precision}: {sampling[-1]['images_per_s']:.2f} img/s, peak "
                      f"{sampling[-1]['peak_mib'] - sampling[-1]['baseline_mib']:.0f} MiB", flush=True)
                _write_partial(args.json, capability, args.threads, evidence, train, sampling)
    report = {"cpu_capability": capability, "threads": args.threads, "bf16_evidence": evidence,
              "memory": "child ru_maxrss peak minus its resident set after imports", "train": train,
              "sample": sampling}
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _write_partial(path: str | None, capability: str, threads: int, evidence: str, train: list, sampling: list) -> None:
    """The results so far, after every case: a long run stopped early keeps what it measured."""
    if path:
        Path(path).write_text(json.dumps({"cpu_capability": capability, "threads": threads, "bf16_evidence": evidence,
                                          "partial": True, "train": train, "sample": sampling}, indent=2))


def markdown(report: dict[str, Any]) -> str:
    head = f"CPU {report['cpu_capability']}, {report['threads']} threads"
    baseline = max((r["baseline_mib"] for r in report["train"] + report["sample"]), default=0.0)
    lines = [f"Train step ({head}; peak memory = child process peak RSS less its {baseline:.0f} MiB after imports)",
             "", "| stage | size | params | precision | batch | step ms | images/s | peak MiB |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in report["train"]:
        lines.append(f"| {r['model']} | {r['size']} | {r['params'] / 1e6:.1f}M | {r['precision']} | {r['batch']} | "
                     f"{1000 * r['step_s']:.0f} | {r['images_per_s']:.1f} | {r['peak_over_baseline_mib']:.0f} |")
    if report["sample"]:
        lines += ["", f"DiT sampling, guidance 1.5 in one batch, Euler ({head})", "",
                  "| size | precision | steps | batch | seconds | images/s | peak MiB |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in report["sample"]:
            lines.append(f"| {r['size']} | {r['precision']} | {r['sample_steps']} | {r['batch']} | {r['run_s']:.1f} | "
                         f"{r['images_per_s']:.2f} | {r['peak_over_baseline_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
