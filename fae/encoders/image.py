"""Frozen pretrained visual encoders: images (B,3,H,W) in [0,1] -> patch features (B,N,D).

`FrozenEncoder` wraps a transformers vision model (DINOv2 with or without registers, SigLIP2, MAE), loaded
from a hub id or from a local folder written by `save_pretrained`. The wrapper owns the encoder's input
handling, so callers always pass plain [0,1] pixels:

1. resize (bicubic, antialiased) from the image size to the encoder resolution `input_size`;
2. normalise with the encoder's mean/std (its preprocessor_config.json, else the known default per kind);
3. run the model frozen (eval mode, no grad) and return the last layer's patch tokens after the final
   LayerNorm, with CLS and register tokens dropped. `affine_norm=False` re-normalises the pre-norm state
   without the LayerNorm's scale/shift, as RAE does.

Everything is documented in docs/encoders.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fae.config import ConfigError
from fae.io import (  # noqa: F401  (REFERENCE_KEYS, reference_differences: part of this module's API)
    BUNDLE_PREFIX,
    REFERENCE_HASH,
    REFERENCE_KEYS,
    reference_differences,
    replace_dir,
    state_dict_sha256,
)
from fae.nn import patchify
from fae.precision import DTYPES, PRECISIONS, Precision, PrecisionChoice, resolve_precision

log = logging.getLogger(__name__)
EncoderKind = Literal["dinov2", "dinov2_reg", "siglip2", "mae"]
EncoderDType = Literal["float32", "bfloat16", "float16"]
KINDS: tuple[str, ...] = get_args(EncoderKind)

# A bundle carries a copy of its frozen encoder (in `<bundle>/encoder/`) when the encoder is a local folder of at most
# this many bytes: the demo's (3.2 MB) and DINOv2-S (88 MB) travel with their bundles; larger ones (DINOv2-B and up,
# hundreds of MB to GB, usually shared by many runs) are recorded by absolute path + weights hash (docs/encoders.md).
BUNDLE_COPY_LIMIT = 100 * 2**20
BUNDLED_ENCODER_FOLDER = "encoder"
# a folder holding the recorded encoder when its recorded folder is gone (used only if its weights hash matches)
ENCODER_ENV = "FAE_ENCODER"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# used when a model folder has no preprocessor_config.json
DEFAULT_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_reg": (IMAGENET_MEAN, IMAGENET_STD),
    "mae": (IMAGENET_MEAN, IMAGENET_STD),
    "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# config.json `model_type` -> (kind, transformers class). SigLIP2 checkpoints at a fixed resolution
# (google/siglip2-*-patch16-256, ...) are SigLIP-architecture ("siglip"); only NaFlex ones are "siglip2".
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2_reg", "Dinov2WithRegistersModel"),
    "siglip": ("siglip2", "SiglipVisionModel"),
    "siglip_vision_model": ("siglip2", "SiglipVisionModel"),
    "siglip2": ("siglip2", "Siglip2VisionModel"),
    "siglip2_vision_model": ("siglip2", "Siglip2VisionModel"),
    "vit_mae": ("mae", "ViTMAEModel"),
}


def _unused_weight(key: str) -> bool:
    """Weights feature extraction never touches (SigLIP's pooling head, DINOv2's mask token): a checkpoint
    without them is still complete."""
    return key.startswith(("head.", "pooler.", "vision_model.head.")) or key.endswith("mask_token")


@dataclass
class EncoderConfig:
    kind: EncoderKind
    name_or_path: str  # hub id (needs network or the HF cache) or a local folder saved with save_pretrained
    revision: str | None = None
    input_size: int | None = None  # encoder resolution; None = the checkpoint's own (preprocessor crop size)
    affine_norm: bool = True  # False = RAE's final LayerNorm without its affine scale/shift
    dtype: EncoderDType = "float32"  # weights; features are always returned as float32
    # compute: auto = bf16 autocast where the device runs bf16 natively, else fp32 (fae.precision). The encoder sets
    # its own autocast, so training, `fae encode` and evaluation get the same features from the same image.
    precision: Precision = "auto"

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"encoder kind must be one of {list(KINDS)}, not {self.kind!r}")
        if not self.name_or_path:
            raise ValueError("encoder name_or_path is empty: give a hub id or a local model folder")
        if self.input_size is not None and self.input_size <= 0:
            raise ValueError(f"encoder input_size must be positive, not {self.input_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"encoder dtype must be one of {list(DTYPES)}, not {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"encoder precision must be one of {list(PRECISIONS)}, not {self.precision!r}")


@dataclass(frozen=True)
class KnownEncoder:
    """A paper-size encoder on the hub: its id, its resolution for 256-px images (always a 16x16 grid) and its
    architecture (transformers config kwargs), so it can be built offline, e.g. on meta to count parameters."""

    kind: str
    hub_id: str
    input_size: int
    arch: dict[str, Any]


def _dino(width: int, depth: int, heads: int, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4, patch_size=14,
                image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, **extra)


def _vit(width: int, depth: int, heads: int, mlp: int, patch: int, size: int, eps: float) -> dict[str, Any]:
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
                patch_size=patch, image_size=size, layer_norm_eps=eps)


KNOWN_ENCODERS: dict[str, KnownEncoder] = {
    "dinov2-s": KnownEncoder("dinov2", "facebook/dinov2-small", 224, _dino(384, 12, 6)),
    "dinov2-b": KnownEncoder("dinov2", "facebook/dinov2-base", 224, _dino(768, 12, 12)),
    "dinov2-l": KnownEncoder("dinov2", "facebook/dinov2-large", 224, _dino(1024, 24, 16)),
    "dinov2-g": KnownEncoder("dinov2", "facebook/dinov2-giant", 224, _dino(1536, 40, 24, use_swiglu_ffn=True)),
    "dinov2-reg-s": KnownEncoder("dinov2_reg", "facebook/dinov2-with-registers-small", 224,
                                 _dino(384, 12, 6, num_register_tokens=4)),
    "dinov2-reg-b": KnownEncoder("dinov2_reg", "facebook/dinov2-with-registers-base", 224,
                                 _dino(768, 12, 12, num_register_tokens=4)),
    "dinov2-reg-l": KnownEncoder("dinov2_reg", "facebook/dinov2-with-registers-large", 224,
                                 _dino(1024, 24, 16, num_register_tokens=4)),
    "dinov2-reg-g": KnownEncoder("dinov2_reg", "facebook/dinov2-with-registers-giant", 224,
                                 _dino(1536, 40, 24, num_register_tokens=4, use_swiglu_ffn=True)),
    "siglip2-b": KnownEncoder("siglip2", "google/siglip2-base-patch16-256", 256,
                              _vit(768, 12, 12, 3072, 16, 256, 1e-6)),
    "siglip2-l": KnownEncoder("siglip2", "google/siglip2-large-patch16-256", 256,
                              _vit(1024, 24, 16, 4096, 16, 256, 1e-6)),
    "siglip2-so400m": KnownEncoder("siglip2", "google/siglip2-so400m-patch16-256", 256,
                                   _vit(1152, 27, 16, 4304, 16, 256, 1e-6)),
    "siglip2-g": KnownEncoder("siglip2", "google/siglip2-giant-opt-patch16-256", 256,
                              _vit(1536, 40, 16, 6144, 16, 256, 1e-6)),
    # MAE-B/L have patch 16: 256 px (as RAE) gives the same 16x16 grid as the others
    "mae-b": KnownEncoder("mae", "facebook/vit-mae-base", 256, _vit(768, 12, 12, 3072, 16, 224, 1e-12)),
    "mae-l": KnownEncoder("mae", "facebook/vit-mae-large", 256, _vit(1024, 24, 16, 4096, 16, 224, 1e-12)),
    "mae-h": KnownEncoder("mae", "facebook/vit-mae-huge", 224, _vit(1280, 32, 16, 5120, 14, 224, 1e-12)),
}
# model_type each kind's registry entries use (SigLIP2 fixed-resolution checkpoints are "siglip")
_KNOWN_MODEL_TYPE = {"dinov2": "dinov2", "dinov2_reg": "dinov2_with_registers", "siglip2": "siglip_vision_model",
                     "mae": "vit_mae"}


def detect_kind(name_or_path: str, revision: str | None = None) -> str:
    """The encoder kind of a model folder or hub id, from its config.json `model_type`."""
    cfg = EncoderConfig(kind="dinov2", name_or_path=name_or_path, revision=revision)
    model_type = getattr(_read_hf_config(cfg), "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"{name_or_path}: model_type {model_type!r} is not a supported encoder "
                         f"(supported: {', '.join(sorted(_ARCHITECTURES))})")
    return _ARCHITECTURES[model_type][0]


def encoder_config_from_spec(spec: str, **overrides: Any) -> EncoderConfig:
    """The EncoderConfig a command line names: `<kind>:<folder or hub id>`, or a local model folder alone (its kind
    read from its config.json `model_type`); `overrides` set further fields (e.g. precision="fp32")."""
    kind, _, rest = spec.partition(":")
    if rest and kind in KINDS:
        name_or_path = rest
    else:
        name_or_path = spec
        if not (Path(spec).expanduser() / "config.json").is_file():
            raise ConfigError(f"encoder {spec!r}: not a local model folder with config.json; write the kind "
                              f"explicitly as <kind>:<hub id> (kinds: {', '.join(KINDS)})")
        try:
            kind = detect_kind(str(Path(spec).expanduser()))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return EncoderConfig(kind=kind, name_or_path=name_or_path, **overrides)  # type: ignore[arg-type]  # a kind of KINDS


def known_encoder_config(name: str, **overrides: Any) -> EncoderConfig:
    """EncoderConfig of a paper-size encoder, e.g. `known_encoder_config("dinov2-g")` (the paper's main one)."""
    if name not in KNOWN_ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(KNOWN_ENCODERS)}")
    known = KNOWN_ENCODERS[name]
    cfg = EncoderConfig(kind=known.kind, name_or_path=known.hub_id,  # type: ignore[arg-type]  # a known kind
                        input_size=known.input_size)
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# loading helpers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (e.g. the unused SigLIP text tower; we check missing weights ourselves) and
    its weight-loading progress bar (a frozen encoder loads silently)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _model_class(class_name: str) -> type[nn.Module]:
    import transformers

    return getattr(transformers, class_name)


def _read_hf_config(cfg: EncoderConfig) -> Any:
    from transformers import AutoConfig

    path = Path(cfg.name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a transformers model folder (config.json is missing); "
                                    "pass a folder written by save_pretrained, or a hub id")
        source = str(path)
    else:
        source = cfg.name_or_path
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(source, revision=cfg.revision)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"cannot load encoder {cfg.name_or_path!r}: not a local model folder, and the hub lookup failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline? Download it once "
            "with network, or save it with save_pretrained and pass the folder.") from None


def _read_preprocessor(cfg: EncoderConfig) -> dict[str, Any] | None:
    path = Path(cfg.name_or_path).expanduser()
    if path.is_dir():
        file = path / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(cfg.name_or_path, "preprocessor_config.json",
                                               revision=cfg.revision)).read_text())
    except Exception as exc:  # absent from the repo (or unreachable): fall back to the kind's known defaults
        log.info("%s: no preprocessor_config.json (%s); using the %s defaults", cfg.name_or_path,
                 type(exc).__name__, cfg.kind)
        return None


def _native_size(pre: dict[str, Any] | None, hf_config: Any) -> int:
    """The checkpoint's own resolution: the preprocessor's crop (DINOv2 hub configs say image_size=518 for the
    position table but are used at 224), else its resize target, else config.image_size."""

    def side(value: Any) -> int | None:
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            return value.get("height") or value.get("shortest_edge")
        return None

    if pre:
        if pre.get("do_center_crop", True) and side(pre.get("crop_size")):
            return int(side(pre["crop_size"]))  # type: ignore[arg-type]  # not None: checked above
        if side(pre.get("size")):
            return int(side(pre["size"]))  # type: ignore[arg-type]  # not None: checked above
    if getattr(hf_config, "image_size", None):
        size = hf_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    return int(math.isqrt(hf_config.num_patches)) * int(hf_config.patch_size)  # SigLIP2 NaFlex


def _mean_std(kind: str, pre: dict[str, Any] | None) -> tuple[Sequence[float], Sequence[float]]:
    if pre is not None and pre.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if pre is not None and "image_mean" in pre and "image_std" in pre:
        return pre["image_mean"], pre["image_std"]
    return DEFAULT_MEAN_STD[kind]


def _architecture(model_type: str | None, cfg: EncoderConfig) -> str:
    """The transformers class for a checkpoint's model_type, checked against the configured kind."""
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"{cfg.name_or_path}: model_type {model_type!r} is not a supported encoder "
                         f"(supported: {', '.join(sorted(_ARCHITECTURES))})")
    kind, class_name = _ARCHITECTURES[model_type]
    if kind != cfg.kind:
        raise ValueError(f"{cfg.name_or_path}: model_type {model_type!r} is an encoder of kind {kind!r}, "
                         f"but the config says kind={cfg.kind!r}; set kind: {kind}")
    return class_name


def _final_norm(model: nn.Module) -> nn.LayerNorm:
    for path in ("layernorm", "post_layernorm", "vision_model.post_layernorm"):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.LayerNorm):
            return module
    raise TypeError(f"{type(model).__name__}: cannot find its final LayerNorm")


def _non_affine_hook(norm: nn.LayerNorm, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    # replace the final norm's output by the same normalisation without weight/bias (RAE's feature definition)
    return F.layer_norm(inputs[0], norm.normalized_shape, eps=norm.eps)


# ----------------------------------------------------------------------------------------------------------------


class FrozenEncoder(nn.Module):
    """A frozen transformers vision encoder with its own resize + normalisation; see the module docstring.

    Build it with `from_config` (hub id or folder), `from_model` (a model in memory) or `skeleton` (a
    known architecture with random weights, no download). `grid`, `dim`, `num_tokens` describe the output.
    """

    mean: Tensor  # buffers (register_buffer), declared for the type checker
    std: Tensor

    def __init__(self, config: EncoderConfig, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        config.validate()
        _architecture(getattr(model.config, "model_type", None), config)
        self.arch = type(model).__name__
        hf: Any = model.config  # a transformers config: its fields are read by name
        self.patch_size = int(hf.patch_size)
        input_size = config.input_size if config.input_size is not None else _native_size(None, hf)
        if input_size % self.patch_size:
            raise ValueError(f"encoder input_size {input_size} is not a multiple of the patch size {self.patch_size}")
        self.config = dataclasses.replace(config, input_size=input_size)
        self.input_size = input_size
        self.grid = (input_size // self.patch_size, input_size // self.patch_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.dim = int(hf.hidden_size)
        # tokens in front of the patch tokens: CLS (+ registers); SigLIP has none
        self.num_prefix_tokens = {"dinov2": 1, "mae": 1, "siglip2": 0}.get(config.kind, 0)
        if config.kind == "dinov2_reg":
            self.num_prefix_tokens = 1 + int(hf.num_register_tokens)
        if config.kind == "mae":
            hf.mask_ratio = 0.0  # keep every token (MAE masks 75% by default)
        # the weights hash names the weights as loaded: taken now when the cast below would change them, else lazily
        self._weights_sha256: str | None = None
        if any(p.dtype != DTYPES[config.dtype] and not p.is_meta for p in model.parameters()):
            self._weights_sha256 = _weights_hash(model)
        self.model = model.to(DTYPES[config.dtype])
        self.model.eval()
        self.model.requires_grad_(False)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std need 3 channel values, got {list(mean)} / {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if not config.affine_norm:
            _final_norm(self.model).register_forward_hook(_non_affine_hook)

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> FrozenEncoder:
        """Load a hub id or a local folder (the same transformers `from_pretrained` path for both)."""
        cfg.validate()
        hf_config = _read_hf_config(cfg)
        class_name = _architecture(getattr(hf_config, "model_type", None), cfg)
        extra = {"mask_ratio": 0.0} if cfg.kind == "mae" else {}
        source = str(Path(cfg.name_or_path).expanduser()) if Path(cfg.name_or_path).expanduser().is_dir() \
            else cfg.name_or_path
        with _quiet_transformers():
            model, info = _model_class(class_name).from_pretrained(  # type: ignore[attr-defined]  # a transformers class
                source, revision=cfg.revision, output_loading_info=True, **extra)
        missing = [k for k in info.get("missing_keys", []) if not _unused_weight(k)]
        if missing:
            raise ValueError(f"{cfg.name_or_path}: the checkpoint lacks {len(missing)} weights of {class_name} "
                             f"(e.g. {missing[:3]}); it is not a complete {cfg.kind} encoder")
        pre = _read_preprocessor(cfg)
        if cfg.input_size is None:
            cfg = dataclasses.replace(cfg, input_size=_native_size(pre, model.config))
        mean, std = _mean_std(cfg.kind, pre)
        return cls(cfg, model, mean, std)

    @classmethod
    def from_reference(cls, reference: dict[str, Any], **overrides: Any) -> FrozenEncoder:
        """Rebuild the encoder a bundle recorded (`reference()` or `bundle_reference()`, as `read_bundle_config`
        returns it); `overrides` set other EncoderConfig fields (e.g. precision). A reference with the weights' hash
        is checked against what loads; when its folder is gone, $FAE_ENCODER may name a copy."""
        cfg = EncoderConfig(**{k: reference[k] for k in REFERENCE_KEYS if k in reference}, **overrides)
        recorded = reference.get(REFERENCE_HASH)
        if not recorded:  # written before references carried the hash: loaded from where it says, as then
            return cls.from_config(cfg)
        cfg = dataclasses.replace(cfg, name_or_path=_recorded_location(cfg.name_or_path, recorded))
        encoder = cls.from_config(cfg)
        if encoder.weights_sha256 != recorded:
            raise ConfigError(f"the frozen encoder in {cfg.name_or_path} is not the one recorded: its weights' SHA-256 "
                              f"is {encoder.weights_sha256}, the record says {recorded} (another encoder under that "
                              f"name?); put the recorded encoder there, or set {ENCODER_ENV} to a copy of it")
        return encoder

    @classmethod
    def from_model(cls, cfg: EncoderConfig, model: nn.Module, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> FrozenEncoder:
        """Wrap a transformers model already in memory (mean/std default to the kind's known values)."""
        default_mean, default_std = DEFAULT_MEAN_STD[cfg.kind]
        return cls(cfg, model, mean if mean is not None else default_mean, std if std is not None else default_std)

    @classmethod
    def skeleton(cls, name: str, **overrides: Any) -> FrozenEncoder:
        """A known encoder's architecture with random weights, built offline. Under `torch.device("meta")` it
        costs no memory: use it for shapes and parameter counts, never for features."""
        from transformers import AutoConfig

        cfg = known_encoder_config(name, **overrides)
        known = KNOWN_ENCODERS[name]
        hf_config = AutoConfig.for_model(_KNOWN_MODEL_TYPE[known.kind], **known.arch)
        class_name = _architecture(hf_config.model_type, cfg)
        return cls.from_model(cfg, _model_class(class_name)(hf_config))

    # -- interface ------------------------------------------------------------------------------------------------

    def reference(self) -> dict[str, Any]:
        """What caches and bundles record about the encoder their latents/features belong to (input_size resolved),
        with the weights' SHA-256 (`weights_sha256`; None on the meta device), which names the weights wherever they
        lie. Bundles write `bundle_reference`."""
        c = self.config
        return {"kind": c.kind, "name_or_path": c.name_or_path, "revision": c.revision, "input_size": c.input_size,
                "affine_norm": c.affine_norm, REFERENCE_HASH: self.weights_sha256}

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the weights feature extraction uses, as loaded (fae.io.state_dict_sha256), computed once:
        about 0.6 s per GB on one CPU core. None for a skeleton on the meta device (it has no weights)."""
        if self._weights_sha256 is None and not any(p.is_meta for p in self.model.parameters()):
            self._weights_sha256 = _weights_hash(self.model)
        return self._weights_sha256

    def bundle_reference(self, bundle: str | Path) -> dict[str, Any]:
        """The reference a bundle written to folder `bundle` records, so that it loads from anywhere: a local encoder
        folder of at most BUNDLE_COPY_LIMIT bytes is copied into `<bundle>/encoder/` and named `bundle:encoder`; a
        larger one keeps its absolute path, a hub id its id and revision. Each with the weights' hash."""
        reference = self.reference()
        folder = Path(self.config.name_or_path).expanduser()
        if not folder.is_dir():
            return reference
        if _folder_bytes(folder) <= BUNDLE_COPY_LIMIT:
            _copy_folder(folder, Path(bundle) / BUNDLED_ENCODER_FOLDER)
            reference["name_or_path"] = BUNDLE_PREFIX + BUNDLED_ENCODER_FOLDER
        else:
            reference["name_or_path"] = str(folder.resolve())
        return reference

    def train(self, mode: bool = True) -> FrozenEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout/drop-path never switch on, whatever the owner's mode
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """[0,1] images -> the model's normalised pixel_values at input_size (float32)."""
        _check_images(images)
        x = images.float()
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0.0, 1.0)  # bicubic overshoots; the processor's can't
        return (x - self.mean).div_(self.std)  # one new tensor: the caller's images (or the resize) stay as they are

    @property
    def precision(self) -> PrecisionChoice:
        """The compute precision on the encoder's current device (auto resolved there)."""
        return resolve_precision(self.config.precision, self.mean.device)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B,3,H,W) float in [0,1] -> (B, num_tokens, dim) float32 features. No grad, whatever the caller does;
        its own precision, whatever autocast the caller runs under."""
        with torch.autocast(images.device.type, enabled=False):
            pixels = self.preprocess(images).to(self.model_dtype)
        with self.precision.autocast():
            return self.tokens(pixels).float()

    def tokens(self, pixel_values: Tensor) -> Tensor:
        """Run the model on already-normalised pixels at input_size; return the patch tokens (B,N,D)."""
        b, _, h, w = pixel_values.shape
        if self.arch == "Siglip2VisionModel":
            # NaFlex takes pre-patchified pixels, a token mask and each image's grid; a square image is one full grid
            p = self.patch_size
            gh, gw = h // p, w // p
            patches = patchify(pixel_values, p)
            shapes = torch.tensor([[gh, gw]], device=pixel_values.device).expand(b, 2)
            mask = torch.ones(b, gh * gw, dtype=torch.int32, device=pixel_values.device)
            out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        elif self.arch == "ViTMAEModel":
            # increasing noise = identity shuffle, so the tokens stay in raster order
            n = (h // self.patch_size) * (w // self.patch_size)
            noise = torch.arange(n, device=pixel_values.device, dtype=torch.float32).expand(b, n)
            out = self.model(pixel_values=pixel_values, noise=noise,
                             interpolate_pos_encoding=h != self._config_size or w != self._config_size)
        elif self.arch == "SiglipVisionModel":
            out = self.model(pixel_values=pixel_values,
                             interpolate_pos_encoding=h != self._config_size or w != self._config_size)
        else:  # DINOv2 interpolates its position table itself whenever the grid differs
            out = self.model(pixel_values=pixel_values)
        return out.last_hidden_state[:, self.num_prefix_tokens:]

    @property
    def _config_size(self) -> int:
        hf: Any = self.model.config  # a transformers config: its fields are read by name
        size = hf.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def extra_repr(self) -> str:
        c = self.config
        return (f"kind={c.kind}, name_or_path={c.name_or_path!r}, input_size={c.input_size}, grid={self.grid}, "
                f"dim={self.dim}, affine_norm={c.affine_norm}")


def _weights_hash(model: nn.Module) -> str:
    # the weights a checkpoint may lack (and transformers then initialises at random) are no part of the identity
    return state_dict_sha256(model, keep=lambda name: not _unused_weight(name))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _copy_folder(source: Path, target: Path) -> None:
    """`source` copied to `target` whole, or not at all (copied beside it, then renamed into place)."""
    if target.exists() and target.resolve() == source.resolve():
        return  # a bundle written again where it was loaded from already holds it
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    replace_dir(tmp, target)


def _looks_local(name_or_path: str) -> bool:
    # a hub id is `owner/name`; anything else that is not there is a folder that was recorded and has gone
    return name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~"))


def _recorded_location(name_or_path: str, sha256: str) -> str:
    """Where to load a hashed reference's encoder from: where it was recorded, else the folder $FAE_ENCODER names
    when the recorded local folder is gone (from_reference checks the hash of what loads)."""
    if Path(name_or_path).expanduser().is_dir() or not _looks_local(name_or_path):
        return name_or_path
    supplied = os.environ.get(ENCODER_ENV)
    if supplied:
        if not Path(supplied).expanduser().is_dir():
            raise ConfigError(f"{ENCODER_ENV}={supplied} is not a folder; point it at the frozen encoder's model "
                              "folder (config.json, model.safetensors)")
        return supplied
    raise ConfigError(f"the frozen encoder recorded at {name_or_path} (weights SHA-256 {sha256}) is not there (a "
                      "bundle carries only encoders up to fae.encoders.image.BUNDLE_COPY_LIMIT inside; larger ones are "
                      f"recorded by path). Put the folder back at that path, or point {ENCODER_ENV} at a copy of it "
                      f"(e.g. {ENCODER_ENV}=/models/my-encoder fae sample ...); its weights must have that SHA-256")


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"FrozenEncoder expects images of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"FrozenEncoder expects float images in [0, 1], got dtype {images.dtype}; "
                        "convert with images.float() / 255")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"FrozenEncoder expects square images, got {images.shape[-2]}x{images.shape[-1]}; "
                         "centre-crop them first (fae.data does)")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"FrozenEncoder expects images in [0, 1], got values in [{float(lo):.3g}, {float(hi):.3g}]"
                             " (images in [-1, 1] or 0-255?)")


# ----------------------------------------------------------------------------------------------------------------


def save_tiny_encoder(kind: str, directory: str | Path, *, hidden_size: int = 32, num_layers: int = 2,
                      num_heads: int = 2, patch_size: int = 4, image_size: int = 16, num_register_tokens: int = 4,
                      naflex: bool = False, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      seed: int = 0) -> Path:
    """Build a tiny randomly initialised encoder of `kind`, save it as the hub would hold it (config.json,
    model.safetensors, preprocessor_config.json) and return the folder. For tests and offline demos.

    SigLIP2 is saved as a full image-text model like the hub's fixed-resolution checkpoints (`naflex=True`:
    the NaFlex Siglip2 architecture); MAE as ViTMAEForPreTraining, like facebook/vit-mae-*.
    """
    import transformers as tf

    if kind not in KINDS:
        raise ValueError(f"encoder kind must be one of {list(KINDS)}, not {kind!r}")
    directory = Path(directory)
    vit: dict[str, Any] = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                               patch_size=patch_size)
    config: Any  # one of five transformers config and model classes
    model_cls: Any
    text = dict(vocab_size=64, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=num_heads,
                intermediate_size=2 * hidden_size, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    if kind == "dinov2":
        config, model_cls = tf.Dinov2Config(**vit, image_size=image_size, mlp_ratio=2), tf.Dinov2Model
    elif kind == "dinov2_reg":
        config = tf.Dinov2WithRegistersConfig(**vit, image_size=image_size, mlp_ratio=2,
                                              num_register_tokens=num_register_tokens)
        model_cls = tf.Dinov2WithRegistersModel
    elif kind == "mae":
        config = tf.ViTMAEConfig(**vit, image_size=image_size, intermediate_size=2 * hidden_size,
                                 decoder_hidden_size=hidden_size, decoder_num_hidden_layers=1,
                                 decoder_num_attention_heads=num_heads, decoder_intermediate_size=2 * hidden_size)
        model_cls = tf.ViTMAEForPreTraining
    elif naflex:
        vision = dict(**vit, intermediate_size=2 * hidden_size, num_patches=(image_size // patch_size) ** 2)
        config, model_cls = tf.Siglip2Config(text_config=text, vision_config=vision), tf.Siglip2Model
    else:
        vision = dict(**vit, intermediate_size=2 * hidden_size, image_size=image_size)
        config, model_cls = tf.SiglipConfig(text_config=text, vision_config=vision), tf.SiglipModel
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        model = model_cls(config)
        with torch.no_grad():  # non-trivial norm affines, so the affine/non-affine feature options differ
            for module in model.modules():
                if isinstance(module, nn.LayerNorm) and module.weight is not None:
                    module.weight.normal_(1.0, 0.2)
                    module.bias.normal_(0.0, 0.2)
        model.save_pretrained(directory)
    default_mean, default_std = DEFAULT_MEAN_STD[kind]
    pre = {"do_normalize": True, "do_resize": True, "do_center_crop": True, "do_rescale": True,
           "image_mean": list(mean if mean is not None else default_mean),
           "image_std": list(std if std is not None else default_std),
           "size": {"height": image_size, "width": image_size},
           "crop_size": {"height": image_size, "width": image_size}}
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return directory
