"""Checkpoints: `save_pretrained`/`from_pretrained` bundles and atomic writes.

A bundle is a folder with `config.json` (the model's class, its dataclass config, and any extra record such as
the frozen encoder it belongs to) and `model.safetensors`. Every write goes to a temporary file in the same
folder and is renamed into place, so a kill never leaves a half-written checkpoint.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fae.config import ConfigError, from_dict, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
M = TypeVar("M", bound="PretrainedMixin")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (the identity of weights files and shipped assets)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module, keep: Callable[[str], bool] | None = None) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes, bytes in name order), independent of the file format
    they came in: the identity of feature networks in eval reports, of tokenizers in generator bundles and of frozen
    encoders in encoder references. `keep` selects the weights by name (default: all)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if keep is not None and not keep(name):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # reshape(-1): a 0-d tensor (e.g. CLIP's logit_scale) cannot be viewed as bytes; the bytes are unchanged
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_root() -> Path:
    """Where fae keeps caches (feature caches, evaluation features, the demo encoder): $FAE_CACHE, else
    $XDG_CACHE_HOME/fae, else ~/.cache/fae."""
    if os.environ.get("FAE_CACHE"):
        return Path(os.environ["FAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fae"


_WRITES = 0


def _kill_point() -> None:
    """Fault injection for the kill -9 tests: with FAE_KILL_AT_WRITE=N the process kills itself (SIGKILL, no
    cleanup) at its N-th atomic write, after the data is written and before it is renamed into place."""
    global _WRITES
    at = os.environ.get("FAE_KILL_AT_WRITE")
    if at:
        _WRITES += 1
        if int(at) == _WRITES:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` then rename onto `path` (atomic on POSIX); what `write` returns is ignored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _kill_point()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what a killed process left of its atomic writes in `folder` (`.<name>.<random>.tmp`): called by the
    one process that writes there, when it starts again."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_save_npz(path: str | Path, /, **arrays: Any) -> None:
    """Atomically write `arrays` as an uncompressed .npz at `path`, under their keyword names."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, **arrays)

    atomic_write(Path(path), write)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an older folder of the same name is removed only afterwards."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


MANIFEST_NAME = "manifest.json"


def write_checkpoint_manifest(folder: Path) -> None:
    """Record the SHA-256 of every file in `folder` (a checkpoint), so a damaged one is found before it is used."""
    folder = Path(folder)
    hashes = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
              if p.is_file() and p.name != MANIFEST_NAME}   # sub-folders too (a sharded checkpoint's dcp/)
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(hashes, indent=2))


def manifest_problem(folder: Path) -> str | None:
    """What is wrong with `folder` against its manifest (a missing, truncated or altered file), or None."""
    folder = Path(folder)
    try:
        hashes = json.loads((folder / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return f"{folder / MANIFEST_NAME} is missing"
    except (OSError, ValueError) as exc:
        return f"{folder / MANIFEST_NAME} is unreadable ({exc})"
    for name, expected in hashes.items():
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
        if file_sha256(folder / name) != expected:
            return f"{folder / name} does not match its recorded SHA-256 (truncated or altered)"
    return None


def state_dict_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied/shared storage cloned (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    out = {}
    for k, v in module.state_dict().items():
        ptr = v.untyped_storage().data_ptr() if v.device.type != "meta" else id(v)
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_bundle_config(path: str | Path) -> dict[str, Any]:
    """A bundle's config.json. Loading one folder asks for the same files several times (finding the bundle, its
    class, its weights' hash, its record): each file is parsed once per version (path, inode, size, mtime and ctime:
    an atomic rewrite is a new inode); callers get a copy they may change. An encoder the bundle carries inside
    (its reference names `bundle:<folder>`) comes back as that folder's absolute path, so callers load it as any
    other folder."""
    path = resolve_pretrained(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a fae bundle: {CONFIG_NAME} is missing")
    stat = cfg_file.stat()
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    record = copy.deepcopy(_parsed_config(str(cfg_file.resolve()), version))
    return _resolve_bundled_encoder(record, path)


@functools.lru_cache(maxsize=256)
def _parsed_config(path: str, version: tuple[int, ...]) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def resolve_pretrained(name_or_path: str | Path) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (needs network)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; expected a bundle folder with {CONFIG_NAME}")
    text = str(name_or_path)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text))
        except Exception as exc:  # offline, unknown id, ...
            raise FileNotFoundError(f"{text}: not a local folder, and fetching it from the hub failed ({exc})") from None
    raise FileNotFoundError(f"{text}: no such folder")


def find_bundle(path: Path, names: Sequence[str], classes: Sequence[str] | None = None) -> Path | None:
    """`path` itself when it is a bundle (of one of `classes`), else the first `path/<name>` that is one."""
    for p in [path, *(path / n for n in names)]:
        if (p / CONFIG_NAME).is_file() and (classes is None or read_bundle_config(p).get("class") in classes):
            return p
    return None


TOKENIZER_FOLDERS = ("tokenizer", "fae_pipeline")  # where a run keeps its FAE bundle; the second: written before 0.2


def find_autoencoder_bundle(path: str | Path) -> Path:
    """The stage-1 FeatureAutoEncoder bundle of whatever a user names: that bundle, the stage-1 run folder holding
    `fae/`, an FAE bundle with a pixel decoder (its `fae/`), or the pixel-decoder fine-tune run holding one."""
    path = Path(path)
    found = find_bundle(path, ["fae"], classes=["FeatureAutoEncoder"])
    if found is None:
        tokenizer = find_bundle(path, TOKENIZER_FOLDERS, classes=["FAE"])
        if tokenizer is not None:
            found = find_bundle(tokenizer, ["fae"], classes=["FeatureAutoEncoder"])
    if found is None:
        raise FileNotFoundError(f"{path}: no FAE here (a stage-1 bundle, a `fae train fae` run folder, or a "
                                "pixel-decoder fine-tune run); did that run finish?")
    return found


def require_bundle(path: str | Path, name: str, classes: Sequence[str] | None = None) -> Path:
    """`find_bundle` for an input the user named: a run folder's `<name>/` bundle, or `path` itself when it is a
    bundle; an error that says what was expected otherwise."""
    path = Path(path)
    found = find_bundle(path, [name], classes)
    if found is None:
        kind = f" of a {' or '.join(classes)}" if classes else ""
        raise FileNotFoundError(f"{path}: neither a {name} bundle nor a run folder holding {name}/{CONFIG_NAME}{kind} "
                                "(did that run finish?)")
    return found


def load_weights(weights: Path, sha256: str | None = None, map_location: str | torch.device = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """A safetensors file, checked against the SHA-256 its bundle records; errors name the file and the fix."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    if sha256 is not None and file_sha256(weights) != sha256:
        raise ValueError(f"{weights} does not match the SHA-256 its {CONFIG_NAME} records: the file is truncated or "
                         "altered; export or download the bundle again")
    try:
        return load_file(str(weights), device=str(map_location))
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{weights} is not a readable safetensors file ({exc}); export or download it again") from None


class PretrainedMixin:
    """Adds `save_pretrained`/`from_pretrained` to an nn.Module built as `cls(config)` from a dataclass config.

    Subclasses set `config_class` and keep `self.config`. `extra` records (e.g. the frozen encoder a model
    belongs to) go into config.json beside the config and come back from `read_bundle_config`.
    """

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"class": type(self).__name__, "config": to_dict(self.config), **(extra or {})}
        atomic_save_safetensors(state_dict_for_save(self), directory / WEIGHTS_NAME)  # type: ignore[arg-type]  # an nn.Module mixin
        record["weights_sha256"] = file_sha256(directory / WEIGHTS_NAME)   # checked on load: damage is named, not used
        atomic_write_text(directory / CONFIG_NAME, json.dumps(record, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls: type[M], name_or_path: str | Path, map_location: str | torch.device = "cpu") -> M:
        path = resolve_pretrained(name_or_path)
        record = read_bundle_config(path)
        if record.get("class") != cls.__name__:
            raise ConfigError(f"{path}: bundle holds a {record.get('class')}, not a {cls.__name__}")
        model = cls(from_dict(cls.config_class, record["config"]))  # type: ignore[call-arg]  # Module(config)
        weights = path / WEIGHTS_NAME
        # safetensors cannot read onto the meta device; the caller's .to(device) moves the model there
        load_to = "cpu" if torch.device(map_location).type == "meta" else map_location
        state = load_weights(weights, record.get("weights_sha256"), load_to)
        model.load_state_dict(state, strict=True)  # type: ignore[attr-defined]  # an nn.Module mixin
        return model


def save_config(obj: Any, path: str | Path) -> None:
    """A dataclass config as YAML, written atomically (every run writes its resolved config beside its checkpoints)."""
    import yaml

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(obj), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# which frozen encoder a bundle or cache belongs to

REFERENCE_KEYS = ("kind", "name_or_path", "revision", "input_size", "affine_norm")
REFERENCE_HASH = "weights_sha256"   # the encoder weights' content hash, in references written since bundles carry it
BUNDLE_PREFIX = "bundle:"           # a name_or_path relative to the folder of the bundle that records it


def _resolve_bundled_encoder(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`record` with its encoder's bundle-relative folder (`bundle:encoder`) made absolute against `folder`."""
    reference = record.get("encoder")
    if not isinstance(reference, dict):
        return record
    source = reference.get("name_or_path")
    if isinstance(source, str) and source.startswith(BUNDLE_PREFIX):
        reference["name_or_path"] = str((folder / source[len(BUNDLE_PREFIX):]).resolve())
    return record


def nested_reference(reference: dict[str, Any]) -> dict[str, Any]:
    """The reference a bundle one folder below records for the same encoder (the FAE tokenizer's `fae/` and
    `pixel_decoder/` share the tokenizer's `encoder/` copy: `bundle:../encoder`)."""
    source = reference.get("name_or_path")
    if isinstance(source, str) and source.startswith(BUNDLE_PREFIX):
        return {**reference, "name_or_path": f"{BUNDLE_PREFIX}../{source[len(BUNDLE_PREFIX):]}"}
    return reference


def _same_source(a: Any, b: Any) -> bool:
    """Two name_or_path values name the same encoder: equal strings, or the same local folder however written
    (relative to the working directory or absolute)."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def reference_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys on which two encoder references (`FrozenEncoder.reference()`) differ; empty = the same frozen encoder.
    When both record the weights' hash, the weights are named by it and not by where they lie (one encoder in a
    moved folder is the same one; another one under the same path is not); older references compare by place."""
    if a.get(REFERENCE_HASH) and b.get(REFERENCE_HASH):
        same_use = [k for k in REFERENCE_KEYS if k not in ("name_or_path", "revision") and a.get(k) != b.get(k)]
        return same_use + ([REFERENCE_HASH] if a[REFERENCE_HASH] != b[REFERENCE_HASH] else [])
    return [k for k in REFERENCE_KEYS
            if not (_same_source(a.get(k), b.get(k)) if k == "name_or_path" else a.get(k) == b.get(k))]


def check_same_encoder(expected: dict[str, Any] | None, actual: dict[str, Any] | None, what: str, against: str) -> None:
    """Refuse `what` (a bundle or cache) when the frozen encoder it records is not the one of `against`: the one
    rule every bundle, cache and pipeline check goes through."""
    if expected is None or actual is None:
        missing = what if expected is None else against
        raise ConfigError(f"{missing} does not record which frozen encoder it belongs to; re-export it with this "
                          "version of fae")
    differs = reference_differences(expected, actual)
    if differs:
        raise ConfigError(f"{what} was made with another encoder than {against} (the frozen encoders differ in "
                          f"{', '.join(differs)}: {[expected.get(k) for k in differs]} vs {[actual.get(k) for k in differs]})")


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The intact-looking checkpoints of a run folder (`checkpoints/step_N/` with a training state), oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "training_state.pt").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))
