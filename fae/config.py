"""One config system: YAML files mapped onto typed dataclasses, with `key=value` overrides.

Unknown keys, wrong types and bad values are `ConfigError`s that name the offending key, e.g.
`model.latent_channels: expected int, got 'abc'`. Every run writes its resolved config (`to_dict`).
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        return _convert_sequence(tp, origin, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = get_args(tp)[1] if get_args(tp) else Any
        return {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and tp in _SCALARS:  # bool, int, float, str
        return _SCALARS[tp](value, key)
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    """The first member of `tp` that takes `value` (None for an Optional's None)."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")


def _convert_sequence(tp: Any, origin: Any, value: Any, key: str) -> list[Any] | tuple[Any, ...]:
    """A list, a homogeneous tuple (`tuple[X, ...]`) or a fixed-length tuple (`tuple[X, Y]`)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    args = get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    item = args[0] if args else Any
    out = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _convert_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _convert_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _convert_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _convert_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _convert_bool, int: _convert_int, float: _convert_float,
                                                  str: _convert_str}


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]  # T is a dataclass here
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, key)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON/YAML-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote it, "
                          "e.g. key='[text'") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested mapping, returning a copy."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a mapping")
        node[path[-1]] = value
    return data


def section_overrides(overrides: list[str] | tuple[str, ...], section: str) -> list[str]:
    """Overrides of one section's keys, written with or without the section's name (`data.root=x` or `root=x`):
    commands that read one block of a stage YAML take both, so a line copied from `fae train` works."""
    prefix = f"{section}."
    return [text[len(prefix):] if text.startswith(prefix) else text for text in overrides]


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # configs/ of a checkout is a link to it


def find_config(path: str | Path) -> Path:
    """A config file: `path` itself, or, for `configs/...` when there is no such file here (an installed fae run
    outside a checkout), the copy that ships inside the package."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute() and path.parts[:1] == ("configs",):
        packaged = PACKAGED_CONFIGS.joinpath(*path.parts[1:])
        if packaged.is_file():
            return packaged
        raise ConfigError(f"config file not found: {path} (nor {packaged} in the installed package; "
                          f"the packaged configs are {', '.join(sorted(_packaged_names()))})")
    raise ConfigError(f"config file not found: {path}")


def _packaged_names() -> list[str]:
    return [f"configs/{p.relative_to(PACKAGED_CONFIGS).as_posix()}" for p in PACKAGED_CONFIGS.glob("*/*.yaml")]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def yaml_section(path: str | Path, key: str = "data",
                 missing: Literal["error", "empty", "top_level"] = "error") -> dict[str, Any]:
    """A copy of the `key:` mapping of a YAML file (e.g. a stage config's `data:` block), read by `read_yaml`.

    Where the file has no such mapping (or `key:` is empty): a ConfigError naming the file (missing="error"), {}
    ("empty": the section's defaults), or the file's own top-level fields less `stage` ("top_level": a file that
    is the section itself)."""
    data = read_yaml(path)
    section = data.get(key)
    if isinstance(section, dict):
        return dict(section)
    if section is not None:
        raise ConfigError(f"{path}: `{key}:` must be a mapping, got {type(section).__name__}")
    if missing == "empty":
        return {}
    if missing == "top_level":
        return {k: v for k, v in data.items() if k != "stage"}
    raise ConfigError(f"{path} has no `{key}:` section")
