"""`fae demo`: the method end to end on Fashion-MNIST, on a CPU, in minutes, with an HTML report.

The demo is a list of steps. Each step writes its outputs under `<out>/<step>/` and a `done.json` with its results
and time; re-running `fae demo` skips finished steps (a half-finished training step resumes from its checkpoint),
and `--fresh` starts over. `--quick` shrinks every step for smoke tests. The stage configs are the ones in
configs/demo/; PROFILES below holds the only demo-specific settings (data sizes, step counts, sampling).
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fae.config import PACKAGED_CONFIGS, from_dict, yaml_section
from fae.data.loading import num_items

CONFIG_DIR = PACKAGED_CONFIGS / "demo"

# Per-stage overrides of the configs/demo/*.yaml files, and the demo's own knobs. "default" is sized to finish in
# about ten minutes on two CPU cores (docs/benchmarks.md has the per-step times), "quick" in under two.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "encoder": [],
        "fae": [],              # the configs hold the default demo's data limit (10000) and feature cache folder
        "pixel-decoder": [],
        "finetune": [],
        "dit": [],
        # every DiT scores itself while it trains (eval.every; the report's convergence curve): guided class agreement
        # and FD of 200 samples from 10 Euler steps, ~1 s per evaluation (docs/benchmarks.md)
        "dit_eval": ["eval.every=250", "eval.num_samples=200", "eval.steps=10", "eval.guidance=0-0.7:6.0"],
        "latent_limit": 10000,
        "classifier": {"epochs": 2, "train_limit": 30000, "lr": 3e-3},
        "samples": 1000, "sample_steps": 25, "guidance": "0-0.7:6.0",
        "probe": {"train_limit": 5000, "test_limit": 2000}, "fd_reference": None,
        "flow": [], "flow_samples": 1000, "flow_guidance": "2.0",
        # the FAE feature decoder fine-tuned on the flow's noisy latents (STARFlow's sampling path), after the flow
        # (600 steps at 1e-3 beat 300 at 3e-4 unguided, 0.721 / 0.557 against 0.711 / 0.656: docs/flow.md)
        "flow_decoder": ["train.steps=600", "train.checkpoint_every=600", "optim.lr=1.0e-3", "optim.warmup_steps=10",
                         "eval.limit=500"],
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
        "dit_eval": ["eval.every=30", "eval.num_samples=20", "eval.steps=4", "eval.guidance=0-0.7:6.0",
                     "eval.batch_size=20"],
        "latent_limit": 512,
        "classifier": {"epochs": 2, "train_limit": 2000, "lr": 3e-3},
        "samples": 20, "sample_steps": 4, "guidance": "0-0.7:6.0",
        "probe": {"train_limit": 500, "test_limit": 200}, "fd_reference": 1000,
        "flow": ["train.steps=20", "train.checkpoint_every=20", "train.log_every=10", "optim.warmup_steps=5",
                 "model.hidden_size=32", "model.layers_per_block=[1,1]", "holdout=64"],
        "flow_samples": 20, "flow_guidance": "2.0",
        "flow_decoder": ["train.steps=10", "train.checkpoint_every=10", "train.log_every=5", "optim.warmup_steps=2",
                         "eval.limit=64"],
    },
}


@dataclass
class DemoContext:
    out: Path
    quick: bool
    progress: bool = True
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
        from fae.stages import load_stage_config

        path = CONFIG_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"demo config {path} is missing from this installation of fae; reinstall it")
        return load_stage_config(path, overrides, stage=stage)[1]

    def train(self, stage: str, config: str, folder: str, overrides: list[str]) -> Path:
        from fae.stages import train_stage

        cfg = self.config(config, stage, overrides)
        return train_stage(stage, cfg, self.out / folder, progress=self.progress)

    def data_config(self) -> Any:
        from fae.data import DataConfig

        return from_dict(DataConfig, yaml_section(CONFIG_DIR / "fae.yaml", "data"))

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
    from fae.stages.encoder import demo_encoder

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
    from fae.encoding import EncodeOptions, encode_latents

    data = replace(ctx.data_config(), hflip=False, limit=ctx.profile["latent_limit"])
    features = None  # stage 1's feature cache of these images (with flips), when it covers them: no encoder pass
    for candidate in sorted((ctx.out / "feature_cache").glob("*.safetensors")):
        found = FeatureCache(candidate)
        same_encoder = Path(found.encoder["name_or_path"]).resolve() == ctx.encoder_dir.resolve()
        if found.has_flips and found.length == data.limit and same_encoder:
            features = candidate
    info: dict[str, Any] = {"feature_cache": str(features) if features else None}
    sources: tuple[tuple[str, Literal["fae", "raw_features"]], ...] = (("fae", "fae"), ("raw", "raw_features"))
    for name, source in sources:
        out = ctx.out / "latents" / name
        encode_latents(data, out, fae=ctx.out / "fae" / "fae", split="train", progress=ctx.progress,
                       options=EncodeOptions(source=source, shard_size=20000, batch_size=500), device="cpu",
                       feature_cache=features)
        info[name] = str(out)
    return info


def _test_images(ctx: DemoContext) -> Any:
    """The test split the generators are measured against (`fd_reference` images), uint8 (N,H,W,3)."""
    import torch

    from fae.data import build_dataset
    from fae.grid import to_uint8_hwc

    test = build_dataset(replace(ctx.data_config(), hflip=False, limit=ctx.profile["fd_reference"]), "test")
    return to_uint8_hwc(torch.stack([test[i]["image"] for i in range(num_items(test))]))


def reference_file(ctx: DemoContext) -> Path:
    """The test split's statistics in the frozen encoder's feature space (fp32), written once: what the DiT runs'
    in-training FD is measured against."""
    import hashlib

    from fae.metrics import TensorSource
    from fae.metrics.networks import build_network
    from fae.metrics.reference import save_reference

    # named by the encoder's folder, which the statistics record: a demo folder copied elsewhere makes its own
    where = hashlib.sha256(str(ctx.encoder_dir.resolve()).encode()).hexdigest()[:12]
    path = ctx.out / "reference" / f"test-{where}.npz"
    if not path.is_file():
        save_reference(path, TensorSource(_test_images(ctx), name="test split"),
                       build_network(f"encoder:{ctx.encoder_dir}"), keep_images=0, keep_features=0)
    return path


def _dit(ctx: DemoContext, name: str, cache: str, decoder: str) -> dict[str, Any]:
    """Train the demo DiT on `cache`, scoring itself every few hundred steps through `decoder` (an eval.decoder= or
    eval.pixel_decoder= override) against the test split with the judge."""
    from fae.data.latents import LatentCache
    from fae.demo.html import read_metrics

    scoring = [decoder, f"eval.reference={reference_file(ctx)}", f"eval.judge={ctx.judge_dir}",
               f"eval.network=encoder:{ctx.encoder_dir}", *ctx.profile["dit_eval"]]
    overrides = [f"latents={cache}", f"model.in_channels={LatentCache(cache).channels}", *scoring, *ctx.profile["dit"]]
    run = ctx.train("dit", "dit.yaml", name, overrides)
    rows = read_metrics(run / "metrics.jsonl")
    losses = [r for r in rows if "loss/main" in r]
    curve = [{"step": r["step"], "class_agreement": r["eval/class_agreement"], "fd_encoder": r["eval/fd_encoder"],
              "seconds": r["eval/seconds"]} for r in rows if "eval/fd_encoder" in r]
    # sec_per_step covers everything between two log rows, the evaluations included: take them out for the overhead
    total = sum(r["sec_per_step"] * (r["step"] - before["step"])
                for before, r in zip([{"step": 0}, *losses], losses, strict=False))
    evaluating = sum(p["seconds"] for p in curve)
    return {"run": str(run), "loss_first": losses[0]["loss/main"], "loss_last": losses[-1]["loss/main"],
            "curve": curve, "eval_seconds": evaluating, "eval_overhead": evaluating / max(total - evaluating, 1e-9)}


def step_dit(ctx: DemoContext) -> dict[str, Any]:
    return _dit(ctx, "dit", ctx.results["latents"]["fae"], f"eval.decoder={ctx.out / 'pixel-decoder-ft' / 'tokenizer'}")


def step_dit_raw(ctx: DemoContext) -> dict[str, Any]:
    """The paper's Table 5 baseline in miniature: the same DiT budget on the raw (uncompressed) encoder features."""
    return _dit(ctx, "dit-raw", ctx.results["latents"]["raw"],
                f"eval.pixel_decoder={ctx.out / 'pixel-decoder' / 'pixel_decoder'}")


def step_classifier(ctx: DemoContext) -> dict[str, Any]:
    """The judge of class-agreement: a small CNN trained on real training images (labels used only here), shipped
    with fae (SHA-256 checked) or with --from-scratch trained now."""
    from fae.assets import asset, manifest
    from fae.io import read_bundle_config
    from fae.metrics.judge import train_classifier

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


def _scoring(ctx: DemoContext) -> dict[str, Any]:
    """What every generator is measured with: the judge classifier, the frozen encoder as the FD feature network,
    and the test split's reference features (computed once)."""
    from fae.encoders import FrozenEncoder
    from fae.metrics import EncoderNetwork, TensorSource, fid
    from fae.metrics.judge import SmallCNN
    from fae.metrics.reference import load_reference

    images = _test_images(ctx)
    network = EncoderNetwork(FrozenEncoder.from_config(replace(ctx.encoder_config(), precision="fp32")))  # a metric
    half = len(images) // 2
    return {"classifier": SmallCNN.from_pretrained(ctx.judge_dir).eval(), "network": network,
            "reference": load_reference(TensorSource(images, name="test split"), network),
            "info": {"fd_test_half_vs_half": fid(images[:half], TensorSource(images[half:]), network),
                     "fd_reference_images": len(images)}}


def _score(ctx: DemoContext, scoring: dict[str, Any], gen: Any, decode: Any, sampler: Any, folder: Path,
           num_samples: int) -> dict[str, Any]:
    """Sample `num_samples` images (equally many per class), write their grid, and measure class-agreement and FD."""
    from fae.metrics import fid
    from fae.metrics.judge import class_agreement
    from fae.sampling import generate, write_samples

    start = time.time()
    samples = generate(gen, decode, num_samples, seed=0, labels="equal", sampler=sampler, batch_size=250,
                       progress=ctx.progress)
    generated = time.time() - start
    write_samples(folder, samples, gen.class_names, pngs=False)
    agree = class_agreement(scoring["classifier"], samples.images, samples.labels)  # type: ignore[arg-type]  # class-conditional: labelled
    return {"class_agreement": agree["agreement"], "per_class": agree["per_class"],
            "fd_encoder": fid(samples.images, scoring["reference"], scoring["network"]),
            "grid": str(folder / "grid.png"), "seconds": round(time.time() - start, 1),
            "sample_seconds_per_image": generated / num_samples}


def _decoders(ctx: DemoContext) -> dict[str, dict[str, Path]]:
    """How each latent space gets back to pixels: FAE latents through the fine-tuned pipeline, raw features through
    the Gaussian-embedding pixel decoder."""
    return {"fae": {"fae": ctx.out / "pixel-decoder-ft" / "tokenizer"},
            "raw": {"pixel_decoder": ctx.out / "pixel-decoder" / "pixel_decoder"}}


def step_samples(ctx: DemoContext) -> dict[str, Any]:
    """Class-conditional samples from both generators, with and without guidance: class-agreement and FD to the
    test split in the frozen encoder's feature space."""
    from fae.generators import load_generator
    from fae.pipeline import GenerationPipeline
    from fae.sampling import load_decoder
    from fae.transport import GuidanceSchedule, SamplerConfig

    p = ctx.profile
    scoring = _scoring(ctx)
    info: dict[str, Any] = {**scoring["info"], "guidance": p["guidance"], "num_samples": p["samples"],
                            "sample_steps": p["sample_steps"]}
    runs = {"fae": ctx.out / "dit", "raw": ctx.out / "dit-raw"}
    guidance = {"no_guidance": GuidanceSchedule(), "guidance": GuidanceSchedule.parse(p["guidance"])}
    for gen_name, run in runs.items():
        gen = load_generator(run)
        decode = load_decoder(gen, **_decoders(ctx)[gen_name])  # type: ignore[arg-type]  # fae= or pixel_decoder= only
        for g_name, schedule in guidance.items():
            sampler = SamplerConfig(method="euler", steps=p["sample_steps"], guidance=schedule)
            folder = ctx.out / "samples" / f"{gen_name}-{g_name.replace('_', '-')}"
            info[f"{gen_name}/{g_name}"] = _score(ctx, scoring, gen, decode, sampler, folder, p["samples"])
    # the whole chain in one folder, for `GenerationPipeline.from_pretrained("runs/demo/pipeline")` (README)
    GenerationPipeline.from_parts(ctx.out / "dit", ctx.out / "pixel-decoder-ft" / "tokenizer").save_pretrained(
        ctx.out / "pipeline")
    info["pipeline"] = str(ctx.out / "pipeline")
    return info


# ------------------------------------------------------------------------------------------------------------
# `fae demo --flow`: the paper's STARFlow comparison (§5.3) in miniature, on the same latents and judge.
def _flow(ctx: DemoContext, name: str, cache: str) -> dict[str, Any]:
    from fae.data.latents import LatentCache
    from fae.demo.html import read_metrics

    overrides = [f"latents={cache}", f"model.in_channels={LatentCache(cache).channels}", *ctx.profile["flow"]]
    run = ctx.train("flow", "flow.yaml", name, overrides)
    rows = read_metrics(run / "metrics.jsonl")
    return {"run": str(run), "bpd_first": rows[0]["bpd"], "bpd_last": rows[-1]["bpd"],
            **json.loads((run / "eval.json").read_text())}


def step_flow(ctx: DemoContext) -> dict[str, Any]:
    return _flow(ctx, "flow", ctx.results["latents"]["fae"])


def step_flow_raw(ctx: DemoContext) -> dict[str, Any]:
    """The same flow and budget on the raw (uncompressed) encoder features."""
    return _flow(ctx, "flow-raw", ctx.results["latents"]["raw"])


def step_flow_decoder(ctx: DemoContext) -> dict[str, Any]:
    """STARFlow's sampling path on FAE: the demo FAE's feature decoder fine-tuned on z + the flow's training noise
    (the stage-1 stage from the FAE's weights, encoder frozen; fae.stages.autoencoder, latent_noise_flow)."""
    overrides = [f"encoder.name_or_path={ctx.encoder_dir}", f"feature_cache_dir={ctx.out / 'feature_cache'}",
                 f"init_from={ctx.out / 'fae'}", f"latent_noise_flow={ctx.out / 'flow'}", *ctx.profile["fae"],
                 *ctx.profile["flow_decoder"]]
    run = ctx.train("fae", "fae.yaml", "flow-decoder", overrides)
    return json.loads((run / "eval.json").read_text())


# the rows of `flow-samples`: (key, flow run, how its latents reach pixels, the score step on or off)
FLOW_SAMPLING_ROWS = (("fae", "flow", "fae", True), ("fae-noise-tuned", "flow", "fae-noise-tuned", False),
                      ("raw", "flow-raw", "raw", True))


def step_flow_samples(ctx: DemoContext) -> dict[str, Any]:
    """Both flows sampled (exact inverse, then the denoising step), with and without flow guidance: class-agreement
    and FD as for the DiT. The FAE flow also the way ml-starflow samples by default: no score step, its noisy latents
    decoded by the noise-tuned feature decoder (`flow-decoder`) and the same pixel decoder."""
    from fae.generators import load_generator
    from fae.sampling import load_decoder
    from fae.transport import GuidanceSchedule, SamplerConfig

    p = ctx.profile
    scoring = _scoring(ctx)
    info: dict[str, Any] = {**scoring["info"], "guidance": p["flow_guidance"], "num_samples": p["flow_samples"]}
    guidance = {"no_guidance": GuidanceSchedule(), "guidance": GuidanceSchedule.parse(p["flow_guidance"])}
    decoders = {**_decoders(ctx), "fae-noise-tuned": {
        "fae": ctx.out / "flow-decoder", "pixel_decoder": ctx.out / "pixel-decoder-ft" / "tokenizer"}}
    for key, run, decoder, denoise in FLOW_SAMPLING_ROWS:
        gen = load_generator(ctx.out / run)
        decode = load_decoder(gen, **decoders[decoder])  # type: ignore[arg-type]  # fae= or pixel_decoder= only
        for g_name, schedule in guidance.items():
            folder = ctx.out / "samples" / f"flow-{key}-{g_name.replace('_', '-')}"
            sampler = SamplerConfig(guidance=schedule, flow_denoise=denoise)
            info[f"{key}/{g_name}"] = _score(ctx, scoring, gen, decode, sampler, folder, p["flow_samples"])
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


STEPS = [
    Step("encoder", "the frozen encoder (self-supervised tiny DINOv2)", step_encoder),
    Step("fae", "FAE stage 1 (feature reconstruction)", step_fae),
    Step("pixel-decoder", "pixel decoder on noisy features", step_pixel_decoder),
    Step("finetune", "pixel decoder fine-tuned on x̂", step_finetune),
    Step("latents", "latent caches (FAE z and raw x)", step_latents),
    Step("classifier", "judge classifier on real images", step_classifier),   # the DiT runs score with it
    Step("dit", "DiT on FAE latents", step_dit),
    Step("dit-raw", "DiT on raw features (baseline)", step_dit_raw),
    Step("samples", "sampling and generation metrics", step_samples),
    Step("probe", "linear probes", step_probe),
]
PREREQUISITES = ["encoder", "fae", "pixel-decoder", "finetune", "latents", "classifier"]  # what --flow needs
FLOW_STEPS = [
    Step("flow", "STARFlow on FAE latents", step_flow),
    Step("flow-raw", "STARFlow on raw features (baseline)", step_flow_raw),
    Step("flow-decoder", "FAE decoder fine-tuned on the flow's noisy latents", step_flow_decoder),
    Step("flow-samples", "flow sampling and generation metrics", step_flow_samples),
]
