"""Evaluating latent spaces side by side: every tokenizer's reconstructions of the same held-out images, scored with
the same metrics (fae.metrics.reconstruction), so only the latent space changes.

    scores = evaluate_tokenizers({"fae": "runs/demo/pixel-decoder-ft", "sd-vae": "sd-vae:stabilityai/sd-vae-ft-ema"},
                                 DataConfig(kind="fashion_mnist", image_size=32), limit=1000, out_dir="runs/recon")
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fae import distributed as D
from fae.config import ConfigError
from fae.data import build_dataset
from fae.data.images import IMAGE_EXTENSIONS
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


# ---------------------------------------------------------------------------------------------- text to image
T2I_REFERENCE_IMAGES = ("all", "chosen")


def caption_pairs(captions: str | Path, caption_format: str | None = None) -> list[tuple[Any, str]]:
    """The (image source, caption) pairs of a caption set in a fae.data.captions format: a folder of image + .txt
    pairs, a .jsonl/.csv manifest, or webdataset shards (`caption_format` None: told by the path). Every named image
    file must exist: a metric over a set with holes would silently measure another set."""
    from fae.data.captions import CaptionDataConfig, build_caption_dataset

    path = Path(captions)
    fmt = caption_format or _caption_format(path)
    try:
        config = CaptionDataConfig(format=fmt, root=str(captions))  # type: ignore[arg-type]  # checked by validate
        dataset = build_caption_dataset(config)
    except ValueError as exc:
        raise ConfigError(f"caption set {captions}: {exc}") from None
    missing = [src for src, _ in dataset.pairs if not isinstance(src, tuple) and not Path(src).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"caption set {captions} names {len(missing)} image(s) that do not exist: {shown}")
    return dataset.pairs


def _caption_format(path: Path) -> str:
    if path.is_dir():
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())
        return "webdataset" if not has_images and any(path.glob("*.tar")) else "folder"
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        return "manifest"
    if path.suffix.lower() == ".tar" or "{" in str(path):
        return "webdataset"
    if not path.exists():
        raise FileNotFoundError(f"caption set {path} does not exist (a folder of image + .txt pairs, a .jsonl/.csv "
                                "manifest, or webdataset .tar shards)")
    raise ConfigError(f"caption set {path}: give a folder of image + .txt pairs, a .jsonl/.csv manifest, or .tar "
                      "shards")


def choose_captions(num_pairs: int, num_samples: int | None, subset_seed: int | None) -> list[int]:
    """Which pairs are captioned: the first N in file order, or (with `subset_seed`) the first N of a permutation
    seeded by it, so a smaller N with the same seed takes a prefix of a larger N's captions (and samples: sample i
    depends only on (seed, i) and its caption)."""
    n = num_pairs if num_samples is None else num_samples
    if not 1 <= n <= num_pairs:
        raise ConfigError(f"--num-samples {n}: the caption set has {num_pairs} pairs")
    if subset_seed is None:
        return list(range(n))
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(subset_seed))[:n].tolist()


def t2i_reference_source(pairs: Sequence[tuple[Any, str]], image_size: int, name: str) -> Any:
    """The reference images of the pairs (each image once, in first-appearance order: a COCO image with five
    captions counts once), read as training reads a caption set (ADM centre crop to `image_size`)."""
    from fae.data.captions import CaptionDataset
    from fae.metrics.features import DatasetSource

    unique = list(dict.fromkeys(src for src, _ in pairs))
    dataset = CaptionDataset([(src, "-") for src in unique], image_size, name, [])
    return DatasetSource(dataset, name, {"caption_set": name, "image_size": image_size})


def evaluate_text_to_image(gen: Any, decode: Any, captions: str | Path, out_dir: str | Path, clip: Any,
                           network: Any, *, num_samples: int | None = None, subset_seed: int | None = None,
                           seed: int = 0, sampler: Any = None, batch_size: int = 64,
                           reference: str | Path | None = None, reference_images: str = "all",
                           caption_format: str | None = None, device: str | torch.device = "cpu",
                           precision: str = "auto", compile: Any = "auto", cache_dir: str | Path | None = None,
                           feature_batch_size: int = 50, progress: bool = True) -> Any:
    """`fae eval t2i`: the MS-COCO-style protocol on a caption set. One sample per chosen caption (sample i from
    noise (seed, i) and caption i, `fae sample`'s rule and resumable chunks), written to `out_dir/samples.npz`; FID
    (through `network`) against the caption set's images (`reference_images` all | chosen) or `reference` (statistics
    or images); CLIP score (fae.metrics.clip_score, `clip` a ClipScorer) of each sample with its caption.
    Returns an EvalReport (metrics fid / fd_encoder, clip_score, clip_score_std)."""
    from fae.io import state_dict_sha256
    from fae.metrics.evaluate import FRECHET_DESCRIPTION
    from fae.metrics.features import NpzSource, extract_features
    from fae.metrics.frechet import FrechetError, compute_stats, frechet_distance
    from fae.metrics.reference import load_reference
    from fae.metrics.report import EvalReport
    from fae.sampling import sample_to_dir

    if reference_images not in T2I_REFERENCE_IMAGES:
        raise ConfigError(f"reference_images must be one of {T2I_REFERENCE_IMAGES}, not {reference_images!r}")
    if gen.condition_kind != "text":
        raise ConfigError(f"{gen.source} is not a text-to-image generator (it takes {gen.condition_kind} conditions)")
    pairs = caption_pairs(captions, caption_format)
    chosen = choose_captions(len(pairs), num_samples, subset_seed)
    prompts = [pairs[i][1] for i in chosen]
    with torch.no_grad():   # the samples' size, for reading the reference before any sampling (a bad image fails
        probe = decode(torch.zeros(1, *gen.latent_shape, device=device))   # fast, not after 30k samples)
    image_size = int(probe.shape[-1])
    if reference is None:
        used = pairs if reference_images == "all" else [pairs[i] for i in chosen]
        source = t2i_reference_source(used, image_size, f"{captions} ({reference_images} images)")
        try:
            ref = load_reference(source, network, batch_size=feature_batch_size, cache_dir=cache_dir,
                                 progress=progress)
            read = ref.num_samples or 0
        except FrechetError as exc:   # under two readable images; the count says whether files were unreadable
            read, reason = source.num_images - source.dataset.skipped, str(exc)
            if read == source.num_images:
                raise ConfigError(f"caption set {captions}: {reason}") from None
        if read != source.num_images:
            raise ConfigError(f"caption set {captions}: {source.num_images - read} of its {source.num_images} "
                              "reference images could not be read (see the warnings above)")
    else:
        ref = load_reference(reference, network, batch_size=feature_batch_size, cache_dir=cache_dir,
                             progress=progress)
    out = Path(out_dir)
    written = sample_to_dir(gen, decode, out, len(chosen), seed=seed, sampler=sampler, batch_size=batch_size,
                            device=device, progress=progress, pngs=False, per_row=1, precision=precision,
                            prompts=prompts, compile=compile)
    samples = NpzSource(out / "samples.npz")
    fs = extract_features(samples, network, feature_batch_size, cache_dir, None, progress)
    fd = frechet_name(network)   # "fid" through the FID Inception, "fd_encoder" in an encoder's space
    if "pool" not in ref.stats:
        raise ConfigError(f"reference {ref.name} has no pool statistics for {fd}")
    per_pair = clip.scores(samples, prompts, batch_size=feature_batch_size, progress=progress)
    metrics: dict[str, float | int | None] = {
        fd: frechet_distance(compute_stats(fs["pool"]), ref.stats["pool"]),
        "clip_score": float(per_pair.mean()), "clip_score_std": float(per_pair.std())}
    settings = json.loads((out / "samples.json").read_text())   # what `fae sample` records beside the samples
    protocol = {
        "captions": {"source": str(captions), "pairs": len(pairs),
                     "selection": f"first {len(chosen)}" if subset_seed is None else
                     f"first {len(chosen)} of a permutation seeded {subset_seed}"},
        "sampling": {k: v for k, v in settings.items() if k not in ("prompts", "class_names", "outputs")},
        fd: {"reference": "given" if reference is not None else f"{reference_images} images of the caption set, "
             f"each once, centre-cropped to {image_size} px", "feature_cache": fs.cached,
             "statistics": FRECHET_DESCRIPTION},
        "clip_score": {"definition": "mean over pairs of 100 * max(cos(image_emb, text_emb), 0)",
                       "model": clip.info()}}
    notes = list(ref.notes) + [f"clip_score by {clip.name_or_path} (weights {clip.weights_sha256[:12]})"]
    if fs.num_samples < 30_000:
        notes.append(f"{fd} from {fs.num_samples} samples: a Frechet distance is biased upwards at small N; the "
                     "paper's MS-COCO protocol uses 30,000")
    inputs = {"generator": {"source": gen.source, "weights_sha256": state_dict_sha256(gen.model)},
              "samples": written.get("npz"), "reference": ref.describe()}
    return EvalReport("text-to-image", metrics, network.info(), fs.num_samples, protocol, inputs, notes)

