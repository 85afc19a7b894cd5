"""Evaluating latent spaces side by side: every tokenizer's reconstructions of the same held-out images, scored with
the same metrics (fae.metrics.reconstruction), so only the latent space changes.

    scores = evaluate_tokenizers({"fae": "runs/demo/pixel-decoder-ft", "sd-vae": "sd-vae:stabilityai/sd-vae-ft-ema"},
                                 DataConfig(kind="fashion_mnist", image_size=32), limit=1000, out_dir="runs/recon")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fae import distributed as D
from fae.config import ConfigError
from fae.data import build_dataset
from fae.data.loading import num_items
from fae.metrics.networks import frechet_name
from fae.metrics.reconstruction import evaluate_reconstructions
from fae.tokenizers import Tokenizer, load_tokenizer


@torch.no_grad()
def evaluate_tokenizers(tokenizers: dict[str, Any], data: Any, split: str = "test", limit: int | None = 1000,
                        network: Any | None = None, batch_size: int = 250, device: str | torch.device = "cpu",
                        out_dir: str | Path | None = None) -> dict[str, Any]:
    """PSNR, SSIM and (with a `network`, fae.metrics.networks) rFID of decode(encode(images)) for each
    `name -> tokenizer` (a Tokenizer or what `--tokenizer` names) on the first `limit` images of `data` (a DataConfig
    or a Dataset). With `out_dir`: recon.json and recon_grid.png (original | each tokenizer)."""
    if not tokenizers:
        raise ConfigError("nothing to evaluate: name at least one tokenizer")
    loaded = {name: (t if isinstance(t, Tokenizer) else load_tokenizer(t, device=device)).to(device)
              for name, t in tokenizers.items()}
    dataset: Dataset = data if isinstance(data, Dataset) else build_dataset(data, split)
    if limit is not None and num_items(dataset) > limit:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    scores = evaluate_reconstructions(lambda x: {name: t.decode(t.encode(x)) for name, t in loaded.items()}, dataset,
                                      device, network, batch_size, out_dir=out_dir,
                                      inputs={name: t.describe() for name, t in loaded.items()})
    scores["tokenizers"] = {name: {"kind": t.kind, "identity": t.identity} for name, t in loaded.items()}
    return scores


# ---------------------------------------------------------------------------------------------- generators
@dataclass
class GeneratorEvalConfig:
    """How a generator is scored, in training (`eval.every`) and by `fae eval generator`: one code path, so the
    number logged at a step equals `fae eval generator --step` on that checkpoint with the same settings."""

    every: int = 0                    # in training: score the EMA weights every N steps (0 = off)
    decoder: str | None = None        # the latents' way to pixels: a tokenizer (`--tokenizer` spec: an FAE run,
    pixel_decoder: str | None = None  # sd-vae:<folder>, ...), or for raw-feature latents a pixel-decoder bundle/run
    num_samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    method: str = "euler"             # the sampler (fae.transport.SamplerConfig): method, steps, guidance schedule
    steps: int = 25
    guidance: str = "none"
    network: str = "encoder"          # FD space: encoder (the frozen encoder the latents record), encoder:<folder>,
    inception_weights: str | None = None   # inception (with its weights file), inception:pytorch
    reference: str | None = None      # reference statistics .npz (`fae eval stats`) or images (folder, .npz arr_0)
    judge: str | None = None          # a classifier bundle (fae.metrics.judge.SmallCNN): class agreement
    precision_recall: bool = False    # also k=3 precision and recall (the reference must hold features or images)
    keep_best: bool = False           # in training: export the best-scoring step's bundle to <run>/best/

    def validate(self) -> None:
        if self.every < 0 or self.num_samples < 2 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("eval: every >= 0, num_samples >= 2, steps >= 1 and batch_size >= 1")
        if self.every and self.reference is None:
            raise ValueError("eval.every needs eval.reference: reference statistics (.npz from `fae eval stats`) or "
                             "images (a folder, or an .npz of arr_0) to measure the samples' distance to")
        if self.every and self.decoder is None and self.pixel_decoder is None:
            raise ValueError("eval.every needs eval.decoder (the tokenizer of the cache: e.g. the pixel-decoder "
                             "fine-tune run) or, for raw-feature latents, eval.pixel_decoder")

    def sampler(self) -> Any:
        from fae.transport import GuidanceSchedule, SamplerConfig

        return SamplerConfig(method=self.method, steps=self.steps, guidance=GuidanceSchedule.parse(self.guidance))  # type: ignore[arg-type]  # method is checked by SamplerConfig.validate


class GeneratorScorer:
    """Everything a generator's score needs besides the generator: the decoder, the feature network, the reference
    statistics and the judge, loaded once (a training run scores many steps)."""

    def __init__(self, cfg: GeneratorEvalConfig, record: Any, device: str | torch.device = "cpu") -> None:
        from fae.metrics.reference import load_reference

        self.cfg, self.device = cfg, torch.device(device)
        if cfg.reference is None:
            raise ConfigError("scoring a generator needs a reference (eval.reference / --reference)")
        self.network: Any = eval_network(cfg, record, self.device)
        self.reference = load_reference(cfg.reference, self.network)
        self.judge = None
        if cfg.judge is not None:   # any judge bundle (`fae train judge`): grey or colour, it takes the RGB samples
            from fae.metrics.judge import SmallCNN

            self.judge = SmallCNN.from_pretrained(cfg.judge).eval()
            check_judge_classes(cfg.judge, self.judge.config.num_classes, getattr(record, "class_names", None))
        self.fd_name = frechet_name(self.network)   # fid through Inception, fd_encoder in an encoder's space

    def score(self, gen: Any, decode: Any, progress: bool = False) -> dict[str, float]:
        """{fd_<network> (fid for Inception), class_agreement (with a judge), precision and recall (when asked)} of
        `num_samples` samples, noise i from
        (seed, i), classes i mod K. Under torchrun each process samples its share, rank 0 scores them all and every
        process returns rank 0's scores."""
        from fae.metrics.evaluate import evaluate_generation
        from fae.metrics.judge import class_agreement
        from fae.sampling import generate

        cfg = self.cfg
        samples = generate(gen, decode, cfg.num_samples, seed=cfg.seed, labels="equal", sampler=cfg.sampler(),
                           batch_size=cfg.batch_size, device=self.device, progress=progress, precision="fp32")
        scores = None
        if D.rank() == 0:   # it holds every sample (fae.sampling.generate gathers there); the others get its scores
            metrics = ["fid", *(["precision", "recall"] if cfg.precision_recall else [])]
            values = evaluate_generation(samples.images, self.reference, self.network, metrics=metrics).metrics
            scores = {self.fd_name: float(values[self.fd_name]),  # type: ignore[arg-type]  # asked for: never None
                      **{m: float(values[m]) for m in metrics[1:]}}  # type: ignore[arg-type]  # asked for: never None
            if self.judge is not None and samples.labels is not None:
                agreement = class_agreement(self.judge, samples.images, samples.labels)["agreement"]
                scores["class_agreement"] = float(agreement)
        return D.all_gather_objects(scores)[0]


def check_judge_classes(judge: str, num_classes: int, class_names: list[str] | None) -> None:
    """A judge scores class ids: it must know as many classes as the generator's data had (and the same ones, where
    both record their names), or its agreement would compare unrelated ids."""
    from fae.io import read_bundle_config

    if not class_names:
        return
    if num_classes != len(class_names):
        raise ConfigError(f"judge {judge} knows {num_classes} classes, the generator's latents {len(class_names)}; "
                          "train the judge on the same data (`fae train judge`)")
    judge_names = read_bundle_config(judge).get("class_names")
    if judge_names and list(judge_names) != list(class_names):
        raise ConfigError(f"judge {judge} was trained on classes {judge_names}, the generator on {class_names}")


def eval_network(cfg: GeneratorEvalConfig, record: Any, device: str | torch.device = "cpu") -> Any:
    """The feature network `cfg.network` names, in fp32 like every metric network: "encoder" is the frozen encoder
    the latents record (a reference file made with `encoder:<its folder>` matches it)."""
    from fae.encoders import FrozenEncoder
    from fae.metrics.networks import EncoderNetwork, build_network

    if cfg.network != "encoder":
        return build_network(cfg.network, cfg.inception_weights, device=device)
    encoder = record.latents.encoder if record.latents else None
    if not encoder:
        raise ConfigError("network=encoder names the frozen encoder the latents record, and these record none "
                          "(another tokenizer's latents): give encoder:<model folder> or inception")
    # fp32: a distance must not depend on native bf16
    return EncoderNetwork(FrozenEncoder.from_reference(encoder, precision="fp32"), device)


def load_eval_decoder(gen: Any, cfg: GeneratorEvalConfig, device: str | torch.device = "cpu") -> Any:
    """The generator's way to pixels that `cfg` names (checked against the generator's record, fae.sampling)."""
    from fae.sampling import load_decoder

    if gen.record.raw_features:
        return load_decoder(gen, pixel_decoder=cfg.pixel_decoder, device=device, compile="off")
    return load_decoder(gen, tokenizer=cfg.decoder, device=device, compile="off")
