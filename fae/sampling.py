"""Sampling images from a trained generator: DiT bundle + FAE (+ pixel decoder) -> grid PNG, PNGs, ADM `.npz`.

    gen = load_generator("runs/dit")                        # fae.generators: bundle or finished run folder
    decode = load_decoder(gen, fae="runs/pixel-decoder-ft/tokenizer")   # the FAE it was trained on (hash-checked)
    result = generate(gen, decode, num_samples=100, seed=0, sampler=SamplerConfig(guidance=GuidanceSchedule.paper()))
    write_samples("samples/", result, gen.class_names)

Reproducibility: sample i's starting noise (and SDE noise) comes from its own generator seeded by (seed, i), and
samples are processed in fixed chunks of `batch_size` consecutive indices, chunk k on process k mod W. So a run
gives the same images with 1 or N processes (torchrun), and any sample can be regenerated alone.
Labels: `equal` gives sample i the class i mod K (so N = multiple of K is exactly balanced, RAE's default for FID);
`random` draws them from the seed. A text generator takes `prompts` instead: sample i gets prompt i mod P, and the
grid has one row per prompt.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fae import distributed as D
from fae.config import ConfigError, apply_overrides, to_dict
from fae.data.labels import check_class_ids
from fae.generators import FlowGenerator, Generator
from fae.grid import draw_grid, to_uint8_hwc
from fae.io import atomic_save_npz, atomic_write, atomic_write_text, read_bundle_config, require_bundle
from fae.models.pixel_decoder import PixelDecoder
from fae.precision import resolve_precision
from fae.speed import CompileMode, compile_in_place, compile_wanted
from fae.tokenizers import FAE, Tokenizer, check_tokenizer, load_tokenizer
from fae.transport import (
    SAMPLER_METHODS,
    GuidanceSchedule,
    SamplerConfig,
    initial_noise,
    paper_method,
    sample_generators,
)

Decoder = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]   # (samples finished, samples this process makes), after each chunk


def sampler_config(guidance: str = "none", method: str = "auto", steps: int = 250, time_shift: float | None = None,
                   guidance_channels: int | None = None, cfg_batch: str = "auto", denoise: bool = True,
                   flow: Sequence[str] = (), rtol: float = 1e-3, atol: float = 1e-6) -> SamplerConfig:
    """The SamplerConfig `fae sample`'s flags describe (`fae serve` builds it the same way): `guidance` as
    GuidanceSchedule.parse reads it, `method` auto (the paper's rule, fae.transport.paper_method) or a sampler name,
    `flow` KEY=VALUE overrides of a flow bundle's sampling switches (checked against the bundle when it samples),
    `rtol`/`atol` dopri5's tolerances. ConfigError names the bad value."""
    try:
        schedule = GuidanceSchedule.parse(guidance)
    except ValueError as exc:
        raise ConfigError(f"--guidance: {exc}") from None
    schedule.channels = guidance_channels
    if method != "auto" and method not in SAMPLER_METHODS:
        raise ConfigError(f"unknown sampler {method!r}: auto, {', '.join(SAMPLER_METHODS)}")
    if cfg_batch not in ("auto", "concat", "separate"):
        raise ConfigError(f"cfg_batch must be auto, concat or separate, got {cfg_batch!r}")
    chosen = paper_method(schedule) if method == "auto" else method
    sampler = SamplerConfig(method=chosen, cfg_batch=cfg_batch,  # type: ignore[arg-type]  # both names checked above
                            steps=steps, time_shift=time_shift, guidance=schedule, flow_denoise=denoise,
                            flow=apply_overrides({}, list(flow)), rtol=rtol, atol=atol)
    try:
        sampler.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return sampler


def load_decoder(gen: Generator, fae: str | Path | None = None, pixel_decoder: str | Path | None = None,
                 device: str | torch.device = "cpu", compile: CompileMode = "auto",
                 tokenizer: str | Path | dict[str, Any] | Tokenizer | None = None) -> Decoder:
    """Latents (B,C,h,w) in the generator's space (de-normalised) -> images (B,3,H,W) in [0,1].

    FAE latents: `fae` is an FAE bundle with its pixel decoder (`tokenizer/`, or the run holding it), or a stage-1 FAE bundle plus
    `pixel_decoder` (`FAE.load`); its weights must be those the generator was trained on. Raw-feature latents: the
    features go straight into `pixel_decoder`. Any other latent space (fae.tokenizers): `tokenizer` (what
    `--tokenizer` names, or a Tokenizer), by default the reference the generator's bundle recorded (a hub id, or a
    folder that may have moved); kind, identity and latent shape are checked. `compile` (auto | on | off,
    fae.speed) compiles the decoders.
    """
    compile_wanted(compile, device)  # a bad mode is refused before anything loads
    if gen.record.raw_features:
        if pixel_decoder is None:
            raise ConfigError("these latents are raw encoder features: pass the pixel decoder bundle "
                              "(--pixel-decoder), e.g. <pixel-decoder run>/pixel_decoder")
        pd = PixelDecoder.from_pretrained(require_bundle(pixel_decoder, "pixel_decoder", classes=["PixelDecoder"]),
                                          map_location=device).eval()
        if compile_wanted(compile, device):
            compile_in_place(pd)
        return lambda z: pd.decode(z.flatten(2).transpose(1, 2))
    kind = trained_tokenizer_kind(gen)
    if kind == "fae" and not isinstance(tokenizer, Tokenizer):
        return _fae_decoder(gen, fae if fae is not None else tokenizer, pixel_decoder, device, compile)  # type: ignore[arg-type]  # a reference dict names a folder too
    if fae is not None or pixel_decoder is not None:
        raise ConfigError(f"{gen.source} generates {kind} latents: pass --tokenizer (default: the one its bundle "
                          "records), not --fae/--pixel-decoder")
    origin = gen.record.latents
    spec = tokenizer if tokenizer is not None else (origin.tokenizer_reference if origin else None)
    if spec is None:
        raise ConfigError(f"{gen.source} records no tokenizer to decode its latents with: pass --tokenizer")
    tok = spec if isinstance(spec, Tokenizer) else load_tokenizer(spec, device=device)
    check_trained_on(gen, tok)
    tok.compile_networks(compile, device)
    return tok.decode


def _fae_decoder(gen: Generator, fae: str | Path | None, pixel_decoder: str | Path | None,
                 device: str | torch.device, compile: CompileMode) -> Decoder:
    if fae is None:
        expected = trained_fae_sha256(gen)
        raise ConfigError(f"{gen.source} generates FAE latents: pass the FAE it was trained on (--fae <pixel-decoder "
                          "fine-tune run or its tokenizer/ bundle>, or --fae <stage-1 run> --pixel-decoder <run>"
                          + (f"; its weights' SHA-256 starts {expected[:12]}" if expected else "")
                          + "), or sample from a pipeline folder (GenerationPipeline, `fae sample --pipeline`)")
    pipe = FAE.load(fae["path"] if isinstance(fae, dict) else fae, pixel_decoder, map_location=device)
    check_trained_on(gen, pipe)
    pipe.compile_networks(compile, device)
    return pipe.decode_to_pixels


def trained_tokenizer_kind(gen: Generator) -> str:
    """The kind of tokenizer whose latents the generator learned ("fae" for bundles that name none)."""
    origin = gen.record.latents
    return (origin.tokenizer if origin else None) or "fae"


def trained_fae_sha256(gen: Generator) -> str | None:
    """The SHA-256 of the FAE weights whose latents the generator learned (its bundle's identity of the FAE)."""
    return gen.record.latents.fae_sha256 if gen.record.latents else None


def check_trained_on(gen: Generator, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer that is not the one the generator was trained on (another kind, other weights, another
    latent shape): its samples would decode wrongly."""
    if gen.record.raw_features:
        raise ConfigError(f"{gen.source} generates raw encoder features, not a tokenizer's latents; decode them with "
                          "load_decoder(gen, pixel_decoder=...)")
    origin = gen.record.latents
    check_tokenizer(tokenizer, trained_tokenizer_kind(gen), origin.tokenizer_sha256 if origin else None,
                    tuple(gen.latent_shape), origin.image_size if origin else None, gen.source)
    check_noise_tuned(gen, tokenizer)


def check_noise_tuned(gen: Generator, tokenizer: Tokenizer) -> None:
    """An FAE whose feature decoder was noise-tuned for a flow (fae.stages.autoencoder, latent_noise_flow) decodes
    that flow's noise (noise_std x its latent std per channel): refuse it for a flow trained at another noise."""
    if not isinstance(tokenizer, FAE) or tokenizer.source is None or not isinstance(gen, FlowGenerator):
        return
    stage1 = tokenizer.source / "fae" if (tokenizer.source / "fae").is_dir() else tokenizer.source
    noise = read_bundle_config(stage1).get("latent_noise")
    if noise is None:
        return
    scale = (gen.noise_std * gen.std.float().cpu()).tolist()
    if len(scale) != len(noise["scale"]) or any(abs(a - b) > 1e-5 * max(abs(b), 1e-8) + 1e-7
                                                for a, b in zip(scale, noise["scale"], strict=False)):
        raise ConfigError(f"{stage1} was noise-tuned for a flow with noise_std {noise['noise_std']} ({noise['flow']}), "
                          f"but {gen.source} was trained with noise_std {gen.noise_std} (or other latent statistics): "
                          "noise-tune a decoder for this flow (latent_noise_flow=...) or decode with the plain FAE")


# --------------------------------------------------------------------------------------------------- generation
def make_labels(spec: str | Sequence[int], num_samples: int, num_classes: int, seed: int) -> torch.Tensor | None:
    """`equal`: i mod K; `random`: uniform from the seed; or explicit class ids (repeated to num_samples)."""
    if num_classes == 0:
        return None
    if isinstance(spec, str):
        if spec == "equal":
            return torch.arange(num_samples) % num_classes
        if spec == "random":
            return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))
        try:
            spec = [int(s) for s in spec.split(",")]
        except ValueError:
            raise ConfigError(f"labels must be 'equal', 'random' or comma-separated class ids, got {spec!r}") from None
    ids = torch.tensor(list(spec), dtype=torch.long)
    if ids.numel() == 0:
        raise ConfigError("labels: give at least one class id")
    check_class_ids(ids, num_classes, "class ids", error=ConfigError)
    return ids.repeat(math.ceil(num_samples / ids.numel()))[:num_samples]


@dataclass
class Samples:
    """Generated images: `images` (N,H,W,3) uint8 in sample-index order, `labels` (N,) int64 class or prompt ids,
    `indices` (N,) the global sample indices these rows hold, `settings` what produced them. `pil()` gives PIL
    images, `tensor()` (N,3,H,W) floats in [0,1]."""

    images: np.ndarray
    labels: np.ndarray | None
    indices: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def pil(self) -> list[Any]:
        from PIL import Image

        return [Image.fromarray(img) for img in self.images]

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def generate(gen: Generator, decode: Decoder, num_samples: int, seed: int = 0, labels: str | Sequence[int] = "equal",
             sampler: SamplerConfig | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
             progress: bool = True, gather: bool = True, precision: str = "auto",
             prompts: Sequence[str] | None = None, resume_dir: str | Path | None = None,
             compile: CompileMode = "auto", on_progress: Progress | None = None) -> Samples:
    """Generate `num_samples` images. Under torchrun each process takes chunks k = rank, rank + W, ... and, with
    `gather`, rank 0 returns all of them in index order (other ranks return their own part).
    A text generator (`gen.condition_kind == "text"`) needs `prompts`; `labels` then holds each sample's prompt id.
    `precision` (auto | fp32 | bf16, fae.precision) sets the model's autocast; the integration stays float32.
    With `resume_dir`, each finished chunk is kept there, and a run with the same settings that was interrupted
    takes its finished chunks from it instead of sampling them again (sample i depends only on (seed, i)).
    `compile` (auto | on | off, fae.speed) compiles the generator's network in place (the decoder: `load_decoder`).
    `on_progress(done, total)` is called after each chunk (`fae serve` reports it; the tqdm bar is unaffected)."""
    from tqdm.auto import tqdm

    try:
        choice = resolve_precision(precision, device)
        compiled = compile_wanted(compile, device) and gen.compile_model()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    sampler = sampler or SamplerConfig()
    sampler.validate()
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}")
    ys, prompt_list = sample_conditions(gen, num_samples, labels, prompts, seed, sampler)
    text = gen.condition_kind == "text"
    rank, world = D.rank(), D.world_size()
    chunks = [range(k * batch_size, min(num_samples, (k + 1) * batch_size))
              for k in range(math.ceil(num_samples / batch_size))]
    mine = chunks[rank::world]
    images, indices = [], []
    total = sum(len(c) for c in mine)
    bar = tqdm(total=total, desc="sample", disable=not (progress and rank == 0),
               dynamic_ncols=True)
    shape = gen.latent_shape
    settings = {"num_samples": num_samples, "seed": seed, "labels": labels if isinstance(labels, str) else list(labels),
                "batch_size": batch_size, "precision": choice.as_dict(), "compiled": compiled, "sampler": to_dict(sampler),
                **({"prompts": prompt_list} if text else {}), **gen.settings(sampler)}
    done = _ChunkStore(resume_dir, settings) if resume_dir is not None else None
    for chunk in mine:
        idx = list(chunk)
        kept = done.load(idx[0]) if done is not None else None
        if kept is None:
            gens = sample_generators(seed, idx)
            noise = initial_noise((len(idx), *shape), gens, device)
            y: Any = None
            if ys is not None:
                y = [prompt_list[int(i)] for i in ys[idx]] if text else ys[idx].to(device)
            with choice.autocast():
                kept = to_uint8_hwc(decode(gen.sample(noise, y, sampler, gens)))
            if done is not None:
                done.save(idx[0], kept)
        images.append(kept)
        indices.extend(idx)
        bar.update(len(idx))
        if on_progress is not None:
            on_progress(len(indices), total)
    bar.close()
    part = Samples(np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8),
                   ys[indices].numpy() if ys is not None else None, np.asarray(indices, dtype=np.int64), settings)
    if world == 1 or not gather:
        return part
    return _gathered(part)


def sample_conditions(gen: Generator, num_samples: int, labels: str | Sequence[int], prompts: Sequence[str] | None,
                      seed: int, sampler: SamplerConfig) -> tuple[torch.Tensor | None, list[str]]:
    """Each sample's class id (or prompt id, for a text generator) and the prompts; ConfigError where the conditions
    do not fit the generator or the guidance."""
    text = gen.condition_kind == "text"
    prompt_list = list(prompts or [])
    if text and not prompt_list:
        raise ConfigError("this generator is text-conditional: give prompts (--prompt / --prompts)")
    if prompt_list and not text:
        raise ConfigError("this generator takes no prompts (it is class-conditional or unconditional)")
    ys = torch.arange(num_samples) % len(prompt_list) if text else make_labels(labels, num_samples, gen.num_classes, seed)
    autoguided = gen.guide is not None   # the guide replaces the unconditional branch: no condition needed
    if sampler.guidance.active and ys is None and not autoguided:
        raise ConfigError("guidance needs a conditional model (or a guidance model: autoguidance)")
    if sampler.guidance.active and not gen.supports_guidance and not autoguided:
        raise ConfigError("this model was trained without label dropout (class_dropout=0) or caption dropout "
                          "(caption_dropout=0): it has no unconditional branch for classifier-free guidance; sample "
                          "with guidance 'none'")
    if sampler.flow:   # a flow's sampling switches: checked here, before any sample is drawn
        if not isinstance(gen, FlowGenerator):
            raise ConfigError("--flow sets a normalizing flow's sampling switches; this generator is not a flow")
        gen.sampling_for(sampler)
    return ys, prompt_list


def _gathered(part: Samples) -> Samples:
    """Every process's part, on rank 0 in sample-index order (other ranks keep their own)."""
    parts = D.all_gather_objects(part)
    if D.rank() != 0:
        return part
    parts = [p for p in parts if len(p.indices)]
    order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
    labelled = part.labels is not None
    return Samples(np.concatenate([p.images for p in parts])[order],
                   np.concatenate([p.labels for p in parts])[order] if labelled else None,
                   np.concatenate([p.indices for p in parts])[order], part.settings)


class _ChunkStore:
    """Finished chunks of an interrupted `generate`, valid only for the same settings (written beside them)."""

    def __init__(self, folder: str | Path, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        key = json.dumps(settings, sort_keys=True, default=str)
        marker = self.folder / "settings.json"
        if D.is_main() and (not marker.is_file() or marker.read_text() != key):
            for old in self.folder.glob("chunk-*.npy"):   # another run's chunks: never mixed in
                old.unlink()
            atomic_write_text(marker, key)
        D.barrier()

    def load(self, first: int) -> np.ndarray | None:
        path = self.folder / f"chunk-{first:08d}.npy"
        try:
            return np.load(path) if path.is_file() else None
        except (OSError, ValueError):  # a damaged file (it is written atomically, so only by outside hands)
            return None

    def save(self, first: int, images: np.ndarray) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:   # a file object: np.save would add .npy to the temporary name
                np.save(f, images)

        atomic_write(self.folder / f"chunk-{first:08d}.npy", write)


# --------------------------------------------------------------------------------------------------- outputs
def image_grid(images: np.ndarray, labels: np.ndarray | None, class_names: Sequence[str] | None = None,
               per_row: int = 10, max_rows: int = 20):
    """A PIL grid: one row per class (its name on the left) with up to `per_row` samples; unlabelled samples fill
    rows in order."""
    rows: list[tuple[int | None, list[int]]]
    if labels is None:
        rows = [(None, list(range(i, min(len(images), i + per_row)))) for i in range(0, len(images), per_row)]
    else:
        rows = [(int(k), [int(i) for i in np.flatnonzero(labels == k)[:per_row]]) for k in np.unique(labels)]
    rows = rows[:max_rows]
    names = None if labels is None else [class_names[k] if class_names and k is not None and k < len(class_names)
                                         else f"class {k}" for k, _ in rows]
    return draw_grid([[images[i] for i in idx] for _, idx in rows], row_names=names)


def write_samples(out_dir: str | Path, samples: Samples, class_names: Sequence[str] | None = None,
                  grid: bool = True, pngs: bool = True, npz: bool = True, per_row: int = 10,
                  manifest: bool = True) -> dict[str, str]:
    """`grid.png` (labelled), `images/000000.png` ..., `samples.npz` (arr_0: uint8 NHWC, as the ADM evaluator
    reads; `labels`), and `samples.json` with the settings. Returns the written paths."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if npz:
        arrays = {"arr_0": samples.images}
        if samples.labels is not None:
            arrays["labels"] = samples.labels
        atomic_save_npz(out / "samples.npz", **arrays)
        written["npz"] = str(out / "samples.npz")
    if pngs:
        (out / "images").mkdir(exist_ok=True)
        for i, img in zip(samples.indices, samples.images, strict=True):
            Image.fromarray(img).save(out / "images" / f"{int(i):06d}.png")
        written["pngs"] = str(out / "images")
    if grid and len(samples.images):
        image_grid(samples.images, samples.labels, class_names, per_row=per_row).save(out / "grid.png")
        written["grid"] = str(out / "grid.png")
    if manifest:
        meta = {**samples.settings, "class_names": list(class_names) if class_names else None, "outputs": written}
        atomic_write_text(out / "samples.json", json.dumps(meta, indent=2))
    return written


def sample_to_dir(gen: Generator, decode: Decoder, out_dir: str | Path, num_samples: int, seed: int = 0,
                  labels: str | Sequence[int] = "equal", sampler: SamplerConfig | None = None, batch_size: int = 64,
                  device: str | torch.device = "cpu", progress: bool = True, grid: bool = True, pngs: bool = True,
                  npz: bool = True, per_row: int = 10, precision: str = "auto",
                  prompts: Sequence[str] | None = None, compile: CompileMode = "auto") -> dict[str, str]:
    """`fae sample`: generate and write the outputs. Under torchrun every process writes its own PNGs and a part
    file; rank 0 merges the parts in index order into `samples.npz` and the grid (through the disk, not memory
    gathers, so 50k samples at 256 px work on any backend)."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = out / ".chunks"   # finished chunks: a killed run, started again, samples only what is missing
    part = generate(gen, decode, num_samples, seed, labels, sampler, batch_size, device, progress, gather=False,
                    precision=precision, prompts=prompts, resume_dir=chunks, compile=compile)
    row_names = list(prompts) if prompts else gen.class_names   # a grid row per class, or per prompt
    if D.world_size() == 1:
        written = write_samples(out, part, row_names, grid, pngs, npz, per_row)
        shutil.rmtree(chunks, ignore_errors=True)
        return written
    rank = D.rank()
    write_samples(out, part, None, grid=False, pngs=pngs, npz=False, manifest=False)
    part_file = out / f".part-{rank:05d}.npz"
    atomic_save_npz(part_file, images=part.images, indices=part.indices,
                    **({"labels": part.labels} if part.labels is not None else {}))
    D.barrier()
    written = {}
    if rank == 0:
        files = sorted(out.glob(".part-*.npz"))
        loaded = [dict(np.load(f)) for f in files]
        loaded = [p for p in loaded if len(p["indices"])]
        idx = np.concatenate([p["indices"] for p in loaded])
        order = np.argsort(idx, kind="stable")
        merged = Samples(np.concatenate([p["images"] for p in loaded])[order],
                         np.concatenate([p["labels"] for p in loaded])[order] if "labels" in loaded[0] else None,
                         idx[order], part.settings)
        written = write_samples(out, merged, row_names, grid, pngs=False, npz=npz, per_row=per_row)
        if pngs:
            written["pngs"] = str(out / "images")
        for f in files:
            f.unlink()
    D.barrier()
    if rank == 0:
        shutil.rmtree(chunks, ignore_errors=True)
    return written
