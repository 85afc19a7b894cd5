"""Running the demo: the time estimate (a calibration step scaled against a reference machine), the precision it
chose, one line per step with the time left, and the report at the end."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fae.demo.compare import COMPARE_STEPS, FLOW_COMPARE_STEPS
from fae.demo.report import step_report
from fae.demo.steps import CONFIG_DIR, FLOW_STEPS, PREREQUISITES, STEPS, DemoContext, Step
from fae.demo.text import TEXT_STEPS, step_text_report
from fae.io import atomic_write_text

# What each step took on the reference machine (2 cores, AVX2 emulated with ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2, so fp32; docs/benchmarks.md), and the calibration step there. The estimate scales them by
# how fast this machine runs the calibration step, and then by how fast the finished steps actually ran.
REFERENCE_SECONDS: dict[str, dict[str, float]] = {
    "default": {"encoder": 0.1, "fae": 40.7, "pixel-decoder": 23.8, "finetune": 27.7, "latents": 13.5, "dit": 49.2,
                "dit-raw": 59.7, "classifier": 0.1, "samples": 56.5, "probe": 26.4, "report": 3.0},
    "quick": {"encoder": 0.1, "fae": 4.7, "pixel-decoder": 1.5, "finetune": 1.5, "latents": 1.3, "dit": 0.5,
              "dit-raw": 0.7, "classifier": 0.1, "samples": 2.0, "probe": 2.4, "report": 1.4},
    # `fae demo --text` (fae.demo.text): measured on an AVX512 machine shared with other jobs (one thread, bf16),
    # divided by its calibration slowdown (2.5x)
    "text": {"encoder": 0.1, "text-data": 5.4, "fae": 18.8, "pixel-decoder": 10.4, "finetune": 8.2,
             "text-latents": 8.6, "mmdit": 97.4, "text-samples": 23.2, "report": 1.0},
    "text-quick": {"encoder": 0.1, "text-data": 4.0, "fae": 3.0, "pixel-decoder": 1.5, "finetune": 1.5,
                   "text-latents": 6.0, "mmdit": 1.0, "text-samples": 6.0, "report": 1.0},
}
# `fae demo --flow`'s own steps on the reference machine (AVX2 emulated, fp32, quiet; docs/flow.md): training from the
# measured step times (72 and 116 ms, interleaved with the DiT calibration step at 47 ms) x 800 steps; sampling timed
# (33.5 s for four rows, x 1.5 for the six since the noise-tuned decoder's rows); the noise-tuned decoder's fine-tune
# (flow-decoder) measured on an AVX-512 machine in bf16 at calibration 0.98x (docs/flow.md), not under AVX2.
FLOW_REFERENCE_SECONDS: dict[str, dict[str, float]] = {
    "default": {"flow": 60.0, "flow-raw": 95.0, "flow-decoder": 20.0, "flow-samples": 50.0},
    "quick": {"flow": 0.5, "flow-raw": 0.5, "flow-decoder": 1.5, "flow-samples": 3.0},
}
# `fae demo --compare`'s own steps (fae.demo.compare): measured under AVX2 emulation (fp32) on a run whose calibration
# step was 1.59x the reference's, divided by that (docs/benchmarks.md, 2026-12-06); the flow steps as `--flow`'s
COMPARE_REFERENCE_SECONDS: dict[str, dict[str, float]] = {
    "default": {"kl-vae": 76.0, "kl-latents": 15.0, "dit-kl": 57.0, "compare": 58.0, "flow-kl": 60.0,
                "flow-compare": 20.0},
    "quick": {"kl-vae": 2.0, "kl-latents": 1.0, "dit-kl": 0.5, "compare": 6.0, "flow-kl": 0.5, "flow-compare": 2.0},
}
REFERENCE_CALIBRATION = 0.090  # seconds per calibration step on the reference machine
BUDGET_SECONDS = {"default": 600.0, "quick": 120.0, "flow": 300.0, "text": 300.0, "text-quick": 120.0,
                  "compare": 1200.0,   # --compare: the main demo's ten minutes plus its own ten
                  "compare-flow": 1500.0}


def calibration_step_seconds(steps: int = 3) -> float:
    """Seconds per training step of the demo's DiT (batch 128, this run's precision): the yardstick the time
    estimate scales by. Runs on a private RNG, so the demo's seeded results do not depend on it."""
    import torch

    from fae.models.dit import DiT
    from fae.precision import resolve_precision
    from fae.stages import load_stage_config
    from fae.transport import flow_matching_loss

    _, cfg = load_stage_config(CONFIG_DIR / "dit.yaml", stage="dit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiT(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        latents = torch.randn(128, cfg.model.in_channels, *cfg.model.input_size)
        labels = torch.randint(0, cfg.model.num_classes, (128,))
        autocast = resolve_precision(cfg.train.precision, "cpu").autocast
        times = []
        for _ in range(steps + 1):  # the first step warms kernels up and is not counted
            begin = time.perf_counter()
            with autocast():
                loss, _ = flow_matching_loss(model, latents, labels, cfg.transport)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - begin)
    return min(times[1:])


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Forecast:
    """The demo's time estimate: reference seconds per step x how much slower this machine is."""

    def __init__(self, profile: str, calibration: float, flow: bool = False, compare: bool = False) -> None:
        self.reference = {**REFERENCE_SECONDS[profile], **(FLOW_REFERENCE_SECONDS[profile] if flow else {}),
                          **(COMPARE_REFERENCE_SECONDS[profile] if compare else {})}
        extra = "compare-flow" if compare and flow else "compare" if compare else "flow" if flow else None
        self.budget = BUDGET_SECONDS[extra if extra and profile == "default" else profile]
        self.slowdown = calibration / REFERENCE_CALIBRATION
        self.ran_reference, self.ran_actual = 0.0, 0.0

    def observe(self, step: str, seconds: float) -> None:
        self.ran_reference += self.reference.get(step, 0.0)
        self.ran_actual += seconds

    def factor(self) -> float:
        """Calibration before any step ran; the observed ratio once enough work has run to trust it."""
        return self.ran_actual / self.ran_reference if self.ran_reference >= 20 else self.slowdown

    def left(self, steps: list[str]) -> float:
        return self.factor() * sum(self.reference.get(s, 0.0) for s in steps)


def run_demo(out: str | Path | None = None, quick: bool = False, fresh: bool = False, progress: bool = True,
             precision: str = "auto", from_scratch: bool = False, text: bool = False,
             flow: bool = False, compare: bool = False) -> Path:
    """Run every demo step that is not done yet; returns the report path. `precision` is what `auto` means for
    every stage, the encoder and sampling (default: chosen from the hardware, fae.precision). `text`: the
    text-to-image demo (fae.demo.text) instead of the class-conditional one. Default folders: runs/demo,
    runs/demo-quick, runs/demo-text, runs/demo-text-quick. `flow`: instead of the DiT steps, the STARFlow comparison (its
    own budget) after the steps it needs; the report shows every finished step of the folder, so `fae demo` then
    `fae demo --flow` gives one report with both. `compare`: after the main steps, the baseline latent spaces side by
    side (fae.demo.compare: a KL autoencoder with SD-VAE's architecture beside the FAE and the raw features)."""
    from fae.precision import PRECISIONS, resolve_precision

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")
    out = Path(out) if out is not None else Path("runs/demo" + ("-text" if text else "") + ("-quick" if quick else ""))
    if quick and out == Path("runs/demo"):
        out = Path("runs/demo-quick")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved_env = os.environ.get("FAE_PRECISION")
    if precision != "auto":
        os.environ["FAE_PRECISION"] = precision
    try:
        ctx = DemoContext(out=out, quick=quick, progress=progress, from_scratch=from_scratch)
        if text:
            return _run_steps(ctx, resolve_precision("auto", "cpu"), TEXT_STEPS, step_text_report,
                              "text-quick" if quick else "text")
        if compare:
            steps = STEPS + COMPARE_STEPS + (FLOW_STEPS + FLOW_COMPARE_STEPS if flow else [])
            return _run_steps(ctx, resolve_precision("auto", "cpu"), steps, flow=flow, compare=True)
        if flow:
            return _run_steps(ctx, resolve_precision("auto", "cpu"),
                              [s for s in STEPS if s.name in PREREQUISITES] + FLOW_STEPS, flow=True)
        return _run_steps(ctx, resolve_precision("auto", "cpu"))
    finally:
        if saved_env is None:
            os.environ.pop("FAE_PRECISION", None)
        else:
            os.environ["FAE_PRECISION"] = saved_env


def _run_steps(ctx: DemoContext, choice: Any, steps: list[Step] = STEPS, report_fn: Any = step_report,
               profile: str | None = None, flow: bool = False, compare: bool = False) -> Path:
    out, profile = ctx.out, profile or ("quick" if ctx.quick else "default")
    if report_fn is step_report:  # earlier runs' results (DiT and flow), for the report
        for step in STEPS + FLOW_STEPS + COMPARE_STEPS + FLOW_COMPARE_STEPS:
            if (out / step.name / "done.json").is_file():
                ctx.results[step.name] = json.loads((out / step.name / "done.json").read_text())
    todo = [s.name for s in steps if not (out / s.name / "done.json").is_file()] + ["report"]
    forecast = Forecast(profile, calibration_step_seconds(), flow, compare)
    estimate = forecast.left(todo)
    print(f"[demo] precision: {choice.describe()}", flush=True)
    print(f"[demo] estimate: about {_minutes(estimate)} for {len(todo) - 1} of {len(steps)} steps "
          f"(this machine runs the calibration step {forecast.slowdown:.2f}x as long as the reference machine)",
          flush=True)
    if estimate > 1.5 * forecast.budget:
        hint = "" if ctx.quick else "; `fae demo --quick` is a smoke run of about " \
            f"{_minutes(forecast.slowdown * sum(REFERENCE_SECONDS['quick'].values()))}"
        print(f"[demo] this machine looks {forecast.slowdown:.1f}x slower than the one the demo's "
              f"{_minutes(forecast.budget)} budget assumes{hint}", flush=True)
    atomic_write_text(out / "machine.json", json.dumps({
        **choice.as_dict(), "cpu_capability": _cpu_capability(), "calibration_seconds": forecast.slowdown *
        REFERENCE_CALIBRATION, "slowdown_vs_reference": forecast.slowdown, "estimate_seconds": estimate}, indent=2))
    begin = time.time()
    for number, step in enumerate(steps, 1):
        marker = out / step.name / "done.json"
        head = f"[demo {number}/{len(steps)}] {step.title}"
        if marker.is_file():
            ctx.results[step.name] = json.loads(marker.read_text())
            print(f"{head}: done before ({ctx.results[step.name].get('seconds', 0):.1f} s), skipped", flush=True)
            continue
        print(f"{head} ...", flush=True)
        start = time.time()
        info = step.run(ctx)
        info["seconds"] = time.time() - start
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(info, indent=2))
        ctx.results[step.name] = info
        forecast.observe(step.name, info["seconds"])
        todo.remove(step.name)
        print(f"{head}: {info['seconds']:.1f} s; {_minutes(time.time() - begin)} so far, about "
              f"{_minutes(forecast.left(todo))} left", flush=True)
    report = Path(report_fn(ctx)["report"])
    print(f"[demo] finished in {time.time() - begin:.0f} s; report: {report.resolve()}", flush=True)
    return report


def _cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()
