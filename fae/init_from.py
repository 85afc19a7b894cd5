"""`init_from`: a new training run that starts from another run's weights (docs/training.md).

Only weights move; the optimizer, LR schedule and step start afresh. A stage names where its bundle lies
(`TrainStage.init_bundle`) and which tensors may differ from the source's (`TrainStage.init_rules`: a class table when
the class count differs, a text projection when the text width does); any other difference refuses the load, naming
the tensors and both shapes. The trainer calls `initialise_from` once, before the EMA copies the weights, and only
while the run folder has no checkpoint of its own, so a resumed run never reads the source again.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from fae import sharding
from fae.config import ConfigError, read_yaml
from fae.io import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    checkpoint_dirs,
    file_sha256,
    find_bundle,
    load_weights,
    manifest_problem,
    read_bundle_config,
)


@dataclass(frozen=True)
class InitRule:
    """How `init_from` treats the tensors of a module whose state_dict names match one of `patterns` (fnmatch):
    where any of them differs from the source's in shape (or either side lacks it), all of them keep this run's
    fresh values and `reason` is logged and recorded; `always`: they are this run's even when the shapes agree (a
    buffer the new data sets, such as MMDiT's empty-prompt embedding)."""

    patterns: tuple[str, ...]
    reason: str
    always: bool = False

    def matches(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.patterns)


@dataclass
class InitSource:
    """The weights a run starts from (`init_from`), per trained module, and where they came from."""

    path: str
    kind: Literal["bundle", "checkpoint"]
    files: dict[str, Path]                         # module -> the safetensors file its weights were read from
    weights: dict[str, dict[str, torch.Tensor]]    # module -> state_dict
    model_config: dict[str, Any] | None = None     # the source model's config as recorded (bundle or config.yaml)
    record: dict[str, Any] | None = None           # a fae bundle's whole config.json


def bundle_source(path: Path, folder: str, classes: Sequence[str], module: str) -> InitSource | None:
    """`path` when it is a fae bundle (fae.io.PretrainedMixin) of one of `classes`, else its `<folder>/` bundle (a
    finished run), as the weights of `module` (checked against the SHA-256 the bundle records); None when neither."""
    found = find_bundle(path, [folder], classes) if path.is_dir() else None
    if found is None:
        return None
    record = read_bundle_config(found)
    weights = found / WEIGHTS_NAME
    return InitSource(str(path), "bundle", {module: weights},
                      {module: load_weights(weights, record.get("weights_sha256"))}, record.get("config"), record)


def checkpoint_source(path: Path, modules: Sequence[str], stage_name: str | None) -> InitSource:
    """The newest intact checkpoint of the run folder `path`: per module its EMA weights where the run kept an EMA
    (what it would export), else its live weights; the run's config.yaml must name the same stage."""
    ckpts = checkpoint_dirs(path) if path.is_dir() else []
    if not ckpts:
        raise ConfigError(f"init_from={path}: neither a {stage_name or 'this stage'} bundle nor a run folder with "
                          "checkpoints")
    config = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    named = config.get("stage")
    if stage_name is not None and named not in (None, stage_name):
        raise ConfigError(f"init_from={path}: a '{named}' run, not a '{stage_name}' one")
    problems = []
    for ckpt in reversed(ckpts):
        problem = manifest_problem(ckpt) if (ckpt / MANIFEST_NAME).is_file() else None
        if problem:
            problems.append(f"{ckpt}: {problem}")
            continue
        if sharding.has_state(ckpt):
            raise ConfigError(f"init_from={path}: {ckpt} holds sharded (train.fsdp) weights; start from the run's "
                              "bundle (let the run finish) instead")
        files = {}
        for name in modules:
            found = [f for f in (ckpt / f"{name}.ema.safetensors", ckpt / f"{name}.safetensors") if f.is_file()]
            if found:
                files[name] = found[0]
        return InitSource(str(path), "checkpoint", files, {n: load_file(str(f)) for n, f in files.items()},
                          config.get("model"))
    raise ConfigError(f"init_from={path}: no intact checkpoint ({'; '.join(problems)})")


def _shape(t: torch.Tensor | None) -> str:
    return "absent" if t is None else str(tuple(t.shape))


def load_init_weights(module: nn.Module, source: Mapping[str, torch.Tensor], rules: Sequence[InitRule], what: str
                      ) -> tuple[dict[str, str], list[str]]:
    """Copy `source` into `module` tensor by tensor. A rule whose tensors differ from the source's in any shape (or
    are missing on either side) keeps this run's fresh values for all of its tensors (a table with its null row, a
    projection's weight and bias); an `always` rule keeps them in any case. Any other difference (a name on one side
    only, another shape) refuses the whole load, naming the tensors and both shapes. Returns (re-initialised
    tensor -> why, tensors kept from this run by an `always` rule)."""
    own = module.state_dict()
    keys = sorted(own.keys() | source.keys())
    rule_of = {k: next((r for r in rules if r.matches(k)), None) for k in keys}

    def differs(k: str) -> bool:
        return k not in own or k not in source or own[k].shape != source[k].shape

    triggered = {r for k, r in rule_of.items() if r is not None and (r.always or differs(k))}
    merged = dict(own)
    reinitialised: dict[str, str] = {}
    kept: list[str] = []
    problems = []
    for key in keys:
        rule = rule_of[key]
        if rule in triggered:
            if key in own and rule is not None and rule.always:
                kept.append(key)
            elif key in own and rule is not None:
                reinitialised[key] = f"{rule.reason}: source {_shape(source.get(key))}, this run {_shape(own[key])}"
        elif differs(key):
            problems.append(f"{key}: source {_shape(source.get(key))}, this run {_shape(own.get(key))}")
        else:
            merged[key] = source[key]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ConfigError(f"{what}: the source's weights do not fit this run's model, another architecture or latent "
                          f"space: {'; '.join(problems[:6])}{more}. Make the model block equal to the source's (its "
                          "config.yaml or bundle config.json), or train from scratch")
    module.load_state_dict(merged)
    return reinitialised, kept


class InitTarget(Protocol):
    """What `initialise_from` needs of a stage (fae.training.TrainStage implements it)."""

    modules: dict[str, nn.Module]

    def init_bundle(self, path: Path) -> InitSource | None: ...
    def init_rules(self) -> dict[str, list[InitRule]]: ...
    def check_init_source(self, source: InitSource) -> list[str]: ...


def initialise_from(stage: InitTarget, path: str, stage_name: str | None = None, announce: bool = True
                    ) -> dict[str, Any]:
    """Load the weights of the run or bundle `path` into `stage.modules` (the trainer then copies them into the EMA:
    live weights and EMA both start from the source's exported weights); returns the record run.json keeps. Only
    weights move: the optimizer, LR schedule and step start afresh. A module the source lacks (a discriminator a
    Gaussian decoder run never had) keeps its fresh init."""
    where = Path(path)
    if not where.exists():
        raise ConfigError(f"init_from={path}: no such folder")
    source = stage.init_bundle(where) or checkpoint_source(where, list(stage.modules), stage_name)
    if not source.weights:
        raise ConfigError(f"init_from={path}: holds none of this stage's modules ({', '.join(stage.modules)})")
    notes = stage.check_init_source(source)
    rules = stage.init_rules()
    record: dict[str, Any] = {
        "path": str(path), "source": source.kind,
        "files": {n: {"path": str(f), "sha256": file_sha256(f),
                      "weights": "exported" if source.kind == "bundle" else  # a bundle: EMA where the run kept one
                      "ema" if f.name.endswith(".ema.safetensors") else "live"}
                  for n, f in source.files.items()},
        "reinitialised": {}, "from_this_run": [],
        "fresh_modules": [n for n in stage.modules if n not in source.weights], "notes": notes}
    for name, module in stage.modules.items():
        if name in source.weights:
            reinit, kept = load_init_weights(module, source.weights[name], rules.get(name, []),
                                             f"init_from={path} ({name})")
            record["reinitialised"].update({f"{name}.{k}": v for k, v in reinit.items()})
            record["from_this_run"] += [f"{name}.{k}" for k in kept]
    if announce:
        what = "its bundle" if source.kind == "bundle" else "its newest checkpoint"
        print(f"init_from {path}: {', '.join(source.files)} from {what}; a new optimizer, LR schedule and step 0",
              flush=True)
        for why in dict.fromkeys(w.split(":")[0] for w in record["reinitialised"].values()):   # a line per rule
            keys = [k for k, w in record["reinitialised"].items() if w.startswith(why + ":")]
            warnings.warn(f"init_from {path}: {why}: {', '.join(keys)} re-initialised", stacklevel=2)
        for note in notes:
            warnings.warn(f"init_from {path}: {note}", stacklevel=2)
        if record["fresh_modules"]:
            warnings.warn(f"init_from {path}: {', '.join(record['fresh_modules'])} not in the source: freshly "
                          "initialised", stacklevel=2)
    return record
