"""The trainer step by step on a deterministic toy stage: two gloo processes give the single-process step at the same
global batch and resume each process's random state, the LR follows the schedule's formula, gradients are clipped
before the update and accumulate to the full-batch gradient, bf16 runs under autocast, DataLoader workers give the
same run, SIGTERM finishes the step and checkpoints, and a resume starts from the newest checkpoint.
(tests/test_training.py has the trainer on its other toy stage; benchmarks/mutation.py lists the bugs each test
catches.)"""
from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import signal
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, get_worker_info

from fae.data import split_key
from fae.io import checkpoint_dirs
from fae.training import OptimConfig, TrainConfig, Trainer, TrainingInterrupted, TrainStage


class Data(Dataset):
    """y = A x plus per-key augmentation noise; each item says which DataLoader worker made it (-1: main)."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 3, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        index, rng = split_key(key)
        info = get_worker_info()
        return {"x": self.x[index] + 0.01 * torch.randn(6, generator=rng), "y": self.y[index],
                "worker": info.id if info is not None else -1}


class Stage(TrainStage):
    """A deterministic toy (no dropout); `on_loss(stage, batch, step)` lets a test look inside a step."""

    def __init__(self, optim: OptimConfig | None = None, on_loss=None, loss_scale: float = 1.0,
                 dropout: float = 0.0) -> None:
        torch.manual_seed(0)
        self.modules = {"model": nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))}
        self.optim = optim or OptimConfig(lr=1e-2, schedule="constant")
        self.on_loss, self.loss_scale = on_loss, loss_scale

    def train_dataset(self) -> Dataset:
        return Data()

    def loss(self, group, batch, step):
        if self.on_loss is not None:
            self.on_loss(self, batch, step)
        pred = self.modules["model"](batch["x"])
        return self.loss_scale * (pred.float() - batch["y"]).pow(2).mean(), {}

    def export(self, out_dir: Path, modules) -> None:
        pass


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=2, batch_size=8, checkpoint_every=100, log_every=1, ema_decay=0.9, seed=3, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def _weights(stage: Stage) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in stage.modules["model"].state_dict().items()}


def _ddp_rank(rank: int, port: int, out: Path, dropout: float, steps: int, stop_at: int | None) -> None:
    """One of two forked processes training the toy at global batch 8 (4 per process)."""
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not reuse the parent's thread pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    trainer = Trainer(Stage(dropout=dropout), _cfg(steps=steps), out, progress=False)
    trainer.fit(stop_at=stop_at)
    weights = {k: v.detach().clone() for k, v in trainer.raw["model"].state_dict().items()}  # unwrapped from DDP
    torch.save(weights, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    os._exit(0)  # no exit-time teardown in a forked child: a gloo group torn down after its peer left can hang


def _two_processes(out: Path, dropout: float = 0.0, steps: int = 2, stop_at: int | None = None
                   ) -> list[dict[str, torch.Tensor]]:
    """Forked rather than torchrun: the children start at once with everything imported (DDP's first use imports
    torch._dynamo, seconds on a busy machine: done here once, before the fork)."""
    import torch._dynamo  # noqa: F401

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_ddp_rank, args=(rank, port, out, dropout, steps, stop_at)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _prefixed(what: str) -> Callable[[str], str]:
    """An assert_close `msg` that keeps torch's message behind `what`."""
    return lambda m: f"{what}: {m}"


def test_two_process_step_equals_single_process_step(tmp_path):
    ranks = _two_processes(tmp_path / "ddp")
    single = Stage()
    Trainer(single, _cfg(), tmp_path / "single", progress=False).fit()
    expected = _weights(single)
    assert any(not torch.equal(v, Stage().modules["model"].state_dict()[k]) for k, v in expected.items())
    for rank, got in enumerate(ranks):
        for k in expected:  # gradients averaged over both processes = the gradient of the whole batch
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=_prefixed(f"rank {rank} {k}"))


def test_two_process_resume_restores_each_process_rng(tmp_path):
    # dropout draws from each process's own RNG (seeded seed + rank): a resume must give each its own state back
    straight = _two_processes(tmp_path / "straight", dropout=0.5, steps=4)
    _two_processes(tmp_path / "resumed", dropout=0.5, steps=4, stop_at=2)
    resumed = _two_processes(tmp_path / "resumed", dropout=0.5, steps=4)
    for k, v in straight[0].items():
        assert torch.equal(resumed[0][k], v) and torch.equal(resumed[1][k], v)


def test_each_process_draws_its_own_random_numbers_at_every_step(tmp_path):
    """Noise, timesteps and label dropout come from the step's random stream, which differs between processes (a
    shared stream would give every rank the same noise: the mutation ranks-share-streams)."""
    draws: dict[int, list[torch.Tensor]] = {}

    def record(rank: int):
        return lambda stage, batch, step: draws.setdefault(rank, []).append(torch.rand(4))

    for rank in (0, 1):
        trainer = Trainer(Stage(on_loss=record(rank)), _cfg(steps=3), tmp_path / f"r{rank}", progress=False)
        trainer.rank = rank            # one process playing rank `rank` of a run (the streams depend only on it)
        trainer.fit()
    assert len(draws[0]) == len(draws[1]) == 3
    assert all(not torch.equal(a, b) for a, b in zip(draws[0], draws[1], strict=True))          # rank 1's streams are its own
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(draws[0]))      # and each step's are new


def test_lr_at_chosen_steps_follows_the_formula(tmp_path):
    lr, min_lr, warmup, steps = 1e-2, 1e-3, 3, 10
    stage = Stage(OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, schedule="cosine"))
    Trainer(stage, _cfg(steps=steps), tmp_path, progress=False).fit()
    logged = {row["step"]: row["lr/main"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}

    def expected(step: int) -> float:  # the LR of update number `step` (0-based); the log shows the next update's
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (steps - warmup))
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in (1, 2, 3, 5, 8, 10):
        assert logged[step] == pytest.approx(expected(step), rel=1e-9), step
    assert logged[2] == pytest.approx(lr) and logged[10] == pytest.approx(min_lr)


def test_gradients_are_clipped_before_the_update(tmp_path):
    stage = Stage(OptimConfig(lr=1e-3, schedule="constant", grad_clip=0.5), loss_scale=100.0)
    trainer = Trainer(stage, _cfg(steps=3), tmp_path, progress=False)
    seen = []
    params = list(stage.modules["model"].parameters())
    trainer.optimizers["main"].register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(float(torch.cat([p.grad.flatten() for p in params]).norm())))
    trainer.fit()
    logged = [json.loads(row)["grad_norm/main"] for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == 3 and min(logged) > 5.0       # the raw norm is far above the threshold ...
    assert max(seen) == pytest.approx(0.5, rel=1e-4)  # ... and the optimizer saw the clipped gradient


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path):
    straight = Stage()
    Trainer(straight, _cfg(steps=6), tmp_path / "straight", progress=False).fit()

    def terminate_in_step_2(stage, batch, step):
        if step == 2 and not getattr(stage, "signalled", False):
            stage.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)   # arrives mid-step, before the loss is even computed

    previous = signal.getsignal(signal.SIGTERM)
    stopped = Stage(on_loss=terminate_in_step_2)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        Trainer(stopped, _cfg(steps=6), tmp_path / "run", progress=False).fit()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_00000003"]
    saved = load_file(str(checkpoint_dirs(tmp_path / "run")[0] / "model.safetensors"))
    for k, v in _weights(stopped).items():  # step 3's update was finished and is in the checkpoint
        assert torch.equal(saved[k], v)

    resumed = Stage()
    Trainer(resumed, _cfg(steps=6), tmp_path / "run", progress=False).fit()
    for k, v in _weights(straight).items():
        assert torch.equal(_weights(resumed)[k], v)


def test_dataloader_workers_give_the_same_run(tmp_path):
    runs = {}
    for workers in (0, 2):
        seen: set[int] = set()
        stage = Stage(on_loss=lambda s, batch, step, seen=seen: seen.update(batch["worker"].tolist()))
        Trainer(stage, _cfg(steps=4, num_workers=workers), tmp_path / str(workers), progress=False).fit()
        runs[workers] = (_weights(stage), seen)
    assert runs[0][1] == {-1} and runs[2][1] == {0, 1}   # the batches really came from two worker processes
    for k, v in runs[0][0].items():
        assert torch.equal(runs[2][0][k], v)


def test_bf16_training_runs_under_autocast(tmp_path):
    dtypes = []
    stage = Stage(on_loss=lambda s, batch, step: dtypes.append(s.modules["model"](batch["x"]).dtype))
    before = _weights(stage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bf16 is not native here" on CPUs without it: slow, still bf16
        Trainer(stage, _cfg(steps=2, precision="bf16"), tmp_path, progress=False).fit()
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    after = _weights(stage)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())  # fp32 master weights
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert json.loads((tmp_path / "run.json").read_text())["precision"]["precision"] == "bf16"


def test_accumulated_gradient_is_the_full_batch_gradient(tmp_path):
    grads = {}
    for accum in (1, 4):
        stage = Stage(OptimConfig(lr=1e-3, schedule="constant", grad_clip=None))
        trainer = Trainer(stage, _cfg(steps=1, grad_accum=accum), tmp_path / str(accum), progress=False)
        params = list(stage.modules["model"].parameters())

        def keep(opt, args, kwargs, accum=accum, params=params) -> None:
            grads[accum] = torch.cat([p.grad.flatten() for p in params])

        trainer.optimizers["main"].register_step_pre_hook(keep)
        trainer.fit()
    # Adam would hide a gradient 4x too large (its update is scale-invariant): compare the gradients themselves
    torch.testing.assert_close(grads[4], grads[1], rtol=1e-5, atol=1e-7)


def test_resume_starts_from_the_newest_checkpoint(tmp_path):
    Trainer(Stage(), _cfg(steps=6, checkpoint_every=1, keep_checkpoints=3), tmp_path, progress=False).fit(stop_at=3)
    assert len(checkpoint_dirs(tmp_path)) == 3
    steps: list[int] = []
    stage = Stage(on_loss=lambda s, batch, step: steps.append(step))
    Trainer(stage, _cfg(steps=6, checkpoint_every=1, keep_checkpoints=3), tmp_path, progress=False).fit()
    assert steps == [3, 4, 5]   # no finished step is computed again
