"""Training stages. Each stage module defines a config dataclass `Config`, `build(cfg) -> TrainStage` and
`components(cfg) -> dict[str, nn.Module]` (for `fae summary`). `fae train <name>` finds them here: the stages that
make the latent space (below) and one stage per registered generator family (fae.generators; their base is
fae.stages.generator)."""
from __future__ import annotations

import contextlib
import importlib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import yaml

from fae.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict

if TYPE_CHECKING:   # the stages' package stays light to import (`fae --help`); these are for annotations only
    import torch

    from fae.generators import Generator

LATENT_SPACE_STAGES: dict[str, str] = {
    "fae": "fae.stages.autoencoder",
    "pixel-decoder": "fae.stages.pixel_decoder",
    "encoder": "fae.stages.encoder",  # self-supervised pretraining of the demo encoder
    "kl-vae": "fae.stages.kl_vae",    # baseline: a KL autoencoder with SD-VAE's architecture (diffusers AutoencoderKL)
}


def stage_names() -> list[str]:
    """Every stage `fae train` knows: the latent-space stages, then the generator families in registry order."""
    from fae.generators import families

    return [*LATENT_SPACE_STAGES, *families()]


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
    if name in LATENT_SPACE_STAGES:
        return importlib.import_module(LATENT_SPACE_STAGES[name])
    from fae.generators import families

    if name not in families():
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(stage_names())}")
    return families()[name].stage_module()


def load_stage_config(path: str | Path | None, overrides: Sequence[str] = (), stage: str | None = None) -> tuple[str, Any]:
    """Read a stage config. The YAML's `stage:` key names the stage; `stage` (from the command line) must agree."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    named = data.pop("stage", None)
    if stage and named and named != stage:
        raise ConfigError(f"{path}: this is a '{named}' config, not '{stage}'")
    name = stage or named
    if not name:
        raise ConfigError(f"{path}: add 'stage: <{'|'.join(stage_names())}>' to the config")
    return name, from_dict(stage_module(name).Config, data)


def run_config(name: str, cfg: Any) -> dict[str, Any]:
    """What a run folder's config.yaml holds: the stage's name and its resolved config (so `fae train --config
    <run>/config.yaml` repeats the run, and the run's stage is known without guessing)."""
    return {"stage": name, **to_dict(cfg)}


def prepare_out_dir(out_dir: Path, cfg: Any, fresh: bool, name: str | None = None) -> None:
    """A run folder holds one config. Re-running with the same config resumes; a different one is refused."""
    saved = out_dir / "config.yaml"
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    old_stage = old.pop("stage", None)
    # a run saved before a config key existed holds that key's default: the same config (one not readable as
    # today's config is compared as written, so it differs)
    with contextlib.suppress(ConfigError, TypeError, ValueError):
        old = to_dict(from_dict(type(cfg), old))
    old = yaml.safe_load(yaml.safe_dump(old, sort_keys=False))
    if old != yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)) or (name and old_stage not in (None, name)):
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
        prepare_out_dir(out_dir, cfg, fresh, name)
    D.barrier()
    torch.manual_seed(cfg.train.seed)  # model initialisation is part of the run's seed
    with buildable(f"stage {name}"):
        stage = stage_module(name).build(cfg)
    Trainer(stage, cfg.train, out_dir, run_config=run_config(name, cfg), progress=progress).fit(stop_at=stop_at)
    return out_dir


def load_run_generator(path: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> Generator:
    """Any generator family's bundle or run folder, finished or not, or one kept checkpoint of it
    (fae.stages.generator.load_run_generator)."""
    from fae.stages.generator import load_run_generator as load

    return load(path, device, step)
