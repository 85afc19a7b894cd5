"""Training stages. Each stage module defines a config dataclass `Config`, `build(cfg) -> TrainStage` and
`components(cfg) -> dict[str, nn.Module]` (for `fae summary`). `fae train <name>` finds them here."""
from __future__ import annotations

import contextlib
import importlib
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

import yaml

from fae.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict

STAGES: dict[str, str] = {
    "fae": "fae.stages.autoencoder",
    "pixel-decoder": "fae.stages.pixel_decoder",
    "dit": "fae.stages.dit",
    "mmdit": "fae.stages.mmdit",                # text-to-image on a latent cache with text embeddings
    "encoder": "fae.stages.encoder",  # self-supervised pretraining of the demo encoder
}


@contextlib.contextmanager
def buildable(what: str) -> Iterator[None]:
    """Errors raised while networks are built from a validated config (a negative or non-divisible size that no
    `validate` caught) become a ConfigError that says so, instead of a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError, OverflowError, AssertionError) as exc:
        raise ConfigError(f"{what}: the config does not build ({type(exc).__name__}: {exc}); check the sizes in "
                          "its model/decoder/objective blocks") from exc


def parameter_table(name: str, cfg: Any) -> list[dict[str, Any]]:
    """Every component of a stage config built on the meta device (no memory, no download), with its parameter
    count (`fae summary`)."""
    import torch

    from fae.nn import count_parameters

    with buildable(f"stage {name}"), torch.device("meta"):
        parts = stage_module(name).components(cfg)
    return [{"component": k, "parameters": count_parameters(m), "millions": round(count_parameters(m) / 1e6, 2)}
            for k, m in parts.items()]


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def load_stage_config(path: str | Path | None, overrides: Sequence[str] = (), stage: str | None = None) -> tuple[str, Any]:
    """Read a stage config. The YAML's `stage:` key names the stage; `stage` (from the command line) must agree."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    named = data.pop("stage", None)
    if stage and named and named != stage:
        raise ConfigError(f"{path}: this is a '{named}' config, not '{stage}'")
    name = stage or named
    if not name:
        raise ConfigError(f"{path}: add 'stage: <{'|'.join(STAGES)}>' to the config")
    return name, from_dict(stage_module(name).Config, data)


def prepare_out_dir(out_dir: Path, cfg: Any, fresh: bool) -> None:
    """A run folder holds one config. Re-running with the same config resumes; a different one is refused."""
    saved = out_dir / "config.yaml"
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    if saved.is_file() and yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)):
        raise ConfigError(f"{out_dir} holds a run with a different config ({saved}); "
                          f"pass --fresh to start over or choose another --out")


def train_stage(name: str, cfg: Any, out_dir: str | Path, fresh: bool = False, progress: bool = True,
                stop_at: int | None = None) -> Path:
    """Build and run a stage with the shared trainer; returns the run folder (final bundles inside)."""
    import torch

    from fae import distributed as D
    from fae.training import Trainer

    out_dir = Path(out_dir)
    rank, _, _ = D.init_distributed()
    if rank == 0:
        prepare_out_dir(out_dir, cfg, fresh)
    D.barrier()
    torch.manual_seed(cfg.train.seed)  # model initialisation is part of the run's seed
    with buildable(f"stage {name}"):
        stage = stage_module(name).build(cfg)
    Trainer(stage, cfg.train, out_dir, run_config=cfg, progress=progress).fit(stop_at=stop_at)
    return out_dir
