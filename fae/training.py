"""One trainer for every stage.

A stage (FAE, pixel decoder, DiT, ...) subclasses `TrainStage`: it names its trainable modules, its optimizer
groups and its loss. The `Trainer` owns everything else: the resumable data order, DDP, gradient accumulation
(grads zeroed once per optimizer step, `no_sync` on all but the last micro-batch), bf16 autocast, gradient
clipping, EMA of trainable parameters only, non-finite-loss handling, atomic checkpoints with the full training
state, exact resume, `metrics.jsonl` and a progress bar.

Randomness: before every step each process seeds torch (CPU and CUDA) and Python's `random` from
(train.seed, rank, step) (`step_seed`). So the noise, times and label dropout a stage draws depend on nothing else: a
resume is exact without storing RNG states, and a resume with more processes gives every new rank its own streams.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import pickle
import random
import shutil
import signal
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from fae import distributed as D
from fae import kernels, sharding
from fae.data.loading import loader_options
from fae.data.readable import collate_present
from fae.init_from import InitRule, InitSource, initialise_from
from fae.io import (
    MANIFEST_NAME,
    atomic_save_safetensors,
    atomic_write_text,
    checkpoint_dirs,
    manifest_problem,
    remove_stale_temporaries,
    replace_dir,
    save_config,
    state_dict_for_save,
    write_checkpoint_manifest,
)
from fae.monitoring import TENSORBOARD_MODES, RunMonitor, TensorBoardMode, memory_row
from fae.precision import PRECISIONS, Precision, resolve_precision, training_tf32
from fae.speed import COMPILE_MODES, CompileMode, prepare_training


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8            # AdamW's denominator term (torch's default)
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0          # end of the cosine schedule
    grad_clip: float | None = 1.0

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0:
            raise ValueError("optim: lr must be > 0, min_lr and warmup_steps >= 0")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64            # global: split over processes and accumulation micro-batches
    grad_accum: int = 1
    ema_decay: float = 0.9999
    ema_warmup: bool = False        # decay min(ema_decay, (1 + n) / (10 + n)) after n updates: short runs forget init
    precision: Precision = "auto"   # auto: bf16 autocast where the device runs bf16 natively, else fp32
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0
    max_bad_steps: int = 5          # consecutive non-finite losses before the run stops
    device: str = "auto"            # auto | cpu | cuda
    fsdp: bool = False              # FSDP2 instead of DDP (generator stages): weights, grads, Adam and EMA sharded
    # speed switches (fae.speed, docs/speed.md); none changes what a checkpoint holds
    compile: CompileMode = "auto"   # torch.compile the trained modules: auto = on CUDA, off on CPU (slow to compile)
    activation_checkpointing: bool = False  # recompute each transformer block in backward: less memory, +1 forward
    tf32: bool = True               # CUDA: fp32 matmuls/convolutions as TF32 while training (metrics stay IEEE fp32)
    tensorboard: TensorBoardMode = "auto"   # events under <run>/tensorboard: auto = when the package is installed
    preview_every: int = 0          # the stage's preview sheet (samples / reconstructions) every N steps; 0 = off

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("train: steps, batch_size and grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every <= 0 or self.keep_checkpoints <= 0 or self.log_every <= 0:
            raise ValueError("train: checkpoint_every, keep_checkpoints and log_every must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, not {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train.compile must be one of {list(COMPILE_MODES)}, not {self.compile!r}")
        if self.tensorboard not in TENSORBOARD_MODES or self.preview_every < 0:
            raise ValueError(f"train.tensorboard must be one of {list(TENSORBOARD_MODES)} (got {self.tensorboard!r}) "
                             f"and train.preview_every >= 0 (got {self.preview_every})")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint file is missing, truncated or altered (it does not match the checkpoint's manifest)."""


def summarize_scores(scores: dict[str, Any], prefix: str = "") -> str:
    """Numbers of a (nested) score dict on one line: `decoders/gaussian(x)/psnr 25.67, ...`."""
    parts = []
    for key, value in scores.items():
        if isinstance(value, dict):
            inner = summarize_scores(value, f"{prefix}{key}/")
            parts += [inner] if inner else []
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{prefix}{key} {value:.4g}" if isinstance(value, float) else f"{prefix}{key} {value}")
    return ", ".join(parts)


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the current step was finished and checkpointed before stopping."""


class TrainStage:
    """What a stage plugs into the Trainer. Subclasses set `self.modules` and implement `loss` and `export`."""

    modules: dict[str, nn.Module]
    supports_fsdp = False   # the stage's loss needs nothing FSDP2 lacks (the generator stages)
    progress = True         # set by the Trainer (`--no-progress`): whether the stage's own work (caches) shows bars

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {"main": list(self.modules)}

    def optim_config(self, group: str) -> OptimConfig:
        return self.optim  # type: ignore[attr-defined]  # one-group stages define optim

    def ema_modules(self) -> list[str]:
        return list(self.modules)

    def group_active(self, group: str, step: int) -> bool:
        return True

    def schedule_steps(self, group: str, total_steps: int) -> int:
        """The LR schedule's horizon for `group`. A group's scheduler advances only on steps where the group is
        active, so a group that starts late (a discriminator) should count from its own start."""
        return total_steps

    def preflight(self) -> None:
        """Check what the run needs after its last step (a held-out split, ...) before its first one, so a missing
        piece costs seconds, not a run."""

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        """The loss and its logs: floats, or detached 0-d tensors the trainer reads when it logs (no sync)."""
        raise NotImplementedError

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        """Write the finished modules as bundles under `out_dir` (and nothing else)."""
        raise NotImplementedError

    def evaluate(self, out_dir: Path, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
        """Score the exported modules on held-out data, writing the scores beside the bundles; None when the stage
        has nothing to score (or its config says to skip)."""
        return None

    def preview(self, modules: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor] | None:
        """Small sheets to watch the run by (name -> (3,H,W) image in [0,1]: samples of a generator, reconstructions
        of a decoder), drawn on rank 0 every `train.preview_every` steps from `modules` (the EMA weights where
        there are some: what the run would export). The Trainer saves and restores the random state around it."""
        return None

    def eval_every(self) -> int:
        """Score the modules every N steps with `periodic_eval` (0: never)."""
        return 0

    def periodic_eval(self, out_dir: Path, modules: dict[str, nn.Module], step: int) -> dict[str, float] | None:
        """Scores of `modules` (the EMA weights where kept) at `step`, on every process (a collective under torchrun:
        the work is split); logged as `eval/<name>` rows of metrics.jsonl. The Trainer saves and restores the random
        state around it, so training runs the same with or without it. A stage may keep a best-step record in
        `out_dir`."""
        return None

    def to(self, device: torch.device) -> None:
        """Move non-trainable helpers (frozen encoders, ...) to the device; trainable modules are moved for you."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- init_from: a new run that starts from another run's weights (`initialise_from`, docs/training.md) ----------
    def init_from_path(self) -> str | None:
        """The run folder or bundle whose weights start this run (the config's `init_from`); None: a fresh init."""
        return getattr(getattr(self, "cfg", None), "init_from", None)

    def init_bundle(self, path: Path) -> InitSource | None:
        """The weights of this stage's exported bundle at `path` (the bundle, or a finished run folder holding it);
        None when there is none: the trainer then reads the newest checkpoint of the run folder `path`."""
        return None

    def init_rules(self) -> dict[str, list[InitRule]]:
        """Per module, the tensors `init_from` may leave to this run (a class table when the class count differs,
        ...). Every other tensor must be in the source under the same name with the same shape."""
        return {}

    def check_init_source(self, source: InitSource) -> list[str]:
        """Refuse a source that the tensor shapes cannot judge (a generator on latents of another shape); returns
        notes on what loads but may not fit (another tokenizer of the same latent shape), warned and recorded."""
        return []


def _no_forward_buffer_sync() -> dict[str, Any]:
    """DDP keyword that stops rank 0's buffers being broadcast at every forward (our buffers are constants or
    per-rank statistics): `forward_sync_buffers` from torch 2.13, the deprecated `broadcast_buffers` before."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# ----------------------------------------------------------------------------------------------------------------
# Data order: a deterministic stream of (index, seed) keys that any process count can resume exactly.
# ----------------------------------------------------------------------------------------------------------------
class ResumableSampler(Sampler):
    """Infinite stream of dataset keys. Global position p maps to epoch p // N, a seeded permutation of that
    epoch, and a per-sample augmentation seed; process r of W takes positions r, r+W, ... from `start`."""

    def __init__(self, length: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if length <= 0:
            raise ValueError("the training dataset is empty")
        self.length, self.seed, self.start, self.rank, self.world = length, seed, start, rank, world
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.length, generator=g)
        return int(self._perm[offset]), (self.seed * 6_364_136_223_846_793 + position) % (2**62)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        while True:
            yield self.key(position)
            position += self.world

    def __len__(self) -> int:  # infinite; DataLoader only needs a number
        return 2**62


def step_seed(seed: int, rank: int, step: int) -> int:
    """The 63-bit seed of process `rank`'s random streams at `step` of a run seeded with `seed`."""
    digest = hashlib.sha256(f"fae-train:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch (CPU and every CUDA device) and Python's `random` for one step of one process."""
    value = step_seed(seed, rank, step)
    torch.manual_seed(value)
    random.seed(value)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay of update number `updates` (0-based)."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, updates: int = 0) -> None:
        decay = self.decay_at(updates)
        ema: list[torch.Tensor] = list(self.module.parameters())
        live = [p.detach() for p in module.parameters()]
        if len(ema) != len(live):
            raise ValueError(f"EMA holds {len(ema)} parameters, the module {len(live)}")
        if all(type(t) is torch.Tensor for t in live):  # one multi-tensor kernel (plain tensors; DTensors loop)
            torch._foreach_lerp_(ema, live, 1.0 - decay)
        else:
            for e, p in zip(ema, live, strict=True):
                e.lerp_(p, 1.0 - decay)
        for e_buf, b in zip(self.module.buffers(), module.buffers(), strict=True):
            e_buf.copy_(b)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch



def make_adamw(params: list[nn.Parameter], cfg: OptimConfig, device: torch.device,
               sharded: bool = False) -> torch.optim.AdamW:
    """AdamW as every stage trains with it. torch's fused kernel (one pass over each parameter) where the parameters
    are plain tensors, on CPU as on CUDA: 24.5 ms instead of 114.6 ms for the foreach kernel's ~10 passes on a
    33M-parameter DiT-S step (Intel Xeon, AVX512, 2 threads; benchmarks/vs_diffusers.py, issue 26). Sharded (FSDP2
    DTensor) parameters on a CPU keep the foreach kernel (gloo runs of the tests; CUDA takes fused DTensors)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),  # type: ignore[arg-type]  # two betas
                             eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda" or not sharded)

class Trainer:
    def __init__(self, stage: TrainStage, cfg: TrainConfig, out_dir: str | Path, run_config: Any = None,
                 progress: bool = True) -> None:
        self.stage, self.cfg, self.out_dir, self.run_config = stage, cfg, Path(out_dir), run_config
        self.rank, self.world, _ = D.init_distributed()
        self.device = D.resolve_device(cfg.device)
        self.progress = progress and self.rank == 0
        stage.progress = self.progress
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by processes x grad_accum "
                             f"= {self.world} x {cfg.grad_accum}")
        self.micro_batch = cfg.batch_size // (self.world * cfg.grad_accum)
        self.precision = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)

        if cfg.fsdp and not stage.supports_fsdp:
            raise ValueError(f"train.fsdp=true: {type(stage).__name__} trains with DDP only (FSDP2 is for the "
                             "stages that declare supports_fsdp: the generator stages); set train.fsdp=false")
        self.raw = dict(stage.modules)
        # init_from: a new run from another run's weights, before the EMA copies them. A run that resumes has its own
        # checkpoint: it never reads the source again (its record comes back from the checkpoint)
        self.init_record: dict[str, Any] | None = None
        start = stage.init_from_path()
        if start is not None and not checkpoint_dirs(self.out_dir):
            name = run_config.get("stage") if isinstance(run_config, dict) else None
            self.init_record = initialise_from(stage, start, name, announce=self.rank == 0)
        for m in self.raw.values():
            m.to(self.device).train()
        stage.to(self.device)
        # EMA copies are taken from the full modules, then sharded like them (their update is shard by shard)
        self.ema = {n: EMA(self.raw[n], cfg.ema_decay, cfg.ema_warmup) for n in stage.ema_modules()}
        self.sharded = cfg.fsdp and self.world > 1
        self._shells: dict[str, nn.Module] = {}
        if self.sharded:
            self._shells = {n: sharding.meta_copy(m) for n, m in self.raw.items()}  # to export full weights into
            for m in [*self.raw.values(), *(e.module for e in self.ema.values())]:
                sharding.shard(m)
        elif self.world > 1:
            stage.modules = {k: DistributedDataParallel(m, **_no_forward_buffer_sync()) for k, m in self.raw.items()}
        self.groups = stage.optimizer_groups()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        for group, names in self.groups.items():
            ocfg = stage.optim_config(group)
            params = [p for n in names for p in self.raw[n].parameters() if p.requires_grad]
            opt = make_adamw(params, ocfg, self.device, sharded=self.sharded)
            self.optimizers[group] = opt
            horizon = stage.schedule_steps(group, cfg.steps)
            self.schedulers[group] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ocfg, horizon))
        self.speed = prepare_training(self.raw, stage.modules, cfg, self.device)  # compile, activation checkpointing
        self.step, self.bad_steps = 0, 0
        self.dropped_items, self._dropped_since_log = 0, 0   # unreadable items left out of batches
        self._stop_signal: int | None = None
        self.monitor: RunMonitor | None = None   # rank 0, during fit

    # ------------------------------------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to `cfg.steps` (or pause at `stop_at`, checkpointed), resuming from the newest checkpoint."""
        with training_tf32(self.cfg.tf32, self.device):  # the TF32 policy holds for the run, then is restored
            return self._fit(stop_at)

    def _fit(self, stop_at: int | None) -> dict[str, float]:
        self._start_run()
        end = min(self.cfg.steps, stop_at) if stop_at is not None else self.cfg.steps
        dataset = self.stage.train_dataset()
        batches = self._readable_batches(iter(self._train_loader(dataset)))
        autocast = self.precision.autocast()
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        logs: dict[str, list[float]] = {}
        last: dict[str, float] = {}
        t0 = time.time()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            while self.step < end:
                self._train_step(batches, autocast, logs)
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    last = self._log(logs, t0)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k.startswith("loss")})
                    logs, t0 = {}, time.time()
                self._preview_checkpoint_or_stop(end)
        finally:
            bar.close()
            if self.monitor is not None:
                self.monitor.close()
            for s, h in previous.items():
                signal.signal(s, h)
        self._finish_run(dataset)
        D.barrier()
        return last

    def _start_run(self) -> None:
        """Check the stage, write the run's folder, config and run.json (rank 0), resume, open the monitor."""
        self.stage.preflight()  # before anything is written: a refused run leaves no folder to clean up
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            remove_stale_temporaries(self.out_dir)   # what a killed run left half-written (never renamed into place)
            if self.run_config is not None:
                save_config(self.run_config, self.out_dir / "config.yaml")
        self._resume()
        if self.rank == 0:   # after the resume: a resumed init_from run's record comes from its checkpoint
            atomic_write_text(self.out_dir / "run.json", json.dumps(self.run_record(), indent=2))
            if self.progress:
                print(f"precision: {self.precision.describe()}", flush=True)
        self.monitor = RunMonitor(self.out_dir, self.cfg.tensorboard, self.step) if self.rank == 0 else None
        self._logged_step = self.step

    def _train_loader(self, dataset: Any) -> DataLoader:
        """Micro-batches of `dataset`, continuing from the resumed step's place in the seeded order."""
        sampler = ResumableSampler(len(dataset), self.cfg.seed, self.step * self.cfg.batch_size, self.rank, self.world)
        return DataLoader(dataset, batch_size=self.micro_batch, sampler=sampler, collate_fn=collate_present,
                          generator=torch.Generator().manual_seed(self.cfg.seed),
                          **loader_options(self.cfg.num_workers, self.device))

    def _train_step(self, batches: Iterator[Any], autocast: Any, logs: dict[str, list[float]]) -> None:
        """One step: each active group's optimizer step over `grad_accum` micro-batches, then the EMAs of what moved."""
        seed_step(self.cfg.seed, self.rank, self.step)
        micro = [_to_device(next(batches), self.device) for _ in range(self.cfg.grad_accum)]
        updated: set[str] = set()
        skipped = []
        for group, opt in self.optimizers.items():
            if not self.stage.group_active(group, self.step):
                continue
            if self._optimizer_step(group, opt, micro, autocast, logs):
                updated.update(self.groups[group])
            else:
                skipped.append(group)
        self._count_bad_step(skipped)
        for name, ema in self.ema.items():
            if name in updated:  # a skipped (non-finite) step moves neither the weights nor their EMA
                ema.update(self.raw[name], updates=self.step)

    def _preview_checkpoint_or_stop(self, end: int) -> None:
        """After a step: the preview and the checkpoint when due; on a signal (any process's), checkpoint and stop."""
        if self.cfg.preview_every and self.step % self.cfg.preview_every == 0:
            self._preview()
        every = self.stage.eval_every()
        if every and self.step % every == 0:   # before the checkpoint: a kill between the two repeats it, loses nothing
            self._periodic_eval()
        if self.step % self.cfg.checkpoint_every == 0 or self.step == end:
            self.save_checkpoint()
        if D.all_reduce_max(float(self._stop_signal is not None)) > 0:
            if self.step % self.cfg.checkpoint_every and self.step != end:
                self.save_checkpoint()
            raise TrainingInterrupted(f"stopped by signal at step {self.step}; resume by running the same "
                                      f"command again (checkpoint in {self.out_dir / 'checkpoints'})")

    def _finish_run(self, dataset: Any) -> None:
        """The run's summary in run.json (rank 0); at the last step, export and evaluate the finished modules."""
        if self.rank == 0:  # the run's summary says how many unreadable items were left out
            record = {**self.run_record(), "data": {"items": len(dataset), "dropped_draws": self.dropped_items}}
            atomic_write_text(self.out_dir / "run.json", json.dumps(record, indent=2))
        if self.step >= self.cfg.steps:
            modules = self.export_modules()   # every process: the evaluation is split over them
            if self.rank == 0:
                self.stage.export(self.out_dir, modules)
            scores = self.stage.evaluate(self.out_dir, modules)
            if scores and self.rank == 0:
                print(f"held-out: {summarize_scores(scores)}", flush=True)

    def _readable_batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Micro-batches without the items the data set could not read (fae.data.readable); they are counted in
        `dropped_items` (metrics.jsonl `data/dropped`, run.json), never replaced."""
        empty = 0
        for batch in batches:
            size = 0 if batch is None else len(next(iter(batch.values())))
            self.dropped_items += self.micro_batch - size
            self._dropped_since_log += self.micro_batch - size
            if batch is None:
                empty += 1
                if empty >= 100:
                    raise TrainingError(f"100 batches in a row held no readable item ({self.dropped_items} items "
                                        "dropped so far); check the data folder")
                continue
            empty = 0
            yield batch

    def run_record(self) -> dict[str, Any]:
        """Where and how this run computes: written to run.json next to config.yaml."""
        return {"device": str(self.device), "processes": self.world, "precision": self.precision.as_dict(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                "kernels": kernels.summary(),  # the backend verdicts (fae.kernels) the run's products met so far
                "speed": {**self.speed, "tf32": self.cfg.tf32 and self.device.type == "cuda"},
                **({"init_from": self.init_record} if self.init_record is not None else {})}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        if self.rank == 0:
            print(f"\nsignal {signum}: finishing step {self.step + 1}, then checkpointing (Ctrl-C again to abort)")

    def _optimizer_step(self, group: str, opt: torch.optim.Optimizer, micro: list[Any], autocast: Any,
                        logs: dict[str, list[float]]) -> bool:
        """One optimizer step of `group` over the micro-batches; False when it was skipped (non-finite)."""
        names = self.groups[group]
        opt.zero_grad(set_to_none=True)
        finite = True
        for i, batch in enumerate(micro):
            last_micro = i == len(micro) - 1
            with contextlib.ExitStack() as stack:
                for n in names:
                    m = self.stage.modules[n]
                    sharding.set_gradient_sync(m, last_micro)
                    if not last_micro and isinstance(m, DistributedDataParallel):
                        stack.enter_context(m.no_sync())
                with autocast:
                    loss, info = self.stage.loss(group, batch, self.step)
                if not torch.isfinite(loss.detach()).item():
                    finite = False
                (loss / len(micro)).backward()
            for k, v in {f"loss/{group}": loss.item(), **info}.items():
                logs.setdefault(k, []).append(float(v))
        finite = D.all_reduce_max(float(not finite)) == 0
        params = [p for n in names for p in self.raw[n].parameters() if p.requires_grad]
        if finite:
            clip = self.stage.optim_config(group).grad_clip
            if clip:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # a DTensor when sharded
                logs.setdefault(f"grad_norm/{group}", []).append(float(norm))
                finite = bool(torch.isfinite(norm).item())
        if finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.schedulers[group].step()
        return finite

    def _count_bad_step(self, skipped: list[str]) -> None:
        """A step whose loss or gradient was not finite in some group was skipped there; K such steps in a row
        stop the run (the checkpoints hold finite weights: skipped updates change nothing)."""
        if not skipped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        warnings.warn(f"step {self.step}: non-finite loss or gradient in {', '.join(skipped)}, update skipped "
                      f"({self.bad_steps}/{self.cfg.max_bad_steps} in a row)", stacklevel=2)
        self._append_metrics({"skipped": skipped})
        if self.bad_steps >= self.cfg.max_bad_steps:
            ckpts = checkpoint_dirs(self.out_dir)
            where = (f"the last checkpoint is {ckpts[-1]} (skipped updates leave weights finite)" if ckpts
                     else "no checkpoint was written yet")
            raise TrainingError(f"loss was not finite for {self.bad_steps} steps in a row ({', '.join(skipped)}, step "
                                f"{self.step}); {where}. Lower the learning rate, enable grad clipping or use fp32.")

    def _log(self, logs: dict[str, list[float]], t0: float) -> dict[str, float]:
        row = {k: sum(v) / len(v) for k, v in logs.items() if v}
        row.update({f"lr/{g}": s.get_last_lr()[0] for g, s in self.schedulers.items()})  # type: ignore[misc]  # float lrs
        steps, self._logged_step = self.step - self._logged_step, self.step   # the last row may cover fewer
        row["sec_per_step"] = (time.time() - t0) / max(1, steps)
        row["images_per_s"] = self.cfg.batch_size / max(row["sec_per_step"], 1e-9)   # all processes together
        row.update(memory_row(self.device))
        if self._dropped_since_log:
            row["data/dropped"] = self._dropped_since_log
            self._dropped_since_log = 0
        self._append_metrics(row)
        if self.monitor is not None:  # every scalar TensorBoard gets is in this metrics.jsonl row
            self.monitor.scalars(row, self.step)
        return row

    @contextlib.contextmanager
    def _aside(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Run a preview or an evaluation beside training: no gradients, `modules` in eval mode, and the random
        state and the modules' modes restored afterwards (the run trains the same with or without it)."""
        was_training = {n: m.training for n, m in modules.items()}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for m in modules.values():
                m.eval()
            try:
                yield
            finally:
                for n, m in modules.items():
                    m.train(was_training[n])

    def _preview(self) -> None:
        """The stage's preview sheets of this step (rank 0), drawn without touching the training's random state."""
        modules = self.export_modules()   # every process: gathering sharded weights is a collective
        if self.monitor is None:
            return
        with self._aside(modules), self.precision.autocast():
            torch.manual_seed(self.cfg.seed)  # the same noise at every preview: sheets compare across steps
            sheets = self.stage.preview(modules, self.step)
        if sheets:
            self.monitor.images(sheets, self.step)

    def _periodic_eval(self) -> None:
        """The stage's scores of this step as an `eval/...` metrics.jsonl row and TensorBoard scalars, with the time
        they took; the training's random state and the modules' modes are restored afterwards."""
        modules = self.export_modules()
        begin = time.time()
        with self._aside(modules):
            scores = self.stage.periodic_eval(self.out_dir, modules, self.step)
        if not scores:
            return
        row = {**{f"eval/{k}": v for k, v in scores.items()}, "eval/seconds": time.time() - begin}
        self._append_metrics(row)
        if self.monitor is not None:
            self.monitor.scalars(row, self.step)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl (rank 0), stamped with the current step."""
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **row}) + "\n")

    # ------------------------------------------------------------------------------------------------------------
    def export_modules(self) -> dict[str, nn.Module]:
        """The finished modules (EMA where kept), whole on every process (a collective when sharded)."""
        chosen = {n: (self.ema[n].module if n in self.ema else m) for n, m in self.raw.items()}
        if not self.sharded:
            return chosen
        return {n: sharding.full_copy(m, self._shells[n], self.device).eval() for n, m in chosen.items()}

    def save_checkpoint(self) -> Path:
        root = self.out_dir / "checkpoints"
        final = root / f"step_{self.step:08d}"
        tmp = root / f".tmp_step_{self.step:08d}"
        failure: BaseException | None = self._prepare_checkpoint_dir(tmp) if self.rank == 0 else None
        if self.cfg.fsdp and D.all_reduce_max(float(failure is not None)) == 0:  # (also: the folder exists now)
            failure = self._save_shards(tmp)
        if self.rank == 0 and failure is None:
            failure = self._write_checkpoint(tmp, final)
        if failure is not None and self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if D.all_reduce_max(float(failure is not None)) > 0:
            ckpts = checkpoint_dirs(self.out_dir)
            kept = f"the last good checkpoint, {ckpts[-1]}, is intact" if ckpts else "no earlier checkpoint exists"
            raise TrainingError(f"could not write the checkpoint of step {self.step} to {final} ({failure}); {kept}. "
                                "Free disk space (or point --out elsewhere) and run the same command to resume.")
        D.barrier()
        return final

    @staticmethod
    def _prepare_checkpoint_dir(tmp: Path) -> OSError | None:
        """A fresh, empty `tmp` (rank 0); the error when it cannot be made."""
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            return exc
        return None

    def _save_shards(self, tmp: Path) -> BaseException | None:
        """Every process writes its own shards (DCP) into the folder rank 0 prepared; a failure on any fails all."""
        failure: BaseException | None = None
        try:
            sharding.save_state(tmp, self.raw, {n: e.module for n, e in self.ema.items()}, self.optimizers)
        except (OSError, sharding.CheckpointException) as exc:
            failure = exc
        if D.all_reduce_max(float(failure is not None)) > 0 and failure is None:
            failure = OSError("another process could not write its shards")
        return failure

    def _write_checkpoint(self, tmp: Path, final: Path) -> OSError | None:
        """Rank 0: weights (unless sharded), training state and manifest into `tmp`, moved into place as `final`,
        then the checkpoints beyond `keep_checkpoints` removed; the error when a write failed."""
        try:
            if not self.cfg.fsdp:
                for name, module in self.raw.items():
                    atomic_save_safetensors(state_dict_for_save(module), tmp / f"{name}.safetensors")
                for name, ema in self.ema.items():
                    atomic_save_safetensors(state_dict_for_save(ema.module), tmp / f"{name}.ema.safetensors")
            torch.save(self._training_state(), tmp / "training_state.pt")
            write_checkpoint_manifest(tmp)  # SHA-256 per file: a damaged checkpoint is found at resume, not used
            replace_dir(tmp, final)
        except OSError as exc:  # disk full, quota, I/O error: the previous checkpoints are untouched
            return exc
        for old in checkpoint_dirs(self.out_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return None

    def _training_state(self) -> dict[str, Any]:
        """training_state.pt: the step, counters, data position, schedulers, the stage's extra state (and the
        optimizers unless sharded: DCP writes those)."""
        state = {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "dropped_items": self.dropped_items,   # run.json counts the whole run, resumed or not
            "data_position": self.step * self.cfg.batch_size,
            "schedulers": {g: s.state_dict() for g, s in self.schedulers.items()},
            "stage": self.stage.extra_state(),
            "init_from": self.init_record,
        }
        if not self.cfg.fsdp:
            state["optimizers"] = {g: o.state_dict() for g, o in self.optimizers.items()}
        return state

    def _resume(self) -> None:
        """Load the newest good checkpoint, if any (random streams need no state: `seed_step`)."""
        ckpts = checkpoint_dirs(self.out_dir)
        self._check_same_checkpoints(ckpts)
        if not ckpts:
            return
        written_sharded = sharding.has_state(ckpts[-1])
        if written_sharded != self.cfg.fsdp:
            raise TrainingError(f"{ckpts[-1]} was written {'with' if written_sharded else 'without'} train.fsdp and "
                                f"the layouts differ: resume with train.fsdp={str(written_sharded).lower()}")
        problems = []
        for path in reversed(ckpts):  # the newest good one; a damaged one is reported and passed over
            try:
                state = self._load_checkpoint(path)
                break
            except (CheckpointDamaged, OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError,
                    sharding.CheckpointException) as exc:
                problems.append(f"{path}: {exc}")
                if self.rank == 0:
                    warnings.warn(f"checkpoint {path} is damaged ({exc}); falling back to the one before it",
                                  stacklevel=2)
        else:
            raise TrainingError("no usable checkpoint to resume from: " + "; ".join(problems)
                                + f". Move {self.out_dir / 'checkpoints'} away to start afresh.")
        self.stage.load_extra_state(state.get("stage", {}))
        self._truncate_metrics()
        if self.rank == 0 and (self.progress or problems):
            print(f"resuming from {path} (step {self.step})" + (f", after passing over {len(problems)} damaged "
                                                                 "checkpoint(s)" if problems else ""))

    def _check_same_checkpoints(self, ckpts: list[Path]) -> None:
        """Every process sees the same checkpoints. Each reads them itself, so on nodes whose run folders are not one
        shared folder (a node-local disk each) rank 0 would resume where its disk says and the others from scratch,
        and their collectives would stop matching (a hang, or a wrong run) instead of this error."""
        seen = D.all_gather_objects([p.name for p in ckpts])
        if any(names != seen[0] for names in seen):
            newest = [names[-1] if names else "none" for names in seen]
            raise TrainingError(f"the processes see different checkpoints in {self.out_dir} (the newest, by rank: "
                                f"{newest}): the run folder must be one folder every node sees (a shared file "
                                "system), not a node-local disk per node (docs/scaling.md, Multi-node)")

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Weights, EMA, optimizer and scheduler states from `path`, checked against its manifest first."""
        if (path / MANIFEST_NAME).is_file():
            problem = manifest_problem(path)
            if problem:
                raise CheckpointDamaged(problem)
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        if self.cfg.fsdp:  # re-sharded to however many processes run now
            sharding.load_state(path, self.raw, {n: e.module for n, e in self.ema.items()}, self.optimizers)
        else:
            for name, module in self.raw.items():
                module.load_state_dict(load_file(str(path / f"{name}.safetensors"), device=str(self.device)))
            for name, ema in self.ema.items():
                ema.module.load_state_dict(load_file(str(path / f"{name}.ema.safetensors"), device=str(self.device)))
            for g, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][g])
        for g, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][g])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.dropped_items = state.get("dropped_items", 0)
        self.init_record = state.get("init_from")
        return state

    def _truncate_metrics(self) -> None:
        """Drop log rows written after the checkpoint we resume from, so metrics.jsonl stays one clean history."""
        path = self.out_dir / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= self.step]
        if len(kept) != len(rows):
            atomic_write_text(path, "".join(r + "\n" for r in kept))


def load_run_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint's training state (weights_only), or None."""
    ckpts = checkpoint_dirs(Path(out_dir))
    return torch.load(ckpts[-1] / "training_state.pt", weights_only=True) if ckpts else None
