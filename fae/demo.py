"""`fae demo`: the method end to end on Fashion-MNIST, on a CPU, in minutes, with an HTML report.

The demo is a list of steps. Each step writes its outputs under `<out>/<step>/` and a `done.json` with its time;
re-running `fae demo` skips finished steps (a half-finished training step resumes from its checkpoint), and
`--fresh` starts over. `--quick` shrinks every step for smoke tests.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fae.checkpoint import atomic_write_text
from fae.config import apply_overrides, from_dict, read_yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"


@dataclass
class DemoContext:
    out: Path
    quick: bool
    progress: bool = True
    results: dict[str, Any] = field(default_factory=dict)

    def config(self, name: str, stage: str, overrides: list[str]) -> Any:
        from fae.stages import stage_module

        path = CONFIG_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"demo config {path} is missing (run fae demo from a checkout of the repository)")
        data = apply_overrides(read_yaml(path), overrides)
        data.pop("stage", None)
        return from_dict(stage_module(stage).Config, data)


@dataclass
class Step:
    name: str
    title: str
    run: Callable[[DemoContext], dict[str, Any]]


# ------------------------------------------------------------------------------------------------------------
def step_encoder(ctx: DemoContext) -> dict[str, Any]:
    """The frozen encoder: the demo's self-supervised tiny DINOv2 when fae.pretrain is available."""
    folder = ctx.out / "encoder"
    try:
        from fae.pretrain import pretrain_demo_encoder  # type: ignore[attr-defined]
    except ImportError:
        pretrain_demo_encoder = None
    if pretrain_demo_encoder is not None:
        return pretrain_demo_encoder(folder, quick=ctx.quick, progress=ctx.progress)
    from fae.encoders import save_tiny_encoder

    save_tiny_encoder("dinov2", folder, hidden_size=128, num_layers=4, num_heads=4, patch_size=4, image_size=32)
    return {"encoder": str(folder), "pretrained": False,
            "note": "randomly initialised tiny DINOv2 (self-supervised pretraining is not part of this build yet)"}


def step_fae(ctx: DemoContext) -> dict[str, Any]:
    from fae.stages import train_stage

    overrides = [f"encoder.name_or_path={ctx.out / 'encoder'}", f"feature_cache_dir={ctx.out / 'feature_cache'}"]
    if ctx.quick:
        overrides += ["data.limit=512", "train.steps=40", "train.batch_size=64", "train.checkpoint_every=20",
                      "train.log_every=10", "optim.warmup_steps=10", "eval.limit=200"]
    else:
        overrides += ["data.limit=10000", "train.steps=400"]
    cfg = ctx.config("fae.yaml", "fae", overrides)
    run = train_stage("fae", cfg, ctx.out / "fae", progress=ctx.progress)
    return json.loads((run / "eval.json").read_text())


def step_report(ctx: DemoContext) -> dict[str, Any]:
    from fae.report import Figure, Report, Section, Table, plot_curves, read_metrics, write_report

    timings = [(name, info.get("seconds", 0.0)) for name, info in ctx.results.items()]
    sections = [Section("What ran", text=["Each stage below ran on this machine's CPU; times are wall-clock."],
                        tables=[Table(["stage", "seconds"], [(n, round(s, 1)) for n, s in timings])])]
    enc = ctx.results.get("encoder", {})
    sections.append(Section("Frozen encoder", text=[enc.get("note", "") or
                                                    f"Self-supervised tiny DINOv2 in {enc.get('encoder')}"]))
    rows = read_metrics(ctx.out / "fae" / "metrics.jsonl")
    curves = plot_curves({"stage 1": rows}, ["mse", "cos"], ctx.out / "report" / "fae_curves.png",
                         title="FAE stage 1 (feature reconstruction)", logy=False)
    scores = ctx.results.get("fae", {})
    sections.append(Section(
        "FAE stage 1: one attention layer + feature decoder",
        text=[f"Held-out {scores.get('split')} images: {scores.get('images')}; feature cosine similarity between x̂ "
              f"and x: {scores.get('cos', float('nan')):.4f}; MSE {scores.get('mse', float('nan')):.4g}."],
        figures=[Figure(curves, "stage-1 training curves")]))
    report = Report("fae demo: Feature Auto-Encoder on Fashion-MNIST",
                    intro=["FAE adapts a frozen encoder's patch features into a small latent with one attention "
                           "layer and reconstructs them with a 6-layer-style feature decoder."],
                    sections=sections)
    path = write_report(report, ctx.out)
    return {"report": str(path)}


STEPS = [
    Step("encoder", "frozen encoder", step_encoder),
    Step("fae", "FAE stage 1", step_fae),
]


def run_demo(out: str | Path = "runs/demo", quick: bool = False, fresh: bool = False, progress: bool = True) -> Path:
    """Run every demo step that is not done yet; returns the report path."""
    out = Path(out)
    if quick and out == Path("runs/demo"):
        out = Path("runs/demo-quick")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out=out, quick=quick, progress=progress)
    for step in STEPS:
        marker = out / step.name / "done.json"
        if marker.is_file():
            ctx.results[step.name] = json.loads(marker.read_text())
            print(f"[demo] {step.title}: done before ({ctx.results[step.name].get('seconds', 0):.1f} s), skipped")
            continue
        print(f"[demo] {step.title} ...", flush=True)
        start = time.time()
        info = step.run(ctx)
        info["seconds"] = time.time() - start
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(info, indent=2))
        ctx.results[step.name] = info
        print(f"[demo] {step.title}: {info['seconds']:.1f} s", flush=True)
    report = Path(step_report(ctx)["report"])
    total = sum(float(r.get("seconds", 0)) for r in ctx.results.values())
    print(f"[demo] finished in {total:.0f} s of stage time; report: {report.resolve()}")
    return report


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, fresh=args.fresh, progress=not args.no_progress)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run FAE end to end on Fashion-MNIST on CPU and write an HTML report",
                       description="Run the embedded default: FAE on Fashion-MNIST, on CPU, offline. Finished steps "
                       "are skipped on a re-run; --fresh starts over.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo, runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a much smaller run for smoke tests")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
