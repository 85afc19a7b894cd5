"""`fae demo` (and the test suite) on both kinds of CPU: native bf16 and AVX2-only, emulated on one machine with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 (benchmarks/cpu_kinds.py: one variable
per library, each checked). Prints a markdown table: each demo step's seconds for each CPU capability x precision,
and the demo's metrics.

    .venv/bin/python benchmarks/demo_cpu_kinds.py --out /tmp/kinds                  # every kind, full demo
    .venv/bin/python benchmarks/demo_cpu_kinds.py --out /tmp/kinds --quick --tests  # quick demo + pytest timing
    .venv/bin/python benchmarks/demo_cpu_kinds.py --collect /tmp/kinds/*            # table of finished runs

Each run gets a fresh output folder and a fresh FAE_CACHE, so nothing is reused between kinds (kernel verdicts
included). First it checks that each of the three variables took effect (cpu_kinds.problems): ATen's capability,
oneDNN's bf16 matmul slower than fp32, MKL's fp32 mm rate below the native one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cpu_kinds import AVX2, probe, problems  # benchmarks/ is on sys.path when this script runs

# name -> (extra environment, fae demo --precision)
KINDS = {
    "native-auto": ({}, "auto"),
    "native-fp32": ({}, "fp32"),
    "avx2-auto": (AVX2, "auto"),
}


def environment(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("FAE_PRECISION", None)
    return env


def matmul_check(extra: dict[str, str], native: dict) -> dict:
    """The kind's probe; an emulation that did not take stops the benchmark before any demo runs."""
    check = probe(extra)
    found = problems(native, check) if extra else []
    if found:
        raise SystemExit(f"{extra}: " + "; ".join(found))
    return check


def run_demo(folder: Path, extra: dict[str, str], precision: str, quick: bool) -> float:
    env = environment({**extra, "FAE_CACHE": str(folder / "cache")})
    cmd = [sys.executable, "-m", "fae.cli", "demo", "--out", str(folder / "demo"), "--fresh", "--no-progress",
           "--precision", precision, *(["--quick"] if quick else [])]
    begin = time.time()
    subprocess.run(cmd, env=env, check=True)
    return time.time() - begin


def run_tests(extra: dict[str, str]) -> float:
    begin = time.time()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], env=environment(extra),
                   check=True, cwd=Path(__file__).resolve().parents[1])
    return time.time() - begin


def collect(folder: Path) -> dict:
    demo = folder / "demo" if (folder / "demo").is_dir() else folder
    steps = {}
    for done in sorted(demo.glob("*/done.json")):
        steps[done.parent.name] = json.loads(done.read_text())
    machine = json.loads((demo / "machine.json").read_text())
    extra = json.loads((folder / "benchmark.json").read_text()) if (folder / "benchmark.json").is_file() else {}
    return {"name": folder.name, "machine": machine, "steps": steps, **extra}


def table(runs: list[dict]) -> str:
    from fae.demo import STEPS

    head = "| step | " + " | ".join(f"{r['machine']['cpu_capability']} {r['machine']['precision']}"
                                     f" ({r['name']})" for r in runs) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    for step in STEPS:
        lines.append(f"| {step.name} | " + " | ".join(f"{r['steps'].get(step.name, {}).get('seconds', float('nan')):.1f}"
                                                      for r in runs) + " |")
    lines.append("| **demo wall-clock** | " + " | ".join(f"**{r.get('seconds', float('nan')):.0f}**" for r in runs)
                 + " |")
    metrics = [("FAE held-out cosine", lambda s: s["fae"]["cos"]),
               ("PSNR image→z→image (dB)", lambda s: s["finetune"]["decoders"]["finetuned(x_hat)"]["psnr"]),
               ("FAE DiT guided: agreement", lambda s: s["samples"]["fae/guidance"]["class_agreement"]),
               ("FAE DiT guided: FD", lambda s: s["samples"]["fae/guidance"]["fd_encoder"]),
               ("FAE DiT unguided: agreement", lambda s: s["samples"]["fae/no_guidance"]["class_agreement"]),
               ("FAE DiT unguided: FD", lambda s: s["samples"]["fae/no_guidance"]["fd_encoder"]),
               ("raw DiT guided: agreement", lambda s: s["samples"]["raw/guidance"]["class_agreement"]),
               ("raw DiT guided: FD", lambda s: s["samples"]["raw/guidance"]["fd_encoder"]),
               ("raw DiT unguided: agreement", lambda s: s["samples"]["raw/no_guidance"]["class_agreement"]),
               ("raw DiT unguided: FD", lambda s: s["samples"]["raw/no_guidance"]["fd_encoder"])]
    for label, get in metrics:
        values = []
        for r in runs:
            try:
                values.append(f"{get(r['steps']):.3f}")
            except KeyError:
                values.append("–")
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    if any("tests_seconds" in r for r in runs):
        lines.append("| test suite (s) | " + " | ".join(f"{r['tests_seconds']:.0f}" if "tests_seconds" in r else "–"
                                                     for r in runs) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the runs (one sub-folder per kind)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--quick", action="store_true", help="fae demo --quick instead of the full demo")
    parser.add_argument("--tests", action="store_true", help="also time the test suite in each environment")
    parser.add_argument("--collect", nargs="+", type=Path, help="only print the table of these finished runs")
    args = parser.parse_args()
    if args.collect:
        print(table([collect(f) for f in args.collect]))
        return
    if args.out is None:
        parser.error("--out is required unless --collect is given")
    runs = []
    native = probe({})
    for name in args.kinds:
        extra, precision = KINDS[name]
        check = matmul_check(extra, native)
        print(f"[{name}] {check}", file=sys.stderr, flush=True)
        folder = args.out / name
        record = {"matmul": check, "seconds": run_demo(folder, extra, precision, args.quick)}
        if args.tests:
            record["tests_seconds"] = run_tests(extra)
        (folder / "benchmark.json").write_text(json.dumps(record, indent=2))
        runs.append(collect(folder))
    print(table(runs))


if __name__ == "__main__":
    main()
