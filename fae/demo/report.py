"""The demo's HTML report: an at-a-glance table, each stage's curves, grids and tables (fae.demo.html draws them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fae.demo.compare import COMPARE_STEPS, FLOW_COMPARE_STEPS, SPACES
from fae.demo.steps import FLOW_STEPS, STEPS, DemoContext


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def glance_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers of a demo run, as (metric, value) rows; missing steps are left out."""
    rows = [("total stage time (s)", _fmt(sum(float(v.get("seconds", 0)) for v in r.values()), 0))]
    if "fae" in r:
        rows.append(("FAE held-out feature cosine (x̂ vs x)", _fmt(r["fae"].get("cos"), 4)))
    if "finetune" in r:
        best = r["finetune"]["decoders"].get("finetuned(x_hat)", {})
        rows.append(("reconstruction PSNR / SSIM (image → z → image)",
                     f"{_fmt(best.get('psnr'), 2)} dB / {_fmt(best.get('ssim'), 4)}"))
    for key, label in (("fae", "FAE latents"), ("raw", "raw features")):
        for g in ("guidance", "no_guidance"):
            v = r.get("samples", {}).get(f"{key}/{g}")
            if v:
                rows.append((f"DiT on {label}, {g.replace('_', ' ')}: class-agreement / FD",
                             f"{_fmt(v['class_agreement'])} / {_fmt(v['fd_encoder'], 4)}"))
    for key, label in (("fae", "FAE latents"), ("fae-noise-tuned", "FAE latents, noise-tuned decoder"),
                       ("raw", "raw features")):
        for g in ("guidance", "no_guidance"):
            v = r.get("flow-samples", {}).get(f"{key}/{g}")
            if v:
                rows.append((f"STARFlow on {label}, {g.replace('_', ' ')}: class-agreement / FD",
                             f"{_fmt(v['class_agreement'])} / {_fmt(v['fd_encoder'], 4)}"))
    for key, label in (("flow", "FAE latents"), ("flow-raw", "raw features")):
        if "heldout_bpd" in r.get(key, {}):
            rows.append((f"STARFlow on {label}: held-out bits/dim", _fmt(r[key]["heldout_bpd"])))
    for row in r.get("probe", {}).get("rows", []):
        rows.append((f"linear probe top-1, {row['input']}", _fmt(row["top1"])))
    return rows


_ENCODER_ORIGIN = {"shipped": "came with the package (checked against its recorded SHA-256; "
                              "`fae demo --from-scratch` trains it instead)",
                   "cache": "came from the cache of an earlier --from-scratch run",
                   "trained": "was pretrained now (--from-scratch)"}


def _machine_text(out: Path) -> str:
    path = out / "machine.json"
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    how = "chosen automatically" if m["requested"] == "auto" else "requested"
    return (f"Precision: {m['precision']} ({how}; {m['reason']}). CPU capability {m['cpu_capability']}; the "
            f"calibration step ran {m['slowdown_vs_reference']:.2f}x as long as on the reference machine.")


def step_report(ctx: DemoContext) -> dict[str, Any]:
    from fae.demo.html import Report, write_report

    r, out, figs = ctx.results, ctx.out, ctx.out / "report"
    figs.mkdir(parents=True, exist_ok=True)
    sections = [_what_ran_section(r, out), _encoder_section(ctx, r, figs), _fae_section(r, out, figs)]
    if "finetune" in r:
        sections.append(_pixel_decoder_section(r, out, figs))
    if "samples" in r:
        sections.append(_samples_section(r, out, figs))
    if "flow-samples" in r:
        sections.append(_flow_section(r, out, figs))
    probe_rows = r.get("probe", {}).get("rows", [])
    if probe_rows:
        sections.append(_probe_section(r, probe_rows))
    if "compare" in r:
        sections.append(_compare_section(r, out, figs))

    sections.insert(1, _glance_section(r))
    if "pipeline" in r.get("samples", {}):
        sections.append(_serve_section(out / "pipeline"))
    report = Report("fae demo: the Feature Auto-Encoder on Fashion-MNIST, end to end on a CPU",
                    intro=["FAE (Gao et al., 2025) adapts a frozen pretrained encoder to generation: one attention "
                           "layer compresses its patch features to a small latent, a feature decoder reconstructs "
                           "them, a pixel decoder turns features into images, and a diffusion transformer learns to "
                           "generate latents. This page shows each stage at laptop scale."],
                    sections=sections)
    return {"report": str(write_report(report, out))}


def _serve_section(pipeline: str | Path) -> Any:
    from fae.demo.html import Section

    return Section(
        "Try it yourself",
        text=[f"The trained generator and its FAE are one pipeline folder. `fae serve {pipeline}` to try it: a local "
              "page (http://127.0.0.1:8765/) where you pick a class, move the guidance slider, set steps and seed, "
              "and get the images with the `fae sample` command that writes the same ones (docs/serve.md)."])


def _what_ran_section(r: dict[str, Any], out: Path) -> Any:
    from fae.demo.html import Section, Table

    return Section(
        "What ran",
        text=["Every stage below ran on this machine's CPU, in this order; times are wall-clock seconds "
              "(a stage finished by an earlier run shows that run's time).", _machine_text(out)],
        tables=[Table(["step", "what", "seconds"], [(s.name, s.title, round(r.get(s.name, {}).get("seconds", 0), 1))
                                                    for s in STEPS + FLOW_STEPS + COMPARE_STEPS + FLOW_COMPARE_STEPS
                                                    if s.name in r])])


def _glance_section(r: dict[str, Any]) -> Any:
    from fae.demo.html import Section, Table

    return Section("At a glance", tables=[Table(["metric", "value"], glance_rows(r))])


def _encoder_section(ctx: DemoContext, r: dict[str, Any], figs: Path) -> Any:
    from fae.demo.html import Figure, Section, plot_curves, read_metrics

    enc = r.get("encoder", {})
    enc_curves = [Figure(plot_curves({"pretraining": read_metrics(ctx.encoder_dir / "metrics.jsonl")},
                                     ["loss/dino", "loss/ibot"], figs / "encoder_curves.png",
                                     title="encoder pretraining (DINO + iBOT)", logy=False), "pretraining losses")] \
        if (ctx.encoder_dir / "metrics.jsonl").is_file() else []
    return Section(
        "1. A pretrained frozen encoder",
        text=["No pretrained DINOv2 can be downloaded offline, so fae ships a tiny one it pretrained itself "
              "(transformers Dinov2Model, 32 px, patch 4: 8x8 tokens of width 128) on the training images without "
              "labels, with DINOv2's objective in miniature (DINO self-distillation + iBOT masked-patch "
              f"prediction), then froze it. Here it {_ENCODER_ORIGIN.get(enc.get('origin'), 'was used')} "
              f"({enc.get('steps')} pretraining steps). The linear probes below compare it with the same "
              "architecture at random initialisation."],
        figures=enc_curves)


def _fae_section(r: dict[str, Any], out: Path, figs: Path) -> Any:
    from fae.demo.html import Figure, Section, plot_curves, read_metrics

    fae_scores = r.get("fae", {})
    return Section(
        "2. FAE stage 1: one attention layer down to a small latent, a feature decoder back up",
        text=[f"Held-out {fae_scores.get('split')} images ({fae_scores.get('images')}): feature cosine similarity "
              f"between x̂ and x {_fmt(fae_scores.get('cos'), 4)}, MSE {_fmt(fae_scores.get('mse'), 4)}."],
        figures=[Figure(plot_curves({"stage 1": read_metrics(out / "fae" / "metrics.jsonl")}, ["mse", "cos"],
                                    figs / "fae_curves.png", title="FAE stage 1", logy=False), "stage-1 curves")])


def _pixel_decoder_section(r: dict[str, Any], out: Path, figs: Path) -> Any:
    from fae.demo.html import Figure, Section, Table, plot_curves, read_metrics

    rows = [(name, _fmt(v["psnr"], 2), _fmt(v["ssim"], 4)) for name, v in r["finetune"]["decoders"].items()]
    curves = plot_curves({"Gaussian (x + noise)": read_metrics(out / "pixel-decoder" / "metrics.jsonl"),
                          "fine-tune (x̂)": read_metrics(out / "pixel-decoder-ft" / "metrics.jsonl")},
                         ["rec", "psnr"], figs / "pixel_decoder_curves.png", title="pixel decoder (training batches)",
                         logy=False)
    grid = out / "pixel-decoder-ft" / "recon_grid.png"
    return Section(
        "3. Pixel decoder: trained on noisy features, fine-tuned on x̂",
        text=["Held-out reconstructions. Columns of the grid: original, then each decoder below."],
        tables=[Table(["decoder(input)", "PSNR dB", "SSIM"], rows)],
        figures=[Figure(grid, "reconstructions"), Figure(curves, "pixel-decoder training")])


def _samples_section(r: dict[str, Any], out: Path, figs: Path) -> Any:
    from fae.demo.html import Figure, Section, Table, plot_curves, read_metrics

    s = r["samples"]
    rows = []
    for gen, label in (("fae", "FAE latents (8x8x8)"), ("raw", "raw features (8x8x128)")):
        for g in ("no_guidance", "guidance"):
            if f"{gen}/{g}" in s:
                v = s[f"{gen}/{g}"]
                rows.append((label, g.replace("_", " "), _fmt(v["class_agreement"]), _fmt(v["fd_encoder"], 4)))
    curves = plot_curves({"FAE latents": read_metrics(out / "dit" / "metrics.jsonl"),
                          "raw features": read_metrics(out / "dit-raw" / "metrics.jsonl")},
                         ["loss/main"], figs / "dit_curves.png", title="DiT flow-matching loss")
    figures = [Figure(Path(s[f"{gen}/{g}"]["grid"]), f"{gen} latents, {g.replace('_', ' ')}")
               for gen in ("fae", "raw") for g in ("guidance", "no_guidance") if f"{gen}/{g}" in s]
    scored = {label: r[run]["curve"] for run, label in (("dit", "FAE latents"), ("dit-raw", "raw features"))
              if r.get(run, {}).get("curve")}
    if scored:   # each run's eval.every rows: the paper's convergence claim in miniature
        convergence = plot_curves(scored, ["class_agreement", "fd_encoder"], figs / "dit_convergence.png",
                                  title="while training: guided class-agreement and FD (EMA weights)", logy=False)
        overhead = ", ".join(f"{label} {100 * r[run]['eval_overhead']:.1f}%" for run, label in
                             (("dit", "FAE"), ("dit-raw", "raw")) if "eval_overhead" in r.get(run, {}))
        figures.append(Figure(convergence, f"convergence (scoring cost vs training time: {overhead})"))
    return Section(
        "4. Class-conditional generation: DiT on FAE latents vs on raw features (paper Table 5 in miniature)",
        text=[f"The same DiT and training budget on the FAE latents and on the raw encoder features; "
              f"{s['num_samples']} samples each ({s['sample_steps']} Euler steps), equally many per class. "
              f"Guidance: classifier-free on all channels with schedule {s['guidance']!r} (t=1 noise, t=0 data). "
              f"Class-agreement: share of samples a small CNN trained on real images (test accuracy "
              f"{_fmt(r.get('classifier', {}).get('test_accuracy'))}) assigns to the conditioning class. "
              f"FD: Fréchet distance to the test split in the frozen encoder's feature space (mean-pooled "
              f"tokens; lower is better; half the test split against the other half gives "
              f"{_fmt(s['fd_test_half_vs_half'], 4)})."],
        tables=[Table(["generator trained on", "sampling", "class-agreement", "FD (encoder)"], rows)],
        figures=[*figures, Figure(curves, "DiT training")])


def _probe_section(r: dict[str, Any], probe_rows: list[dict[str, Any]]) -> Any:
    from fae.demo.html import Section, Table

    return Section(
        "5. Linear probes: does the latent keep the encoder's understanding?",
        text=[f"A linear classifier on frozen inputs ({r['probe']['train_images']} training images, "
              f"{r['probe']['test_images']} test images; best pooling and learning rate chosen on a held-out "
              f"part of the training images)."],
        tables=[Table(["input", "test top-1", "pooling"], [(row["input"], _fmt(row["top1"]), row["pooling"])
                                                         for row in probe_rows])])


def _flow_section(r: dict[str, Any], out: Path, figs: Path) -> Any:
    """`fae demo --flow`: the paper's STARFlow comparison (§5.3, Fig. 6) in miniature."""
    from fae.demo.html import Figure, Section, Table, plot_curves, read_metrics

    s = r["flow-samples"]
    rows = []
    for gen, run, label, path in (("fae", "flow", "FAE latents (8x8x8)", "score step, FAE decoder"),
                                  ("fae-noise-tuned", "flow", "FAE latents (8x8x8)",
                                   "no score step, noise-tuned FAE decoder"),
                                  ("raw", "flow-raw", "raw features (8x8x128)", "score step")):
        for g in ("no_guidance", "guidance"):
            if f"{gen}/{g}" in s:
                v = s[f"{gen}/{g}"]
                rows.append((label, g.replace("_", " "), path, _fmt(r.get(run, {}).get("heldout_bpd")),
                             _fmt(v["class_agreement"]), _fmt(v["fd_encoder"], 4),
                             _fmt(1000 * v["sample_seconds_per_image"], 1)))
    curves = plot_curves({"FAE latents": read_metrics(out / "flow" / "metrics.jsonl"),
                          "raw features": read_metrics(out / "flow-raw" / "metrics.jsonl")},
                         ["bpd"], figs / "flow_curves.png", title="STARFlow negative log-likelihood (bits/dim)",
                         logy=False)
    figures = [Figure(Path(s[f"{gen}/{g}"]["grid"]), f"flow on {gen} latents, {g.replace('_', ' ')}".replace(
        "fae-noise-tuned latents", "FAE latents, noise-tuned decoder"))
               for gen in ("fae", "fae-noise-tuned", "raw") for g in ("guidance", "no_guidance") if f"{gen}/{g}" in s]
    noise = r.get("flow", {}).get("noise_std")
    tuned = ("" if "flow-decoder" not in r else
             " The noise-tuned rows sample as ml-starflow does by default: no score step; the flow's noisy latents go "
             "through the FAE feature decoder fine-tuned on z plus the flow's training noise "
             f"({_fmt(r['flow-decoder'].get('seconds'), 0)} s of fine-tuning, encoder frozen), then the same pixel "
             "decoder.")
    return Section(
        "6. Normalizing flow: STARFlow on FAE latents vs on raw features (paper §5.3 in miniature)",
        text=[f"The same small STARFlow and training budget on the FAE latents and on the raw encoder features, trained "
              f"by exact maximum likelihood on latents with Gaussian noise of std {noise} added; sampled by the exact "
              f"inverse, token by token with a KV cache, then one score-based denoising step. {s['num_samples']} "
              f"samples each, equally many per class; flow guidance {s['guidance']!r} mixes each token's conditional "
              "and unconditional Gaussians. Held-out bits/dim: negative log-likelihood of latents not trained on "
              "(normalised, noisy), per dimension; the two spaces differ in size, so compare each with itself. "
              "Class-agreement and FD as in section 4." + tuned],
        tables=[Table(["flow trained on", "sampling", "noisy latents to pixels", "held-out bits/dim",
                       "class-agreement", "FD (encoder)", "ms per image"], rows)],
        figures=[*figures, Figure(curves, "flow training")])


def _compare_section(r: dict[str, Any], out: Path, figs: Path) -> Any:
    """`fae demo --compare`: every latent space under the same DiT, sampler, judge and metrics."""
    from fae.demo.html import Figure, Section, Table, plot_curves

    c = r["compare"]
    rows = []
    for space, label in SPACES.items():
        rec, probe = c["reconstruction"].get(space, {}), c["probe"].get(space, {})
        gen = [c["generation"].get(f"{space}/{g}", {}) for g in ("no_guidance", "guidance")]
        rows.append((label, _fmt(rec.get("psnr"), 2), _fmt(rec.get("fd"), 4),
                     *(f"{_fmt(v.get('class_agreement'))} / {_fmt(v.get('fd_encoder'), 4)}" for v in gen),
                     _fmt(probe.get("top1"))))
    curves = plot_curves({SPACES[s]: points for s, points in c["curves"].items() if points},
                         ["class_agreement"], figs / "compare_agreement.png",
                         title="class-agreement (guided) against DiT training step", logy=False)
    grids = [Figure(Path(c["generation"][f"{s}/guidance"]["grid"]), f"{SPACES[s]}, guided")
             for s in SPACES if f"{s}/guidance" in c["generation"]]
    tables = [Table(["latent space", "recon PSNR (dB)", "recon FD", "unguided agreement / FD",
                     "guided agreement / FD", "probe top-1"], rows)]
    flow = r.get("flow-compare")
    if flow:
        tables.append(Table(["STARFlow on", "held-out bits/dim", "unguided agreement / FD",
                             f"guided ({flow['guidance']}) agreement / FD"],
                            [(label, _fmt(flow["heldout_bpd"].get(space)),
                              *(f"{_fmt(flow.get(f'{space}/{g}', {}).get('class_agreement'))} / "
                                f"{_fmt(flow.get(f'{space}/{g}', {}).get('fd_encoder'), 4)}"
                                for g in ("no_guidance", "guidance")))
                             for space, label in SPACES.items()]))
    times = ", ".join(f"{k} {v:.0f} s" for k, v in c["seconds_by_part"].items())
    return Section(
        "7. Latent spaces side by side: FAE vs a KL-VAE (SD-VAE's architecture) vs raw features (paper Table 2 in "
        "miniature)",
        text=["Only the latent space changes: the same DiT, budget and seed, the same sampler, judge, FD network and "
              f"probe. Reconstruction: {c['recon_images']} held-out test images, image -> latent -> image (raw "
              "features: the Gaussian pixel decoder on x); FD in the frozen encoder's space. Generation: "
              f"{c['num_samples']} samples per row, unguided / guided {c['guidance']!r}, as in section 4. "
              f"Curve: guided class-agreement of each DiT's EMA weights at every kept checkpoint. Parts: {times}. "
              "With --flow, the second table: the same STARFlow on each space (section 6's sampler; bits/dim compare "
              "each space with itself only). This is an experiment at toy scale: read it as what came out, not as "
              "the paper's ranking."],
        tables=tables,
        figures=[Figure(Path(c["recon_grid"]), "reconstructions (original | fae | kl | raw)"), *grids,
                 Figure(curves, "convergence")])
