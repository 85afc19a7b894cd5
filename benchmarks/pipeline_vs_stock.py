"""The whole pipeline, fae against the nearest stock path: images/s of each, side by side in one process.

    python benchmarks/pipeline_vs_stock.py [--size demo|S] [--precision fp32 bf16] [--cases encode generate-25
                                           generate-250 train-fae train-pixel-decoder] [--rounds 5] [--threads 2]
                                           [--json out.json] [--tiny]

Both paths run the SAME modules with the SAME weights (random weights: the cost does not depend on them; the demo
encoder is the shipped one). What differs is the machinery around them:

  encode     fae: the latent function `fae encode` runs per batch (fae.encoding.make_latent_fn over a FrozenEncoder and
             the FeatureAutoEncoder), plain and h-flipped images, as `fae encode` stores both.
             stock: transformers `AutoModel.from_pretrained` of the same encoder folder, the processor's resize and
             normalisation written out, the patch tokens, then the FAE encoder module called directly -> posterior
             mean; the flipped half as a second call (what fae does on a CPU). images/s counts images (not flips).
  generate-N fae: `GenerationPipeline.generate` (DiT, Euler, constant guidance 1.5, N steps, noise from per-sample
             seeds, feature decoder, pixel decoder, uint8 images).
             stock: a hand-written Euler loop over the same DiT, CFG as ONE concatenated batch of 2B (fae's default
             cfg_batch), de-normalisation, the feature decoder and the pixel decoder called directly, uint8 images.
  train-*    fae: `fae.training.Trainer`'s step on the stage (FAEStage / PixelDecoderStage) of configs/demo: per-step
             seeding, the stage's loss (with its logs), the finiteness checks, grad clipping, AdamW, LR schedule, EMA.
             stock: the same modules, the same loss terms written plainly (FAE: MSE + beta KL with a sampled
             posterior; pixel decoder: L2 of the decoder on features + fixed Gaussian noise), then
             `loss.backward(); clip_grad_norm_; torch.optim.AdamW.step()` and a plain-loop EMA: the same recipe, so
             the ratio measures fae's machinery, not a different recipe. Batches are fixed synthetic features (the
             demo trains on a feature cache), so no data loading is timed in either.

Rounds interleave the two paths in alternating order (fae, stock, stock, fae, ...) after one warm-up call of each; the
table gives medians, images/s and the ratio stock/fae (> 1: fae is faster). Before timing, each case checks that both
paths compute the same thing (the report's `parity`): encode latents, generated uint8 images from the same noise, and
the weights after one train step from the same weights and seed. bf16 (autocast in both paths) runs only where the CPU
runs it natively.
Sizes: `demo` = configs/demo models (fae.yaml, pixel_decoder.yaml, dit.yaml) with the shipped demo encoder at 32 px;
`S` = DINOv2-S (random weights, 224 px from 256 px images), the FAE and pixel decoder of benchmarks/throughput.py's S,
LightningDiT-S/1 on 16x16x32 latents.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import WIDTHS, autocast, demo_model  # noqa: E402  (the benchmarks' shared size registry)

CASES = ("encode", "generate-25", "generate-250", "train-fae", "train-pixel-decoder")
GUIDANCE = 1.5


@dataclasses.dataclass
class Case:
    """One comparison: two zero-argument callables doing the same work on `images` images, and their parity."""

    name: str
    images: int
    fae: Callable[[], Any]
    stock: Callable[[], Any]
    parity: dict[str, float]
    note: str = ""


# ---------------------------------------------------------------------------------------------------- the modules
@dataclasses.dataclass
class Parts:
    encoder: Any            # fae FrozenEncoder
    encoder_folder: Path | None   # the transformers folder (demo); None: random weights in memory (S)
    autoencoder: Any        # FeatureAutoEncoder
    pixel_decoder: Any      # PixelDecoder
    dit: Any                # DiT
    image_size: int


def build_parts(size: str, precision: str) -> Parts:
    """The networks of a pipeline at `size`, seeded; the frozen encoder computes in `precision`."""
    from fae.assets import asset
    from fae.encoders import EncoderConfig, FrozenEncoder
    from fae.models.autoencoder import FAEConfig, FeatureAutoEncoder
    from fae.models.dit import DiT, dit_config
    from fae.models.pixel_decoder import PixelDecoder, pixel_decoder_config

    torch.manual_seed(0)
    if size == "demo":
        folder = asset("demo-encoder")
        encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(folder), precision=precision))
        fae_cfg, pd_cfg, dit_cfg, image_size = (demo_model("fae").model, demo_model("pixel-decoder").decoder,
                                                demo_model("dit").model, 32)
    else:
        folder = None
        encoder = FrozenEncoder.skeleton("dinov2-s", precision=precision)
        width, heads = WIDTHS["S"]
        fae_cfg = FAEConfig(feature_dim=width, grid=(16, 16), latent_channels=32, encoder_heads=heads,
                            encoder_head_dim=64, decoder_heads=heads)
        pd_cfg = pixel_decoder_config("S", in_dim=width, num_tokens=256, patch_size=16)
        dit_cfg = dit_config("LightningDiT-S/1", num_classes=1000, input_size=(16, 16), in_channels=32,
                             class_dropout=0.1)
        image_size = 256
    dit = DiT(dit_cfg)
    with torch.no_grad():  # leave the zero init: its output would be 0 and the guidance arithmetic untested
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Parts(encoder, folder, FeatureAutoEncoder(fae_cfg).eval(), PixelDecoder(pd_cfg).eval(), dit.eval(),
                 image_size)


def max_diff(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape:
        raise AssertionError(f"fae and stock outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


# --------------------------------------------------------------------------------------------------------- encode
def encode_case(parts: Parts, precision: str, batch: int) -> Case:
    from fae.encoding import make_latent_fn
    from fae.precision import resolve_precision

    encoder, fae_model = parts.encoder, parts.autoencoder
    latent_fn = make_latent_fn(encoder, fae_model, "fae", tuple(encoder.grid),
                               autocast=resolve_precision(precision, "cpu").autocast)
    images = torch.rand(batch, 3, parts.image_size, parts.image_size, generator=torch.Generator().manual_seed(1))

    def fae_path() -> dict[str, torch.Tensor]:
        return latent_fn({"image": images}, True)

    stock = stock_encoder(parts, precision)
    out_f, out_s = fae_path(), stock(images)
    parity = {"latents_max_abs_diff": max(max_diff(out_f["latents"], out_s[0]),
                                          max_diff(out_f["latents_flip"], out_s[1]))}
    return Case("encode", batch, fae_path, lambda: stock(images), parity,
                "plain + flipped image per item, as `fae encode` stores")


def stock_encoder(parts: Parts, precision: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Images -> (latents, latents of the flipped images), plain transformers + the FAE encoder module."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    if parts.encoder_folder is not None:
        hf_logging.disable_progress_bar()  # its weight-loading bar would clutter the table
        model = AutoModel.from_pretrained(parts.encoder_folder).eval()
        pre = json.loads((parts.encoder_folder / "preprocessor_config.json").read_text())
        mean, std = pre["image_mean"], pre["image_std"]
        size = pre["crop_size"]["height"]
    else:  # random weights: the same ones fae's encoder holds
        model = copy.deepcopy(parts.encoder.model).eval()
        mean, std, size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), parts.encoder.input_size
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    fae_encoder, (c, grid) = parts.autoencoder.encoder, (parts.autoencoder.config.latent_channels,
                                                         parts.autoencoder.config.grid)

    def latents(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        with autocast(precision):
            tokens = model(pixel_values=(images - mean_t) / std_t).last_hidden_state[:, 1:].float()
            moments = fae_encoder(tokens)  # (B, N, 2C): mean, log-variance
        return moments[..., :c].transpose(1, 2).reshape(len(images), c, *grid).float()

    @torch.no_grad()
    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return latents(images), latents(images.flip(-1))

    return run


# ------------------------------------------------------------------------------------------------------- generate
def generate_case(parts: Parts, precision: str, steps: int, batch: int) -> Case:
    from fae.generators.base import GeneratorRecord
    from fae.generators.dit import DiTGenerator
    from fae.pipeline import GenerationPipeline
    from fae.tokenizers import FAE
    from fae.transport import GuidanceSchedule, SamplerConfig, sample_seed

    channels = parts.dit.config.in_channels
    g = torch.Generator().manual_seed(2)
    stats_mean, stats_std = (0.1 * torch.randn(channels, generator=g)).tolist(), (1 + torch.rand(channels, generator=g)).tolist()
    tokenizer = FAE(parts.encoder, parts.autoencoder, parts.pixel_decoder)
    pipe = GenerationPipeline(tokenizer, DiTGenerator(parts.dit, GeneratorRecord(stats_mean, stats_std), "benchmark"))
    sampler = SamplerConfig(steps=steps, guidance=GuidanceSchedule.constant(GUIDANCE))

    def fae_path() -> np.ndarray:
        return pipe.generate(batch, seed=0, labels="equal", sampler=sampler, batch_size=batch, precision=precision,
                             compile="off", progress=False).images

    seeds = [sample_seed(0, i) for i in range(batch)]  # the per-sample seeds: plain integers
    stock = stock_generator(parts, precision, steps, stats_mean, stats_std)

    def stock_path() -> np.ndarray:
        return stock(seeds)

    parity = {"uint8_max_abs_diff": max_diff(fae_path(), stock_path())}
    return Case(f"generate-{steps}", batch, fae_path, stock_path, parity,
                f"Euler {steps} steps, guidance {GUIDANCE} (2B batch), feature + pixel decoder")


def stock_generator(parts: Parts, precision: str, steps: int, stats_mean: list[float], stats_std: list[float]
                    ) -> Callable[[list[int]], np.ndarray]:
    dit, cfg = parts.dit, parts.dit.config
    shape = (cfg.in_channels, *cfg.input_size)
    mean, std = torch.tensor(stats_mean).view(-1, 1, 1), torch.tensor(stats_std).view(-1, 1, 1)
    times = [1.0 - i / steps for i in range(steps + 1)]  # time shift 1 (the demo DiT's)
    feature_decoder, pixel_decoder = parts.autoencoder.decoder, parts.pixel_decoder

    @torch.no_grad()
    def run(seeds: list[int]) -> np.ndarray:
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        n = len(seeds)
        y = torch.arange(n) % cfg.num_classes
        both = torch.cat([y, torch.full_like(y, cfg.num_classes)])  # the null class id = num_classes
        with autocast(precision):
            for t, t_next in zip(times[:-1], times[1:], strict=True):
                v_cond, v_uncond = dit(torch.cat([x, x]), torch.full((2 * n,), t), both).chunk(2)
                x = x - (t - t_next) * (v_uncond + GUIDANCE * (v_cond - v_uncond))
            z = x.float() * (std + 1e-8) + mean
            features = feature_decoder(z.flatten(2).transpose(1, 2))
            images = pixel_decoder(features)
        return images.float().clamp(0, 1).mul(255).add(0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return run


# ---------------------------------------------------------------------------------------------------------- train
def train_case(parts: Parts, stage_name: str, precision: str, batch: int | None, out_dir: Path) -> Case:
    """fae's Trainer step on the demo stage against a plain step with the same modules, loss terms and recipe."""
    from fae.stages import load_stage_config
    from fae.training import Trainer, step_seed

    file = {"pixel-decoder": "pixel_decoder"}[stage_name] if stage_name != "fae" else "fae"
    _, cfg = load_stage_config(Path(__file__).resolve().parents[1] / "configs" / "demo" / f"{file}.yaml")
    batch = batch or cfg.train.batch_size
    cfg.train = dataclasses.replace(cfg.train, precision=precision, batch_size=batch, device="cpu", compile="off",
                                    tensorboard="off")
    g = torch.Generator().manual_seed(3)
    features = torch.randn(batch, parts.encoder.num_tokens, parts.encoder.dim, generator=g)
    if stage_name == "fae":
        from fae.stages.autoencoder import FAEStage

        cfg.model = parts.autoencoder.config
        stage: Any = FAEStage(cfg, encoder=parts.encoder)
        fixed = {"features": features}
    else:
        from fae.models.pixel_decoder import FeatureNoise
        from fae.stages.pixel_decoder import PixelDecoderStage

        cfg.decoder = parts.pixel_decoder.config
        cfg.data = dataclasses.replace(cfg.data, image_size=cfg.decoder.image_size)
        stage = PixelDecoderStage(cfg, encoder=parts.encoder)
        stage.noise = FeatureNoise(cfg.noise.sigma)  # the fixed level; fae measures it from the data set's RMS
        fixed = {"features": features, "image": torch.rand(batch, 3, cfg.decoder.image_size, cfg.decoder.image_size,
                                                           generator=g)}
    trainer = Trainer(stage, cfg.train, out_dir / stage_name, progress=False)
    (group, names), = trainer.groups.items()
    module = trainer.raw[names[0]]
    stock = StockTrainer(copy.deepcopy(module), stage_name, cfg, precision, fixed)
    batches: Iterator[Any] = iter(lambda: dict(fixed), None)   # the same batch forever
    step_autocast = trainer.precision.autocast()

    def fae_path() -> None:
        trainer._train_step(batches, step_autocast, {})
        trainer.step += 1

    def stock_path() -> None:
        stock.step(step_seed(cfg.train.seed, 0, stock.updates))

    # parity: one step of each from the same weights, seed and learning rate
    stock.set_lr(trainer.optimizers[group].param_groups[0]["lr"])
    fae_path(), stock_path()
    parity = {"weights_max_abs_diff": max(max_diff(a.detach(), b.detach()) for a, b in
                                          zip(module.parameters(), stock.model.parameters(), strict=True)),
              "ema_max_abs_diff": max(max_diff(a, b) for a, b in zip(trainer.ema[names[0]].module.parameters(),
                                                                     stock.ema.parameters(), strict=True))}
    return Case(f"train-{stage_name}", batch, fae_path, stock_path, parity,
                "Trainer step vs plain backward + clip + AdamW + EMA")


class StockTrainer:
    """A plain training step: the loss terms of fae's stage written out, then backward, clipping, AdamW and EMA."""

    def __init__(self, model: nn.Module, stage_name: str, cfg: Any, precision: str, batch: dict[str, torch.Tensor]
                 ) -> None:
        self.model, self.stage_name, self.precision, self.batch = model.train(), stage_name, precision, batch
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.clip, self.ema_decay, self.ema_warmup = o.grad_clip, cfg.train.ema_decay, cfg.train.ema_warmup
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.kl_weight = cfg.loss.kl_weight if stage_name == "fae" else 0.0
        self.sigma = cfg.noise.sigma if stage_name == "pixel-decoder" else 0.0
        self.updates = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def loss(self) -> torch.Tensor:
        x = self.batch["features"]
        if self.stage_name == "fae":
            x_hat, posterior = self.model(x, sample=True)
            m, lv = posterior.mean.float(), posterior.logvar.float()
            kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).flatten(1).sum(1).mean() / m[0].numel()
            return F.mse_loss(x_hat.float(), x) + self.kl_weight * kl
        pred = self.model(x + self.sigma * torch.randn(x.shape))
        return F.mse_loss(pred.float(), self.batch["image"])

    def step(self, seed: int) -> None:
        torch.manual_seed(seed)
        with autocast(self.precision):
            loss = self.loss()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        decay = min(self.ema_decay, (1 + self.updates) / (10 + self.updates)) if self.ema_warmup else self.ema_decay
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1.0 - decay)
        self.updates += 1


# ------------------------------------------------------------------------------------------------------- measuring
def interleaved(case: Case, rounds: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"fae": [], "stock": []}
    paths = {"fae": case.fae, "stock": case.stock}
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    for r in range(rounds):
        # ABBA order (fae, stock, stock, fae, ...): whichever path runs second in a round gains nothing by it
        for name in ("fae", "stock") if r % 2 == 0 else ("stock", "fae"):
            start = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - start)
    return times


def build_case(name: str, parts: Parts, precision: str, args: argparse.Namespace, out_dir: Path) -> Case:
    if name == "encode":
        return encode_case(parts, precision, args.encode_batch)
    if name.startswith("generate-"):
        return generate_case(parts, precision, args.tiny_steps or int(name.split("-")[1]), args.generate_batch)
    return train_case(parts, name.removeprefix("train-"), precision, args.train_batch, out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="demo", choices=["demo", "S"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="bf16 (autocast in both paths) runs only where the CPU runs it natively")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per path, interleaved")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encode-batch", type=int, default=None, help="default: 256 (demo), 16 (S)")
    ap.add_argument("--generate-batch", type=int, default=None, help="default: 64 (demo), 8 (S)")
    ap.add_argument("--train-batch", type=int, default=None, help="default: the demo config's (S: 8)")
    ap.add_argument("--json", help="also write the report to this JSON file")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run for tests: demo size, small batches, "
                                                        "2 sampling steps, one round")
    args = ap.parse_args(argv)
    args.tiny_steps = 0
    demo = args.size == "demo"
    args.encode_batch = args.encode_batch or (256 if demo else 16)
    args.generate_batch = args.generate_batch or (64 if demo else 8)
    args.train_batch = args.train_batch or (None if demo else 8)
    if args.tiny:
        args.size, args.rounds, args.warmup, args.tiny_steps = "demo", 1, 0, 2
        args.encode_batch, args.generate_batch, args.train_batch = 4, 4, 4
        args.cases = [c for c in args.cases if c != "generate-250"]  # one 2-step generate stands for both
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; the caller's thread count is restored on return (tests call this in-process)."""
    threads = torch.get_num_threads()
    try:
        return _run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from fae.precision import bf16_native

    torch.set_num_threads(args.threads)
    native, evidence = bf16_native("cpu")
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "bf16_native": native, "bf16_evidence": evidence, "size": args.size,
        "rounds": args.rounds, "weights": "random (demo encoder: the shipped one)", "results": []}
    print(f"CPU {report['cpu_capability']}, {report['threads']} threads, {report['date']}; bf16: {evidence}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            if precision == "bf16" and not native:
                print("bf16 skipped: not native on this CPU")
                continue
            for name in args.cases:
                parts = build_parts(args.size, precision)  # fresh modules per case: no state leaks between cases
                case = build_case(name, parts, precision, args, Path(tmp))
                times = interleaved(case, args.rounds, args.warmup)
                fae_s, stock_s = statistics.median(times["fae"]), statistics.median(times["stock"])
                row = {"case": case.name, "precision": precision, "images": case.images, "fae_s": fae_s,
                       "stock_s": stock_s, "fae_images_per_s": case.images / fae_s,
                       "stock_images_per_s": case.images / stock_s, "ratio": stock_s / fae_s, "parity": case.parity,
                       "times": times, "note": case.note}
                report["results"].append(row)
                print(f"  {precision} {case.name}: fae {row['fae_images_per_s']:.1f} img/s, stock "
                      f"{row['stock_images_per_s']:.1f} img/s, stock/fae {row['ratio']:.2f}x; parity {case.parity}",
                      flush=True)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"CPU {report['cpu_capability']}, {report['threads']} threads, size {report['size']}, "
             f"{report['rounds']} interleaved rounds (medians), {report['date']}", "",
             "| precision | case | images/call | fae images/s | stock images/s | ratio stock/fae | parity |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        parity = ", ".join(f"{k} {v:.2g}" for k, v in r["parity"].items())
        lines.append(f"| {r['precision']} | {r['case']} | {r['images']} | {r['fae_images_per_s']:.1f} | "
                     f"{r['stock_images_per_s']:.1f} | {r['ratio']:.2f}x | {parity} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
