"""The margin table: every threshold the suite asserts on a trained, sampled or estimated quantity, measured over
seed offsets and CPU kernels (issue 22).

The tests marked `margin` assert through `tests/margins.py:within`, which also appends each value and its bounds
to FAE_MARGINS_OUT. This script runs those tests (`pytest -m margin`) once per seed offset (FAE_TEST_SEED_OFFSET,
tests/seeding.py) and per kernel set (native; AVX2-only emulated with all three variables), reads the values back
and prints, per asserted quantity, the bound, min / median / max and the margin: how far the worst value is from
the bound, in units of the measured spread (max - min). The rule (docs/testing.md): at least 3.

    python benchmarks/test_margins.py                      # offsets 0..4, native + avx2; writes runs/margins/
    python benchmarks/test_margins.py --offsets 0 1 --kernels native
    python benchmarks/test_margins.py --suite              # the whole suite each time (the issue's shake), not -m margin
    python benchmarks/test_margins.py --table-only         # tabulate runs/margins/*.jsonl written earlier

Each run's values land in runs/margins/<kernel>-<offset>.jsonl; a whole-suite run started by hand with
FAE_MARGINS_OUT pointing there counts the same.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {
    "native": {},
    # MKL ignores the first two: a faithful AVX2-only machine needs all three
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
REQUIRED = 3.0


def capability(env: dict[str, str]) -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


def read_values(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run(kernel: str, offset: int, out: Path, tests: list[str], suite: bool) -> dict[str, object]:
    values = out / f"{kernel}-{offset}.jsonl"
    values.unlink(missing_ok=True)
    env = {**os.environ, **KERNELS[kernel], "FAE_TEST_SEED_OFFSET": str(offset), "FAE_MARGINS_OUT": str(values)}
    start = time.time()
    which = [] if suite else ["-m", "margin"]
    done = subprocess.run([sys.executable, "-m", "pytest", *which, "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    rows = read_values(values)
    return {"kernel": kernel, "offset": offset, "rc": done.returncode, "summary": last,
            "seconds": round(time.time() - start, 1), "rows": rows,
            "failures": [line for line in done.stdout.splitlines() if line.startswith("FAILED")]}


def margin(values: list[float], lo: float | None, hi: float | None) -> float:
    """Distance of the worst value from the nearer bound, over the spread (inf when every value is equal)."""
    spread = max(values) - min(values)
    room = min(([min(values) - lo] if lo is not None else []) + ([hi - max(values)] if hi is not None else []))
    return room / spread if spread > 0 else (float("inf") if room > 0 else 0.0)


def table(runs: list[dict[str, object]]) -> tuple[str, list[dict[str, object]]]:
    found: dict[tuple[str, str], dict[str, object]] = {}
    for r in runs:
        for row in r["rows"]:  # type: ignore[union-attr]
            entry = found.setdefault((row["test"], row["quantity"]), {"lo": row["lo"], "hi": row["hi"], "values": []})
            entry["values"].append(row["value"])  # type: ignore[union-attr]
    lines = ["| test | quantity | bound | n | min | median | max | margin / spread |", "|---|---|---|---|---|---|---|---|"]
    result = []
    for (test, quantity), e in sorted(found.items()):
        v, lo, hi = e["values"], e["lo"], e["hi"]
        bound = " and ".join(([f"> {lo:g}"] if lo is not None else []) + ([f"< {hi:g}"] if hi is not None else []))
        m = margin(v, lo, hi)  # type: ignore[arg-type]
        flag = "" if m >= REQUIRED else " **(< 3)**"
        cell = quantity.replace("|", "\\|")   # markdown: a bar inside a cell is escaped
        lines.append(f"| {test.split('tests/')[-1]} | {cell} | {bound} | {len(v)} | {min(v):.4g} | "  # type: ignore
                     f"{statistics.median(v):.4g} | {max(v):.4g} | {m:.1f}{flag} |")  # type: ignore[arg-type]
        result.append({"test": test, "quantity": quantity, "lo": lo, "hi": hi, "values": v, "margin": m})
    return "\n".join(lines), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "margins")
    parser.add_argument("--suite", action="store_true", help="run the whole suite each time, not only -m margin")
    parser.add_argument("--table-only", action="store_true", help="tabulate the values already in --out")
    parser.add_argument("tests", nargs="*", help="restrict to these test paths / node ids")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for kernel in args.kernels:
        cap = capability({**os.environ, **KERNELS[kernel]})
        for offset in args.offsets:
            if args.table_only:
                rows = read_values(args.out / f"{kernel}-{offset}.jsonl")
                runs.append({"kernel": kernel, "offset": offset, "capability": cap, "rc": 0, "rows": rows,
                             "summary": f"{len(rows)} values read", "seconds": 0, "failures": []})
                continue
            r = run(kernel, offset, args.out, args.tests, args.suite)
            r["capability"] = cap
            runs.append(r)
            print(f"{kernel} ({cap}) offset {offset}: {r['summary']} in {r['seconds']} s", flush=True)
            for failure in r["failures"]:  # type: ignore[union-attr]
                print("   ", failure, flush=True)
    text, result = table(runs)
    low = [f"{r['test']} [{r['quantity']}]" for r in result if r["margin"] < REQUIRED]
    header = (f"{time.strftime('%Y-%m-%d')}, torch {__import__('torch').__version__}, offsets {args.offsets}, "
              f"kernels {', '.join(f'{r[0]} ({r[1]})' for r in dict.fromkeys((x['kernel'], x['capability']) for x in runs))}")
    print(header + "\n\n" + text)
    print(f"\n{len(result) - len(low)}/{len(result)} quantities clear their bound by >= {REQUIRED:g}x the spread"
          + (f"; below: {'; '.join(low)}" if low else ""))
    (args.out / "table.md").write_text(header + "\n\n" + text + "\n")
    (args.out / "result.json").write_text(json.dumps({"header": header, "runs": [{k: v for k, v in r.items() if k != "rows"}
                                                                                 for r in runs], "quantities": result},
                                                     indent=1))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
