"""An AVX2-only CPU emulated on an AVX-512 machine, faithfully, and checked.

    python benchmarks/cpu_kinds.py            # probe native and emulated, print both, fail if the emulation did not take

Three variables are needed, one per library: ATEN_CPU_CAPABILITY=avx2 (ATen's own vectorised kernels),
ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN: its bf16 and fp32 primitives) and MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL's sgemm, ATen's
fp32 matmul). MKL ignores the first two: with only those, fae's oneDNN linears were capped but diffusers' MKL ones
were not, and the "AVX2" rows of issue 15 compared AVX2 oneDNN with AVX-512 MKL (issue 26).

Each variable is checked by what it does, in a child process: ATen's reported capability is AVX2; oneDNN's bf16
matmul becomes slower than fp32 (emulated bf16); MKL's one-thread fp32 `torch.mm` rate drops below the native one.
The last holds on Intel only: MKL dispatches its AVX-512 kernels only on Intel CPUs, so on an AMD CPU it runs the
AVX2 path natively and the variable has nothing to cap (seen on an AMD EPYC with AVX-512: 92 GFLOP/s emulated
against 94 native). There the check records the vendor instead of a drop.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

_PROBE = """
import json, time, torch
from fae.precision import cpu_matmul_timing
torch.set_num_threads(1)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
a @ b
best = min((lambda s: (a @ b, time.thread_time() - s)[1])(time.thread_time()) for _ in range(5))
t = cpu_matmul_timing()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "fp32_ms": t.fp32_ms, "bf16_ms": t.bf16_ms,
                  "mkl_gflops": 2 * 1024 ** 3 / best / 1e9}))
"""


def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...); "unknown" where /proc/cpuinfo does not say."""
    from fae.kernels import cpuinfo  # imports torch: only when asked

    return cpuinfo("vendor_id") or "unknown"


def probe(extra: dict[str, str]) -> dict:
    """What a process with `extra` on top of a clean environment (none of the three variables) sees."""
    env = {k: v for k, v in os.environ.items() if k not in AVX2}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**env, **extra}, capture_output=True, text=True,
                         check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "vendor": cpu_vendor()}


def problems(native: dict, emulated: dict) -> list[str]:
    """Why `emulated` is not a faithful AVX2-only CPU (empty: it is)."""
    found = []
    if emulated["capability"] != "AVX2":
        found.append(f"ATEN_CPU_CAPABILITY did not take: capability {emulated['capability']}")
    if not emulated["bf16_ms"] > emulated["fp32_ms"]:
        found.append(f"ONEDNN_MAX_CPU_ISA did not take: bf16 {emulated['bf16_ms']:.2f} ms is not slower than fp32 "
                     f"{emulated['fp32_ms']:.2f} ms")
    # MKL runs AVX-512 kernels only on Intel: elsewhere its native path is already the AVX2 one, nothing to drop
    mkl_caps = native["capability"] != "AVX2" and native["vendor"] == "GenuineIntel"
    if mkl_caps and not emulated["mkl_gflops"] < 0.8 * native["mkl_gflops"]:
        found.append(f"MKL_ENABLE_INSTRUCTIONS did not take: fp32 mm {emulated['mkl_gflops']:.0f} GFLOP/s against "
                     f"{native['mkl_gflops']:.0f} native")
    return found


def describe() -> str:
    """This process's CPU kind in words, for benchmark headers: capability, and whether the emulation is on."""
    on = {k: os.environ[k] for k in AVX2 if k in os.environ}
    import torch

    kind = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_vendor()} {kind}" + (f" (emulated: {' '.join(f'{k}={v}' for k, v in on.items())})" if on else " (native)")


def check_current() -> dict:
    """If this process runs under any of the three variables: all three must be set and must have taken (else
    SystemExit with the reasons). Returns the evidence, for a benchmark's JSON."""
    on = {k: os.environ[k] for k in AVX2 if k in os.environ}
    if not on:
        return {}
    if on != AVX2:
        raise SystemExit(f"a partial AVX2 emulation ({on}): set all three of {AVX2}, or none")
    native, emulated = probe({}), probe(AVX2)
    found = problems(native, emulated)
    if found:
        raise SystemExit("the AVX2 emulation did not take: " + "; ".join(found))
    return {"native": native, "emulated": emulated}


def main() -> None:
    native, emulated = probe({}), probe(AVX2)
    print(json.dumps({"native": native, "avx2": emulated}, indent=2))
    found = problems(native, emulated)
    for line in found:
        print(line, file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
