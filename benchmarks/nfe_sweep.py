"""Quality against cost: each sampler at a few network-evaluation budgets on the demo's FAE DiT (issue 28).

    PYTHONPATH=. python benchmarks/nfe_sweep.py --demo runs/demo      # from the folder holding runs/demo

For every sampler (Euler, Heun, Euler-Maruyama, DPM-Solver++(2M) at NFE 8/16/25/50/250; dopri5 at a few
tolerances, whose NFE it chooses itself), it samples `--samples` images (sample i: class i mod 10, noise from
(seed, i), as `fae sample` does) with the demo's guidance, decodes them with the demo's pixel decoder, and measures
them as the demo does (fae.demo.steps): class agreement by the shipped judge and FD to the test split in the frozen
encoder's feature space. Also: each sample's latent RMS distance to the most accurate ODE result (Heun at the largest
budget), which says how far a sampler is from its own converged answer. Writes a JSON and a PNG (class agreement and
FD against NFE). NFE counts velocity evaluations per sample: a guided evaluation is one (two network calls inside the
guidance interval). Heun takes 2 per step, so its budget n means n // 2 steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fae.demo.steps import DemoContext, _scoring
from fae.generators import load_generator
from fae.grid import to_uint8_hwc
from fae.metrics import fid
from fae.metrics.judge import class_agreement
from fae.sampling import load_decoder
from fae.transport import GuidanceSchedule, SamplerConfig, initial_noise, sample_generators

FIXED = ("euler", "heun", "euler_maruyama", "dpmpp_2m")
TOLERANCES = ((1e-1, 1e-4), (1e-2, 1e-4), (1e-3, 1e-6))   # (rtol, atol); SiT's default is the last one


def settings(budgets: list[int], guidance: GuidanceSchedule) -> list[tuple[str, str, SamplerConfig]]:
    """(sampler, label, config) for every point of the sweep."""
    out = []
    for method in FIXED:
        for n in budgets:
            steps = max(1, n // 2) if method == "heun" else n
            out.append((method, f"{method} NFE {n}", SamplerConfig(method=method, steps=steps,  # type: ignore[arg-type]
                                                                   guidance=guidance, cfg_batch="separate")))
    for rtol, atol in TOLERANCES:
        out.append(("dopri5", f"dopri5 rtol {rtol:g}", SamplerConfig(method="dopri5", rtol=rtol, atol=atol,
                                                                    guidance=guidance, cfg_batch="separate")))
    return out


def run_one(gen: Any, decode: Any, sampler: SamplerConfig, num: int, batch: int, seed: int) -> dict[str, Any]:
    latents, images, nfe = [], [], []
    labels = torch.arange(num) % gen.num_classes
    start = time.perf_counter()
    for first in range(0, num, batch):
        idx = list(range(first, min(num, first + batch)))
        gens = sample_generators(seed, idx)
        info: dict[str, Any] = {}
        z = gen.sample(initial_noise((len(idx), *gen.latent_shape), gens), labels[idx], sampler, gens, info=info)
        latents.append(z)
        images.append(to_uint8_hwc(decode(z)))
        nfe.append(info["nfe"])
    seconds = time.perf_counter() - start
    return {"latents": torch.cat(latents), "images": np.concatenate(images), "labels": labels.numpy(),
            "nfe": torch.cat(nfe).float(), "seconds": seconds}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"class_agreement": "class agreement (judge) - higher is better",
              "fd_encoder": "FD (frozen encoder) - lower is better",
              "latent_rms_to_reference": "latent RMS to the converged ODE sample"}
    keys = [k for k in panels if all(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2))
    for method in (*FIXED, "dopri5"):
        mine = sorted((r for r in rows if r["sampler"] == method), key=lambda r: r["nfe_mean"])
        style = "o:" if method == "dopri5" else "o-"
        for ax, key in zip(axes, keys, strict=True):
            points = [(r["nfe_mean"], r[key]) for r in mine if key != "latent_rms_to_reference" or r[key] > 0]
            ax.plot(*zip(*points, strict=True), style, label=method)
    if "latent_rms_to_reference" in keys:
        axes[keys.index("latent_rms_to_reference")].set_yscale("log")
    for ax, name in zip(axes, [panels[k] for k in keys], strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("NFE per sample (velocity evaluations)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _title(report: dict[str, Any]) -> str:
    return (f"demo FAE DiT, {report['samples']} samples, guidance {report['guidance']}, "
            f"CPU {report['machine']['cpu_capability']}, fp32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo", help="a finished `fae demo` folder (read only)")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--nfe", default="8,16,25,50,250")
    ap.add_argument("--guidance", default="0-0.7:6.0", help="the demo's guidance by default")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/images/nfe_sweep.json")
    ap.add_argument("--plot", default="docs/images/nfe_sweep.png")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the JSON at --out")
    args = ap.parse_args()
    if args.replot:
        report = json.loads(Path(args.out).read_text())
        plot(report["rows"], Path(args.plot), _title(report))
        return

    demo = Path(args.demo)
    budgets = [int(n) for n in args.nfe.split(",")]
    guidance = GuidanceSchedule.parse(args.guidance)
    ctx = DemoContext(out=demo, quick=False, progress=False)
    scoring = _scoring(ctx)
    gen = load_generator(demo / "dit")
    decode = load_decoder(gen, fae=demo / "pixel-decoder-ft" / "tokenizer")
    rows: list[dict[str, Any]] = []
    results = {}
    with torch.inference_mode():
        for method, label, sampler in settings(budgets, guidance):
            r = run_one(gen, decode, sampler, args.samples, args.batch_size, args.seed)
            agree = class_agreement(scoring["classifier"], r["images"], r["labels"])
            rows.append({"sampler": method, "label": label, "steps": sampler.steps if method != "dopri5" else None,
                         "rtol": sampler.rtol if method == "dopri5" else None,
                         "atol": sampler.atol if method == "dopri5" else None,
                         "nfe_mean": float(r["nfe"].mean()), "nfe_max": float(r["nfe"].max()),
                         "class_agreement": agree["agreement"],
                         "fd_encoder": fid(r["images"], scoring["reference"], scoring["network"]),
                         "seconds": round(r["seconds"], 2)})
            results[label] = r["latents"]
            print(json.dumps(rows[-1]), flush=True)
    reference = f"heun NFE {max(budgets)}"
    if reference in results:
        for row in rows:
            diff = (results[row["label"]] - results[reference]).flatten(1)
            row["latent_rms_to_reference"] = float(diff.pow(2).mean(1).sqrt().mean())
    report = {
        "what": "class agreement (shipped judge) and FD (frozen encoder features, test split) against NFE on the "
                "demo's FAE DiT, benchmarks/nfe_sweep.py",
        "demo": str(demo), "samples": args.samples, "labels": "sample i: class i mod 10", "seed": args.seed,
        "guidance": args.guidance, "reference_for_latent_rms": reference,
        "fd_test_half_vs_half": scoring["info"]["fd_test_half_vs_half"],
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "precision": "fp32 (sampling and decoding; the integration is fp32 in any case)",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, Path(args.plot), _title(report))
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
