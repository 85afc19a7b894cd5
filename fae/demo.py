"""`fae demo`: the method end to end on Fashion-MNIST, on a CPU, in minutes, with an HTML report.

The demo is a list of steps. Each step writes its outputs under `<out>/<step>/` and a `done.json` with its results
and time; re-running `fae demo` skips finished steps (a half-finished training step resumes from its checkpoint),
and `--fresh` starts over. `--quick` shrinks every step for smoke tests. The stage configs are the ones in
configs/demo/; PROFILES below holds the only demo-specific settings (data sizes, step counts, sampling).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from fae.checkpoint import atomic_write_text
from fae.config import PACKAGED_CONFIGS, apply_overrides, from_dict, read_yaml

CONFIG_DIR = PACKAGED_CONFIGS / "demo"

# Per-stage overrides of the configs/demo/*.yaml files, and the demo's own knobs. "default" is sized to finish in
# about ten minutes on two CPU cores (docs/benchmarks.md has the per-step times), "quick" in under two.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "encoder": [],
        "fae": ["data.limit=10000"],
        "pixel-decoder": ["data.limit=10000"],
        "finetune": ["data.limit=10000"],
        "dit": [],
        "latent_limit": 10000,
        "classifier": {"epochs": 2, "train_limit": 30000, "lr": 3e-3},
        "samples": 1000, "sample_steps": 25, "guidance": "0-0.7:6.0",
        "probe": {"train_limit": 5000, "test_limit": 2000}, "fd_reference": None,
    },
    "quick": {
        "encoder": ["data.limit=1000", "train.steps=10", "train.batch_size=32", "train.checkpoint_every=10",
                    "train.log_every=5", "optim.warmup_steps=2", "views.local_crops=0"],
        "fae": ["data.limit=512", "train.steps=60", "train.checkpoint_every=30", "train.log_every=10",
                "optim.warmup_steps=10", "eval.limit=200"],
        "pixel-decoder": ["data.limit=512", "train.steps=30", "train.checkpoint_every=30", "train.log_every=10",
                          "optim.warmup_steps=5", "eval.limit=64"],
        "finetune": ["data.limit=512", "train.steps=10", "train.checkpoint_every=10", "train.log_every=5",
                     "optim.warmup_steps=2", "eval.limit=64"],
        "dit": ["train.steps=30", "train.batch_size=64", "train.checkpoint_every=30", "train.log_every=10",
                "optim.warmup_steps=5", "model.hidden_size=64", "model.depth=2"],
        "latent_limit": 512,
        "classifier": {"epochs": 2, "train_limit": 2000, "lr": 3e-3},
        "samples": 20, "sample_steps": 4, "guidance": "0-0.7:6.0",
        "probe": {"train_limit": 500, "test_limit": 200}, "fd_reference": 1000,
    },
}


@dataclass
class DemoContext:
    out: Path
    quick: bool
    progress: bool = True
    precision: str = "auto"         # what `auto` means in this run (FAE_PRECISION, fae.precision)
    from_scratch: bool = False      # pretrain the frozen encoder and train the judge now, not the shipped ones
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def profile(self) -> dict[str, Any]:
        return PROFILES["quick" if self.quick else "default"]

    @property
    def encoder_dir(self) -> Path:
        """The frozen encoder, as the configs in configs/demo/ name it (runs/demo/encoder)."""
        return self.out / "encoder"

    @property
    def judge_dir(self) -> Path:
        return self.out / "classifier"

    def config(self, name: str, stage: str, overrides: list[str]) -> Any:
        from fae.stages import stage_module

        path = CONFIG_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"demo config {path} is missing from this installation of fae; reinstall it")
        data = apply_overrides(read_yaml(path), overrides)
        data.pop("stage", None)
        return from_dict(stage_module(stage).Config, data)

    def train(self, stage: str, config: str, folder: str, overrides: list[str]) -> Path:
        from fae.stages import train_stage

        cfg = self.config(config, stage, overrides)
        return train_stage(stage, cfg, self.out / folder, progress=self.progress)

    def data_config(self) -> Any:
        from fae.data import DataConfig

        return from_dict(DataConfig, read_yaml(CONFIG_DIR / "fae.yaml")["data"])

    def encoder_config(self) -> Any:
        from fae.encoders import EncoderConfig

        return EncoderConfig(kind="dinov2", name_or_path=str(self.encoder_dir))


@dataclass
class Step:
    name: str
    title: str
    run: Callable[[DemoContext], dict[str, Any]]


# ------------------------------------------------------------------------------------------------------------
def step_encoder(ctx: DemoContext) -> dict[str, Any]:
    """The frozen encoder: the self-supervised tiny DINOv2 that ships with fae (SHA-256 checked), or with
    --from-scratch pretrained now (cached across runs by config and data)."""
    from fae.assets import asset, manifest
    from fae.pretrain import demo_encoder

    if ctx.from_scratch:
        cfg = ctx.config("encoder_pretrain.yaml", "encoder", ctx.profile["encoder"])
        source, from_cache = demo_encoder(cfg, ctx.out / "encoder-pretrain", progress=ctx.progress)
        origin, steps, sha256 = ("cache" if from_cache else "trained"), cfg.train.steps, None
    else:
        source, origin = asset("demo-encoder"), "shipped"
        steps, sha256 = manifest("demo-encoder")["steps"], manifest("demo-encoder")["files"]["model.safetensors"]
    if ctx.encoder_dir.exists():
        shutil.rmtree(ctx.encoder_dir)
    shutil.copytree(source, ctx.encoder_dir)
    return {"encoder": str(ctx.encoder_dir), "source": str(source), "origin": origin, "steps": steps,
            "sha256": sha256}


def step_fae(ctx: DemoContext) -> dict[str, Any]:
    overrides = [f"encoder.name_or_path={ctx.encoder_dir}", f"feature_cache_dir={ctx.out / 'feature_cache'}",
                 *ctx.profile["fae"]]
    run = ctx.train("fae", "fae.yaml", "fae", overrides)
    return json.loads((run / "eval.json").read_text())


def step_pixel_decoder(ctx: DemoContext) -> dict[str, Any]:
    overrides = [f"encoder.name_or_path={ctx.encoder_dir}", f"feature_cache_dir={ctx.out / 'feature_cache'}",
                 *ctx.profile["pixel-decoder"]]
    run = ctx.train("pixel-decoder", "pixel_decoder.yaml", "pixel-decoder", overrides)
    return json.loads((run / "recon.json").read_text())


def step_finetune(ctx: DemoContext) -> dict[str, Any]:
    overrides = [f"encoder.name_or_path={ctx.encoder_dir}", f"feature_cache_dir={ctx.out / 'feature_cache'}",
                 f"finetune_from={ctx.out / 'pixel-decoder'}", f"fae={ctx.out / 'fae'}", *ctx.profile["finetune"]]
    run = ctx.train("pixel-decoder", "pixel_decoder_finetune.yaml", "pixel-decoder-ft", overrides)
    return json.loads((run / "recon.json").read_text())


def step_latents(ctx: DemoContext) -> dict[str, Any]:
    """Two caches of the training images (plain + flipped): FAE latents z and, for the baseline, raw features x."""
    from fae.data.features import FeatureCache
    from fae.data.latents import EncodeOptions, encode_latents

    data = replace(ctx.data_config(), hflip=False, limit=ctx.profile["latent_limit"])
    features = None  # stage 1's feature cache of these images (with flips), when it covers them: no encoder pass
    for candidate in sorted((ctx.out / "feature_cache").glob("*.safetensors")):
        found = FeatureCache(candidate)
        if found.has_flips and found.length == data.limit and found.encoder["name_or_path"] == str(ctx.encoder_dir):
            features = candidate
    info: dict[str, Any] = {"feature_cache": str(features) if features else None}
    for name, source in (("fae", "fae"), ("raw", "raw_features")):
        out = ctx.out / "latents" / name
        encode_latents(data, out, fae=ctx.out / "fae" / "fae", split="train", progress=ctx.progress,
                       options=EncodeOptions(source=source, shard_size=20000, batch_size=500), device="cpu",
                       feature_cache=features)
        info[name] = str(out)
    return info


def _dit(ctx: DemoContext, name: str, cache: str) -> dict[str, Any]:
    from fae.data.latents import LatentCache
    from fae.report import read_metrics

    overrides = [f"latents={cache}", f"model.in_channels={LatentCache(cache).channels}", *ctx.profile["dit"]]
    run = ctx.train("dit", "dit.yaml", name, overrides)
    rows = read_metrics(run / "metrics.jsonl")
    return {"run": str(run), "loss_first": rows[0]["loss/main"], "loss_last": rows[-1]["loss/main"]}


def step_dit(ctx: DemoContext) -> dict[str, Any]:
    return _dit(ctx, "dit", ctx.results["latents"]["fae"])


def step_dit_raw(ctx: DemoContext) -> dict[str, Any]:
    """The paper's Table 5 baseline in miniature: the same DiT budget on the raw (uncompressed) encoder features."""
    return _dit(ctx, "dit-raw", ctx.results["latents"]["raw"])


def step_classifier(ctx: DemoContext) -> dict[str, Any]:
    """The judge of class-agreement: a small CNN trained on real training images (labels used only here), shipped
    with fae (SHA-256 checked) or with --from-scratch trained now."""
    from fae.assets import asset, manifest
    from fae.checkpoint import read_bundle_config
    from fae.classifier import train_classifier

    if ctx.from_scratch:
        knobs = ctx.profile["classifier"]
        train_classifier(replace(ctx.data_config(), limit=None), ctx.judge_dir, epochs=knobs["epochs"],
                         lr=knobs["lr"], progress=ctx.progress, train_limit=knobs["train_limit"])
        origin = "trained"
    else:
        if ctx.judge_dir.exists():
            shutil.rmtree(ctx.judge_dir)
        shutil.copytree(asset("demo-judge"), ctx.judge_dir)
        knobs, origin = manifest("demo-judge"), "shipped"
    return {"test_accuracy": read_bundle_config(ctx.judge_dir)["test_accuracy"], "origin": origin,
            "epochs": knobs["epochs"], "train_images": knobs["train_limit"]}


def step_samples(ctx: DemoContext) -> dict[str, Any]:
    """Class-conditional samples from both generators, with and without guidance: class-agreement and FD to the
    test split in the frozen encoder's feature space."""
    import torch

    from fae.classifier import SmallCNN, class_agreement
    from fae.data import build_dataset
    from fae.encoders import EncoderConfig, FrozenEncoder
    from fae.metrics import EncoderNetwork, TensorSource, fid
    from fae.metrics.reference import load_reference
    from fae.sampling import generate, load_decoder, load_generator, to_uint8, write_samples
    from fae.transport import GuidanceSchedule, SamplerConfig

    p = ctx.profile
    classifier = SmallCNN.from_pretrained(ctx.judge_dir).eval()
    test = build_dataset(replace(ctx.data_config(), hflip=False, limit=p["fd_reference"]), "test")
    images = to_uint8(torch.stack([test[i]["image"] for i in range(len(test))]))
    network = EncoderNetwork(FrozenEncoder.from_config(replace(ctx.encoder_config(), precision="fp32")))  # a metric
    reference = load_reference(TensorSource(images, name="test split"), network)  # features once, for every FD
    half = len(images) // 2
    info: dict[str, Any] = {"fd_test_half_vs_half": fid(images[:half], TensorSource(images[half:]), network),
                            "fd_reference_images": len(images), "guidance": p["guidance"],
                            "num_samples": p["samples"], "sample_steps": p["sample_steps"]}
    generators = {"fae": (ctx.out / "dit", {"fae": ctx.out / "pixel-decoder-ft" / "fae_pipeline"}),
                  "raw": (ctx.out / "dit-raw", {"pixel_decoder": ctx.out / "pixel-decoder" / "pixel_decoder"})}
    guidance = {"no_guidance": GuidanceSchedule(), "guidance": GuidanceSchedule.parse(p["guidance"])}
    for gen_name, (run, decoder_paths) in generators.items():
        gen = load_generator(run)
        decode = load_decoder(gen, **decoder_paths)
        for g_name, schedule in guidance.items():
            start = time.time()
            sampler = SamplerConfig(method="euler", steps=p["sample_steps"], guidance=schedule)
            samples = generate(gen, decode, p["samples"], seed=0, labels="equal", sampler=sampler, batch_size=250,
                               progress=ctx.progress)
            folder = ctx.out / "samples" / f"{gen_name}-{g_name.replace('_', '-')}"
            write_samples(folder, samples, gen.class_names, pngs=False)
            agree = class_agreement(classifier, samples.images, samples.labels)
            info[f"{gen_name}/{g_name}"] = {
                "class_agreement": agree["agreement"], "per_class": agree["per_class"],
                "fd_encoder": fid(samples.images, reference, network),
                "grid": str(folder / "grid.png"), "seconds": round(time.time() - start, 1)}
    return info


def step_probe(ctx: DemoContext) -> dict[str, Any]:
    """Linear probes: raw features x, reconstructions x̂ and latents z, and the same encoder at random init."""
    from fae.encoders import save_tiny_encoder
    from fae.metrics.probe import run_probe

    knobs = ctx.profile["probe"]
    common = {"data_kind": "fashion_mnist", "image_size": ctx.data_config().image_size, "progress": ctx.progress,
              **knobs}
    fae_report = run_probe(fae=str(ctx.out / "fae" / "fae"), **common)
    arch = json.loads((ctx.encoder_dir / "config.json").read_text())
    random_dir = save_tiny_encoder("dinov2", ctx.out / "probe" / "random-encoder", hidden_size=arch["hidden_size"],
                                   num_layers=arch["num_hidden_layers"], num_heads=arch["num_attention_heads"],
                                   patch_size=arch["patch_size"], image_size=arch["image_size"])
    random_report = run_probe(encoder=str(random_dir), **common)
    rows = [dict(r) for r in fae_report.table]
    rows.append({**random_report.table[0], "input": "x at random initialisation (same architecture)"})
    return {"rows": rows, "train_images": knobs["train_limit"], "test_images": knobs["test_limit"]}


# ------------------------------------------------------------------------------------------------------------
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
    from fae.report import Figure, Report, Section, Table, plot_curves, read_metrics, write_report

    r, out, figs = ctx.results, ctx.out, ctx.out / "report"
    figs.mkdir(parents=True, exist_ok=True)
    sections = [Section(
        "What ran",
        text=["Every stage below ran on this machine's CPU, in this order; times are wall-clock seconds "
              "(a stage finished by an earlier run shows that run's time).", _machine_text(out)],
        tables=[Table(["step", "what", "seconds"], [(s.name, s.title, round(r.get(s.name, {}).get("seconds", 0), 1))
                                                    for s in STEPS if s.name in r])])]

    enc = r.get("encoder", {})
    enc_curves = [Figure(plot_curves({"pretraining": read_metrics(ctx.encoder_dir / "metrics.jsonl")},
                                     ["loss/dino", "loss/ibot"], figs / "encoder_curves.png",
                                     title="encoder pretraining (DINO + iBOT)", logy=False), "pretraining losses")] \
        if (ctx.encoder_dir / "metrics.jsonl").is_file() else []
    probe_rows = r.get("probe", {}).get("rows", [])
    sections.append(Section(
        "1. A pretrained frozen encoder",
        text=["No pretrained DINOv2 can be downloaded offline, so fae ships a tiny one it pretrained itself "
              "(transformers Dinov2Model, 32 px, patch 4: 8x8 tokens of width 128) on the training images without "
              "labels, with DINOv2's objective in miniature (DINO self-distillation + iBOT masked-patch "
              f"prediction), then froze it. Here it {_ENCODER_ORIGIN.get(enc.get('origin'), 'was used')} "
              f"({enc.get('steps')} pretraining steps). The linear probes below compare it with the same "
              "architecture at random initialisation."],
        figures=enc_curves))

    fae_scores = r.get("fae", {})
    sections.append(Section(
        "2. FAE stage 1: one attention layer down to a small latent, a feature decoder back up",
        text=[f"Held-out {fae_scores.get('split')} images ({fae_scores.get('images')}): feature cosine similarity "
              f"between x̂ and x {_fmt(fae_scores.get('cos'), 4)}, MSE {_fmt(fae_scores.get('mse'), 4)}."],
        figures=[Figure(plot_curves({"stage 1": read_metrics(out / "fae" / "metrics.jsonl")}, ["mse", "cos"],
                                    figs / "fae_curves.png", title="FAE stage 1", logy=False), "stage-1 curves")]))

    if "finetune" in r:
        rows = [(name, _fmt(v["psnr"], 2), _fmt(v["ssim"], 4)) for name, v in r["finetune"]["decoders"].items()]
        curves = plot_curves({"Gaussian (x + noise)": read_metrics(out / "pixel-decoder" / "metrics.jsonl"),
                              "fine-tune (x̂)": read_metrics(out / "pixel-decoder-ft" / "metrics.jsonl")},
                             ["rec", "psnr"], figs / "pixel_decoder_curves.png", title="pixel decoder (training batches)",
                             logy=False)
        grid = out / "pixel-decoder-ft" / "recon_grid.png"
        sections.append(Section(
            "3. Pixel decoder: trained on noisy features, fine-tuned on x̂",
            text=["Held-out reconstructions. Columns of the grid: original, then each decoder below."],
            tables=[Table(["decoder(input)", "PSNR dB", "SSIM"], rows)],
            figures=[Figure(grid, "reconstructions"), Figure(curves, "pixel-decoder training")]))

    if "samples" in r:
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
        sections.append(Section(
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
            figures=[*figures, Figure(curves, "DiT training")]))

    if probe_rows:
        sections.append(Section(
            "5. Linear probes: does the latent keep the encoder's understanding?",
            text=[f"A linear classifier on frozen inputs ({r['probe']['train_images']} training images, "
                  f"{r['probe']['test_images']} test images; best pooling and learning rate chosen on a held-out "
                  f"part of the training images)."],
            tables=[Table(["input", "test top-1", "pooling"], [(row["input"], _fmt(row["top1"]), row["pooling"])
                                                             for row in probe_rows])]))

    sections.insert(1, Section("At a glance", tables=[Table(["metric", "value"], glance_rows(r))]))
    report = Report("fae demo: the Feature Auto-Encoder on Fashion-MNIST, end to end on a CPU",
                    intro=["FAE (Gao et al., 2025) adapts a frozen pretrained encoder to generation: one attention "
                           "layer compresses its patch features to a small latent, a feature decoder reconstructs "
                           "them, a pixel decoder turns features into images, and a diffusion transformer learns to "
                           "generate latents. This page shows each stage at laptop scale."],
                    sections=sections)
    return {"report": str(write_report(report, out))}


STEPS = [
    Step("encoder", "the frozen encoder (self-supervised tiny DINOv2)", step_encoder),
    Step("fae", "FAE stage 1 (feature reconstruction)", step_fae),
    Step("pixel-decoder", "pixel decoder on noisy features", step_pixel_decoder),
    Step("finetune", "pixel decoder fine-tuned on x̂", step_finetune),
    Step("latents", "latent caches (FAE z and raw x)", step_latents),
    Step("dit", "DiT on FAE latents", step_dit),
    Step("dit-raw", "DiT on raw features (baseline)", step_dit_raw),
    Step("classifier", "judge classifier on real images", step_classifier),
    Step("samples", "sampling and generation metrics", step_samples),
    Step("probe", "linear probes", step_probe),
]


# What each step took on the reference machine (2 cores, AVX2 emulated with ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2, so fp32; docs/benchmarks.md), and the calibration step there. The estimate scales them by
# how fast this machine runs the calibration step, and then by how fast the finished steps actually ran.
REFERENCE_SECONDS: dict[str, dict[str, float]] = {
    "default": {"encoder": 0.1, "fae": 40.7, "pixel-decoder": 23.8, "finetune": 27.7, "latents": 13.5, "dit": 49.2,
                "dit-raw": 59.7, "classifier": 0.1, "samples": 56.5, "probe": 26.4, "report": 3.0},
    "quick": {"encoder": 0.1, "fae": 4.7, "pixel-decoder": 1.5, "finetune": 1.5, "latents": 1.3, "dit": 0.5,
              "dit-raw": 0.7, "classifier": 0.1, "samples": 2.0, "probe": 2.4, "report": 1.4},
}
REFERENCE_CALIBRATION = 0.090  # seconds per calibration step on the reference machine
BUDGET_SECONDS = {"default": 600.0, "quick": 120.0}


def calibration_step_seconds(steps: int = 3) -> float:
    """Seconds per training step of the demo's DiT (batch 128, this run's precision): the yardstick the time
    estimate scales by. Runs on a private RNG, so the demo's seeded results do not depend on it."""
    import torch

    from fae.dit import DiT
    from fae.precision import resolve_precision
    from fae.stages import stage_module
    from fae.transport import flow_matching_loss

    data = read_yaml(CONFIG_DIR / "dit.yaml")
    data.pop("stage", None)
    cfg = from_dict(stage_module("dit").Config, data)
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

    def __init__(self, profile: str, calibration: float) -> None:
        self.reference = REFERENCE_SECONDS[profile]
        self.budget = BUDGET_SECONDS[profile]
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


def run_demo(out: str | Path = "runs/demo", quick: bool = False, fresh: bool = False, progress: bool = True,
             precision: str = "auto", from_scratch: bool = False) -> Path:
    """Run every demo step that is not done yet; returns the report path. `precision` is what `auto` means for
    every stage, the encoder and sampling (default: chosen from the hardware, fae.precision)."""
    import os

    from fae.precision import PRECISIONS, resolve_precision

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")
    out = Path(out)
    if quick and out == Path("runs/demo"):
        out = Path("runs/demo-quick")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved_env = os.environ.get("FAE_PRECISION")
    if precision != "auto":
        os.environ["FAE_PRECISION"] = precision
    try:
        return _run_steps(DemoContext(out=out, quick=quick, progress=progress, precision=precision,
                                      from_scratch=from_scratch), resolve_precision("auto", "cpu"))
    finally:
        if saved_env is None:
            os.environ.pop("FAE_PRECISION", None)
        else:
            os.environ["FAE_PRECISION"] = saved_env


def _run_steps(ctx: DemoContext, choice: Any) -> Path:
    out, profile = ctx.out, "quick" if ctx.quick else "default"
    todo = [s.name for s in STEPS if not (out / s.name / "done.json").is_file()] + ["report"]
    forecast = Forecast(profile, calibration_step_seconds())
    estimate = forecast.left(todo)
    print(f"[demo] precision: {choice.describe()}", flush=True)
    print(f"[demo] estimate: about {_minutes(estimate)} for {len(todo) - 1} of {len(STEPS)} steps "
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
    for number, step in enumerate(STEPS, 1):
        marker = out / step.name / "done.json"
        head = f"[demo {number}/{len(STEPS)}] {step.title}"
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
    report = Path(step_report(ctx)["report"])
    print(f"[demo] finished in {time.time() - begin:.0f} s; report: {report.resolve()}", flush=True)
    return report


def _cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, fresh=args.fresh, progress=not args.no_progress, precision=args.precision,
             from_scratch=args.from_scratch)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from fae.precision import PRECISIONS

    p = sub.add_parser("demo", help="run FAE end to end on Fashion-MNIST on CPU and write an HTML report",
                       description="Run the embedded default: FAE on Fashion-MNIST, on CPU, offline. Finished steps "
                       "are skipped on a re-run; --fresh starts over.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo, runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a much smaller run for smoke tests (under two minutes)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto (default): bf16 where this CPU runs it natively, else fp32")
    p.add_argument("--from-scratch", action="store_true",
                   help="pretrain the frozen encoder and train the judge classifier now (a few minutes more) instead "
                   "of using the copies fae ships")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
