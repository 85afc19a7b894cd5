"""The shared trainer on a toy stage: exact resume, accumulation, EMA, non-finite losses, checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from margins import within
from torch import nn
from torch.utils.data import Dataset

from fae.data import split_key
from fae.io import checkpoint_dirs
from fae.training import (
    EMA,
    OptimConfig,
    ResumableSampler,
    TrainConfig,
    Trainer,
    TrainingError,
    TrainStage,
    load_run_state,
    seed_step,
    step_seed,
)


class ToyData(Dataset):
    """y = A x; the key's seed adds augmentation noise so data-order bugs show up in the weights."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 3, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        index, rng = split_key(key)
        noise = torch.randn(6, generator=rng) * 0.01 if rng is not None else torch.zeros(6)
        return {"x": self.x[index] + noise, "y": self.y[index]}


class ToyStage(TrainStage):
    def __init__(self, nan_at: set[int] | None = None, lr: float = 1e-2) -> None:
        self.modules = {"model": nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Linear(16, 3))}
        self.optim = OptimConfig(lr=lr, warmup_steps=2, schedule="cosine")
        self.nan_at = nan_at or set()
        self.exported: dict[str, nn.Module] | None = None

    def train_dataset(self) -> Dataset:
        return ToyData()

    def loss(self, group, batch, step):
        loss = (self.modules["model"](batch["x"]) - batch["y"]).pow(2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        return loss, {"mse": loss.item()}

    def export(self, out_dir: Path, modules) -> None:
        self.exported = modules


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, checkpoint_every=2, log_every=1, ema_decay=0.9, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(stage: ToyStage) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stage.modules["model"].parameters()]


def test_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    straight = ToyStage()
    Trainer(straight, _cfg(), tmp_path / "a", progress=False).fit()

    torch.manual_seed(0)
    first = ToyStage()
    Trainer(first, _cfg(), tmp_path / "b", progress=False).fit(stop_at=3)  # "killed" after step 3
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step_00000002", "step_00000003"]
    torch.manual_seed(123)  # a new process starts from a different RNG state
    resumed = ToyStage()
    Trainer(resumed, _cfg(), tmp_path / "b", progress=False).fit()
    for a, b in zip(_weights(straight), _weights(resumed), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.exported["model"].parameters(), resumed.exported["model"].parameters(), strict=True):
        assert torch.equal(a, b)  # EMA too
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


class DrawingStage(ToyStage):
    """Records what a stage's noise, times or label dropout would draw from the global RNG at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: dict[int, torch.Tensor] = {}

    def loss(self, group, batch, step):
        self.draws[step] = torch.rand(3)
        return super().loss(group, batch, step)


def test_random_streams_derive_from_seed_rank_and_step(tmp_path):
    """Each process's streams come from (seed, rank, step): a resume needs no stored RNG state, and a resume with
    more processes gives the new ranks their own noise instead of a copy of rank 0's."""
    stage = DrawingStage()
    Trainer(stage, _cfg(steps=4), tmp_path / "a", progress=False).fit(stop_at=2)
    assert "rng" not in load_run_state(tmp_path / "a")
    torch.manual_seed(99)  # a new process, any RNG state
    resumed = DrawingStage()
    Trainer(resumed, _cfg(steps=4), tmp_path / "a", progress=False).fit()
    draws = {**stage.draws, **resumed.draws}
    assert sorted(draws) == [0, 1, 2, 3]
    for step, drawn in draws.items():
        seed_step(3, 0, step)
        assert torch.equal(drawn, torch.rand(3)), step
    seeds = {step_seed(3, rank, step) for rank in range(8) for step in range(200)}
    assert len(seeds) == 8 * 200 and step_seed(4, 0, 0) != step_seed(3, 0, 0)


class LateGroupStage(ToyStage):
    """A second optimizer group that starts at step 3 and counts its LR horizon from there (a discriminator)."""

    def __init__(self) -> None:
        super().__init__()
        self.modules["late"] = nn.Linear(6, 3)

    def optimizer_groups(self):
        return {"main": ["model"], "late": ["late"]}

    def optim_config(self, group):
        return OptimConfig(lr=1e-2, schedule="cosine", min_lr=1e-3)

    def group_active(self, group, step):
        return group == "main" or step >= 3

    def schedule_steps(self, group, total_steps):
        return total_steps - 3 if group == "late" else total_steps

    def loss(self, group, batch, step):
        name = "model" if group == "main" else "late"
        return (self.modules[name](batch["x"]) - batch["y"]).pow(2).mean(), {}


def test_a_late_group_schedules_its_lr_over_its_own_steps(tmp_path):
    trainer = Trainer(LateGroupStage(), _cfg(steps=8), tmp_path / "late", progress=False)
    trainer.fit()
    # both cosines end at min_lr: the late group advanced 5 times, over a horizon of 8 - 3 = 5
    assert trainer.schedulers["main"].get_last_lr()[0] == pytest.approx(1e-3)
    assert trainer.schedulers["late"].get_last_lr()[0] == pytest.approx(1e-3)


def test_grad_accumulation_matches_full_batch(tmp_path):
    results = []
    for accum in (1, 4):
        torch.manual_seed(0)
        stage = ToyStage()
        stage.modules["model"][1].p = 0.0  # no dropout: micro-batches must add up to the full batch exactly
        # fp32: the comparison is tighter than bf16's rounding (auto would pick bf16 on a CPU with native bf16)
        Trainer(stage, _cfg(grad_accum=accum, steps=3, precision="fp32"), tmp_path / f"acc{accum}",
                progress=False).fit()
        results.append(_weights(stage))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.margin
def test_loss_goes_down_and_checkpoints_are_pruned(tmp_path):
    stage = ToyStage(lr=5e-2)
    Trainer(stage, _cfg(steps=30, checkpoint_every=5, keep_checkpoints=2), tmp_path, progress=False).fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    within("toy loss, last / first", rows[-1]["mse"] / rows[0]["mse"], hi=0.5)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000025", "step_00000030"]
    state = load_run_state(tmp_path)  # loadable with weights_only=True
    assert state["step"] == 30 and state["data_position"] == 30 * 8


def test_non_finite_loss_is_skipped_then_stops(tmp_path):
    stage = ToyStage(nan_at={2})
    with pytest.warns(UserWarning, match="non-finite"):
        Trainer(stage, _cfg(steps=4), tmp_path / "skip", progress=False).fit()
    assert all(torch.isfinite(p).all() for p in stage.modules["model"].parameters())

    stage = ToyStage(nan_at=set(range(2, 100)))
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="last checkpoint is .*step_00000004"):
        Trainer(stage, _cfg(steps=20, max_bad_steps=3), tmp_path / "stop", progress=False).fit()
    # skipped updates leave the weights finite, so the checkpoint written meanwhile is usable
    assert all(torch.isfinite(p).all() for p in stage.modules["model"].parameters())


def test_ema_tracks_parameters():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    old = ema.module.weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.5 * old + 0.5 * model.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_forgets_the_initial_weights():
    ema = EMA(nn.Linear(2, 2), decay=0.9999, warmup=True)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(90) == 0.91 and ema.decay_at(10**7) == 0.9999
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(3.0)
    for n in range(20):
        ema.update(model, updates=n)
    # without warm-up a 0.9999 EMA would still be ~99.8 % the initial weights after 20 updates
    assert (ema.module.weight - 3.0).abs().max() < 0.5
    assert EMA(nn.Linear(2, 2), decay=0.9999).decay_at(0) == 0.9999


def test_sampler_is_independent_of_process_count():
    single = ResumableSampler(10, seed=5)
    stream = [single.key(p) for p in range(25)]
    ranks = [iter(ResumableSampler(10, seed=5, rank=r, world=2)) for r in range(2)]
    interleaved = [next(ranks[p % 2]) for p in range(25)]
    assert stream == interleaved
    assert sorted(k[0] for k in stream[:10]) == list(range(10))  # each epoch is a permutation
    resumed = iter(ResumableSampler(10, seed=5, start=13))
    assert [next(resumed) for _ in range(5)] == stream[13:18]


def test_ema_update_gives_the_new_weights_one_minus_decay():
    from fae.training import EMA

    model = nn.Linear(2, 2, bias=False)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        old = model.weight.clone()
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * old + 0.1 * model.weight)


def test_ema_copies_buffers():
    from fae.training import EMA

    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.9)
    model(torch.randn(8, 3) + 5.0)   # a training forward moves the running statistics
    ema.update(model)
    assert torch.equal(ema.module.running_mean, model.running_mean) and float(model.running_mean.mean()) > 0.1
