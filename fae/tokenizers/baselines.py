"""The paper's baseline latent spaces through the diffusers classes that hold them (docs/tokenizers.md).

`sd-vae` (AutoencoderKL), `va-vae` (LightningDiT's f16d32 LDM checkpoint, converted here into an AutoencoderKL),
`rae` (AutoencoderRAE) and `dc-ae` (AutoencoderDC), each a `Tokenizer` registered at import. diffusers is imported
inside the functions that need it: importing it takes seconds, and `import fae` must not pay for it.
`save_pretrained` writes the diffusers folder plus a marker (`fae_tokenizer.json`, the kind) so a saved va-vae,
itself a plain AutoencoderKL folder, loads back as va-vae.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fae.config import ConfigError
from fae.io import atomic_write_text, state_dict_sha256
from fae.tokenizers.base import Tokenizer, TokenizerKind, register_tokenizer

MARKER = "fae_tokenizer.json"   # {"kind": ...} beside the diffusers files: which kind a saved folder is


def _folder_kind(folder: Path) -> tuple[str | None, str | None]:
    """(kind in our marker, diffusers `_class_name` in config.json) of a folder; None where absent."""
    def read(name: str, key: str) -> str | None:
        try:
            return json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None
    return read(MARKER, "kind"), read("config.json", "_class_name")


def _options(kind: str, options: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{kind} tokenizer: unknown option(s) {', '.join(unknown)}; it takes {', '.join(allowed)}")
    return {k: v for k, v in options.items() if v is not None}


def _looks_local(path: str) -> bool:
    """A hub id is `org/name`; anything else that does not exist here is a folder the user mistyped."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1


class DiffusersTokenizer(Tokenizer):
    """One diffusers autoencoder as a Tokenizer; subclasses say which class and how its latents are scaled."""

    model_class: ClassVar[str]            # the diffusers class name (config.json `_class_name`)
    load_options: ClassVar[tuple[str, ...]] = ("revision", "subfolder")
    about: ClassVar[str]                  # the registry's description
    bare_folders: ClassVar[bool] = True   # a diffusers folder of `model_class` without our marker is this kind

    def __init__(self, model: nn.Module, path: str, options: dict[str, Any] | None = None) -> None:
        self.model: Any = model.eval().requires_grad_(False)   # a diffusers ModelMixin (untyped here: see imports)
        self.path, self.options = str(path), dict(options or {})
        self.device = next(model.parameters()).device
        self._identity: str | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def identity(self) -> str:
        if self._identity is None:    # hashing a large VAE takes a while; the weights never change in here
            self._identity = state_dict_sha256(self.model)
        return self._identity

    def reference(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, **self.options}

    def to(self, device: str | torch.device) -> DiffusersTokenizer:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        atomic_write_text(directory / MARKER, json.dumps({"kind": self.kind, "source": self.reference()}, indent=2))
        return directory

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, torch.float32)

    @classmethod
    def load(cls, path: str | None, device: str | torch.device = "cpu", **options: Any) -> DiffusersTokenizer:
        """What `TokenizerKind.load` calls: `<kind>:<path>` with a reference's other keys as options."""
        return cls.from_diffusers(path, device, **options)

    @classmethod
    def from_diffusers(cls, path: str | None, device: str | torch.device = "cpu", **options: Any) -> DiffusersTokenizer:
        """A local diffusers folder (its config.json must name `model_class`) or a hub id (`from_pretrained`)."""
        if not path:
            raise ConfigError(f"{cls.kind} tokenizer: no path; name a hub id or a folder ({cls.kind}:<hub id or folder>)")
        opts = _options(cls.kind, options, cls.load_options)
        folder = Path(path).expanduser()
        if folder.exists():
            _check_folder(cls, folder / opts.get("subfolder", ""))
        elif _looks_local(path):
            raise ConfigError(f"{cls.kind} tokenizer: no such folder {path}; name an existing folder or a hub id org/name")
        import diffusers

        try:
            # low_cpu_mem_usage needs `accelerate` (not a dependency); without it diffusers warns and does this anyway
            model = getattr(diffusers, cls.model_class).from_pretrained(str(folder) if folder.exists() else path,
                                                                        low_cpu_mem_usage=False, **opts)
        except OSError as exc:   # not on the hub, offline, or a folder without weights
            raise ConfigError(f"{cls.kind} tokenizer: cannot load {path} as a diffusers {cls.model_class} ({exc}); "
                              "name a folder holding one, or a hub id reachable from here (HF_HUB_OFFLINE unset)") from exc
        return cls(model.to(device), path, opts)


def _check_folder(cls: type[DiffusersTokenizer], folder: Path) -> None:
    """Refuse a folder of another class or another kind before diffusers gives a less helpful error."""
    marker, class_name = _folder_kind(folder)
    if not folder.is_dir() or class_name is None:
        raise ConfigError(f"{cls.kind} tokenizer: {folder} is not a diffusers model folder (no config.json with "
                          f"_class_name); name a folder written by {cls.model_class}.save_pretrained or a hub id")
    if class_name != cls.model_class:
        raise ConfigError(f"{cls.kind} tokenizer: {folder} holds a diffusers {class_name}; {cls.kind} loads "
                          f"{cls.model_class} folders (name the kind that loads a {class_name})")
    if marker is not None and marker != cls.kind:
        raise ConfigError(f"{folder} holds a {marker} tokenizer, not {cls.kind}; load it as {marker}:{folder}")


class SDVAE(DiffusersTokenizer):
    """AutoencoderKL: images in [-1,1]; latents in diffusers' scaled space (z - shift_factor) * scaling_factor."""

    kind = "sd-vae"
    model_class = "AutoencoderKL"
    about = "Stable Diffusion's KL-f8 VAE (diffusers AutoencoderKL), e.g. stabilityai/sd-vae-ft-ema"

    def _scale_shift(self) -> tuple[float, float]:
        return float(self.config.scaling_factor), float(self.config.shift_factor or 0.0)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if image_size % factor:
            raise ConfigError(f"{self.kind} tokenizer: image size {image_size} is not a multiple of its factor {factor}")
        return int(self.config.latent_channels), image_size // factor, image_size // factor

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        posterior = self.model.encode(self._pixels(images) * 2 - 1).latent_dist
        scale, shift = self._scale_shift()
        return ((posterior.mean - shift) * scale).float(), (posterior.std * scale).float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_distribution(images)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift()
        z = latents.to(self.device, torch.float32) / scale + shift
        return ((self.model.decode(z).sample + 1) / 2).clamp(0, 1).float()


# ------------------------------------------------------------------------------------------------------ VA-VAE
VAVAE_HUB_FILE = "vavae-imagenet256-f16d32-dinov2.pt"   # in hustvl/vavae-imagenet256-f16d32-dinov2
# LightningDiT tokenizer/configs/vavae_f16d32.yaml (ddconfig; embed_dim = z_channels = 32, double_z)
VAVAE_LDM = {"ch": 128, "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2, "attn_resolutions": (16,), "z_channels": 32,
             "resolution": 256}
# training-only: LPIPS + discriminator (loss.), the frozen DINOv2 and the VF-loss projection, an EMA copy
LDM_TRAINING_PREFIXES = ("loss.", "foundation_model.", "linear_proj.", "model_ema.")
CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")


def ldm_vae_config(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                   z_channels: int, resolution: int) -> dict[str, Any]:
    """AutoencoderKL arguments for an LDM ddconfig: a level gets attention where its resolution is listed."""
    levels = [resolution // 2 ** i in attn_resolutions for i in range(len(ch_mult))]
    return {"in_channels": 3, "out_channels": 3, "latent_channels": z_channels, "layers_per_block": num_res_blocks,
            "block_out_channels": [ch * m for m in ch_mult], "sample_size": resolution, "scaling_factor": 1.0,
            "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in levels],
            "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(levels)]}


_ATTENTION_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_vae_key(key: str, levels: int) -> str:
    """One LDM VAE key as its diffusers AutoencoderKL name (an unknown key comes back unchanged)."""
    def up(m: re.Match[str]) -> str:     # LDM counts decoder levels from the smallest, diffusers from the input
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.{m[2]}."
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.(block|attn|downsample)\.", lambda m: f"encoder.down_blocks.{m[1]}.{m[2]}.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.", up, key)
    key = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = re.sub(r"\.mid\.attn_1\.", ".mid_block.attentions.0.", key)
    key = key.replace(".block.", ".resnets.").replace(".attn.", ".attentions.").replace("nin_shortcut", "conv_shortcut")
    key = re.sub(r"\.(downsample|upsample)\.conv\.", lambda m: f".{m[1]}rs.0.conv.", key)
    leaf = re.match(r"^(.*\.attentions\.\d+\.)(norm|q|k|v|proj_out)\.(weight|bias)$", key)
    return f"{leaf[1]}{_ATTENTION_LEAVES[leaf[2]]}.{leaf[3]}" if leaf else key


def convert_ldm_vae(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An LDM VAE state dict (training-only keys dropped) in AutoencoderKL names; 1x1 attention convs -> linears."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, tensor in state.items():
        if key.startswith(LDM_TRAINING_PREFIXES):
            continue
        name = ldm_vae_key(key, levels)
        out[name] = tensor[:, :, 0, 0] if ".attentions." in name and tensor.ndim == 4 else tensor
    return out


def _read_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    try:   # weights only: a checkpoint is data, never code to run
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:   # an UnpicklingError for a Lightning checkpoint with objects in it
        raise ConfigError(f"va-vae tokenizer: cannot read {file} as weights ({exc}); if you trust the file, save its "
                          "state_dict with torch.save and name that file") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_ldm_vae(file: Path, ldm: dict[str, Any] = VAVAE_LDM) -> nn.Module:
    """An AutoencoderKL holding an LDM-format VAE checkpoint; every model key filled and every checkpoint key used."""
    from diffusers import AutoencoderKL

    try:
        config = ldm_vae_config(**ldm)
    except TypeError as exc:
        raise ConfigError(f"va-vae tokenizer: ldm_config {ldm} ({exc}); it takes {', '.join(VAVAE_LDM)}") from exc
    model: Any = AutoencoderKL(**config)   # diffusers types it apart from nn.Module for mypy
    state = convert_ldm_vae(_read_checkpoint(file), config)
    expected = model.state_dict()
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise ConfigError(f"va-vae tokenizer: {file} does not fit the VA-VAE layout {ldm}: "
                          + "; ".join(f"{what} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                                      for what, keys in (("missing", missing), ("unknown", unknown)) if keys))
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        raise ConfigError(f"va-vae tokenizer: {file}: shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                          f"the model's is {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict(state, strict=True)
    return model


class VAVAE(SDVAE):
    """LightningDiT's VA-VAE (f16d32, DINOv2-aligned): an AutoencoderKL with scaling 1.0. LightningDiT normalises
    the latents per channel from data statistics; fae's latent cache computes those exactly, so nothing here."""

    kind = "va-vae"
    load_options = ("revision", "filename", "ldm_config")   # ldm_config: another VA-VAE's ddconfig (VAVAE_LDM's keys)
    about = "LightningDiT's VA-VAE f16d32 (hustvl/vavae-imagenet256-f16d32-dinov2), as an AutoencoderKL"
    bare_folders = False   # a bare AutoencoderKL folder is sd-vae; a saved va-vae carries the marker

    @classmethod
    def load(cls, path: str | None, device: str | torch.device = "cpu", **options: Any) -> DiffusersTokenizer:
        """A saved va-vae folder, a checkpoint file, a folder holding one, or a hub id (hf_hub_download)."""
        opts = _options(cls.kind, options, cls.load_options)
        local = Path(path or "").expanduser()
        if path and local.is_dir() and _folder_kind(local)[1] is not None:
            return cls.from_diffusers(path, device, **{k: v for k, v in opts.items() if k == "revision"})
        if path and local.is_dir():
            local = _one_checkpoint(local, opts.get("filename"))
        elif path and not local.exists():
            if _looks_local(path):
                raise ConfigError(f"va-vae tokenizer: no such file or folder {path}; name a checkpoint, a folder, "
                                  "or the hub id hustvl/vavae-imagenet256-f16d32-dinov2")
            from huggingface_hub import hf_hub_download

            try:
                local = Path(hf_hub_download(path, opts.get("filename", VAVAE_HUB_FILE), revision=opts.get("revision")))
            except Exception as exc:   # not found, offline, gated: the hub's errors are many classes
                raise ConfigError(f"va-vae tokenizer: cannot download {opts.get('filename', VAVAE_HUB_FILE)} "
                                  f"from {path} ({exc})") from exc
        elif not path or local.suffix not in CHECKPOINT_SUFFIXES:
            raise ConfigError(f"va-vae tokenizer: {path!r} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        return cls(load_ldm_vae(local, opts.get("ldm_config", VAVAE_LDM)).to(device), str(path), opts)


def _one_checkpoint(folder: Path, filename: str | None) -> Path:
    found = [folder / filename] if filename else sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) != 1 or not found[0].is_file():
        raise ConfigError(f"va-vae tokenizer: {folder} holds {len(found)} checkpoint(s) "
                          f"({', '.join(p.name for p in found) or 'none'}); name one with the filename option")
    return found[0]


# ------------------------------------------------------------------------------------------------ RAE, DC-AE
class RAE(DiffusersTokenizer):
    """AutoencoderRAE: resizes and ImageNet-normalises [0,1] images itself; latents (encoder width, grid, grid)
    already normalised by its stored latent statistics; decodes to its one image size."""

    kind = "rae"
    model_class = "AutoencoderRAE"
    about = "a representation autoencoder (diffusers AutoencoderRAE), e.g. nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08"

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        size = int(self.model.decoder_image_size)
        if image_size != size:   # it would resize the input and decode to `size`: another image size in, another out
            raise ConfigError(f"rae tokenizer: it makes {size}-px images, not {image_size}-px; pick a release for "
                              f"{image_size} px (e.g. the -i512 one for 512)")
        grid = int(self.config.encoder_input_size) // int(self.config.encoder_patch_size)
        return int(self.config.encoder_hidden_size), grid, grid

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(self._pixels(images)).latent.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.model.decode(latents.to(self.device, torch.float32)).sample
        return images.clamp(0, 1).float()

    @classmethod
    def load(cls, path: str | None, device: str | torch.device = "cpu", **options: Any) -> DiffusersTokenizer:
        tokenizer = cls.from_diffusers(path, device, **options)
        if not tokenizer.config.reshape_to_2d:
            raise ConfigError(f"rae tokenizer: {path} has reshape_to_2d false; fae needs (B,C,h,w) latents")
        return tokenizer


class DCAE(DiffusersTokenizer):
    """AutoencoderDC (deep compression): images in [-1,1], deterministic latents times scaling_factor."""

    kind = "dc-ae"
    model_class = "AutoencoderDC"
    about = "a deep-compression autoencoder (diffusers AutoencoderDC), e.g. mit-han-lab/dc-ae-f32c32-in-1.0-diffusers"

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        factor = int(self.model.spatial_compression_ratio)
        if image_size % factor:
            raise ConfigError(f"dc-ae tokenizer: image size {image_size} is not a multiple of its factor {factor}")
        return int(self.config.latent_channels), image_size // factor, image_size // factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.model.encode(self._pixels(images) * 2 - 1).latent
        return (z * float(self.config.scaling_factor)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / float(self.config.scaling_factor)
        return ((self.model.decode(z).sample + 1) / 2).clamp(0, 1).float()


# ---------------------------------------------------------------------------------------------- registration
def _recogniser(cls: type[DiffusersTokenizer]) -> Callable[[Path], bool]:
    """Our marker decides; a bare diffusers folder (no marker) is the kind whose class it holds."""
    def recognises(folder: Path) -> bool:
        marker, class_name = _folder_kind(Path(folder))
        return marker == cls.kind if marker is not None else cls.bare_folders and class_name == cls.model_class
    return recognises


for _cls in (SDVAE, VAVAE, RAE, DCAE):
    register_tokenizer(TokenizerKind(_cls.kind, _cls.load, _recogniser(_cls), _cls.about))
