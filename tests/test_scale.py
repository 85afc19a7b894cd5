"""Scale: DDP and FSDP2 (`train.fsdp`) on two CPU processes (gloo) train a tiny DiT exactly as one process does at the
same global batch, and a run resumes when the number of processes changes (2 -> 1, 1 -> 2), in both layouts; under
gradient accumulation FSDP's gradient sync is off on all but the last micro-batch."""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from fae import sharding
from fae.data import split_key
from fae.models.dit import DiT, DiTConfig
from fae.training import OptimConfig, TrainConfig, Trainer, TrainingError, TrainStage, checkpoint_dirs


class Latents(Dataset):
    """Fixed (latent, time, label, target velocity) items: the loss is deterministic, so runs can match exactly."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.v = torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 4, 4, 4, generator=g)
        self.t, self.y = torch.rand(n, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        i, _ = split_key(key)
        return {"x": self.x[i], "t": self.t[i], "y": self.y[i], "v": self.v[i]}


class TinyDiT(TrainStage):
    supports_fsdp = True

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.modules = {"model": DiT(DiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                               num_classes=3, class_dropout=0.0))}
        # eps 1e-4, not 1e-8: with a tiny eps Adam's step is lr * sign(g) where g is at rounding level, so the
        # summation order of an all-reduce moved such weights by up to 4e-6 (at seed offset 3); the step is
        # smooth in g now, and the comparison tests the all-reduce, not Adam's conditioning
        self.optim = OptimConfig(lr=1e-2, eps=1e-4, schedule="cosine", warmup_steps=1)

    def train_dataset(self) -> Dataset:
        return Latents()

    def loss(self, group, batch, step):
        pred = self.modules["model"](batch["x"], batch["t"], batch["y"])
        return (pred - batch["v"]).pow(2).mean(), {}

    def export(self, out_dir: Path, modules) -> None:
        pass


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=8, grad_accum=2, checkpoint_every=100, log_every=1, ema_decay=0.5, seed=3,
                precision="fp32")
    return TrainConfig(**{**base, **kw})


def _train(out: Path, stop_at: int | None, **cfg) -> dict[str, torch.Tensor]:
    """Train (or resume) in this process; the full weights, EMA weights (gathered when sharded) and the exported
    modules (whole on every process)."""
    trainer = Trainer(TinyDiT(), _cfg(**cfg), out, progress=False)
    trainer.fit(stop_at=stop_at)
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    weights = {k: full(v).detach().clone() for k, v in trainer.raw["model"].state_dict().items()}
    ema = {f"ema.{k}": full(v).detach().clone() for k, v in trainer.ema["model"].module.state_dict().items()}
    exported = {f"export.{k}": v.detach().clone() for k, v in trainer.export_modules()["model"].state_dict().items()}
    return {**weights, **ema, **exported}


def _rank(rank: int, port: int, out: Path, stop_at: int | None, cfg: dict) -> None:
    torch.set_num_threads(1)   # a forked child must not reuse the parent's thread pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        torch.save(_train(out, stop_at, **cfg), out / f"rank{rank}.pt")
        torch.distributed.barrier()
    except BaseException:
        traceback.print_exc()  # os._exit below would swallow it, and the peer only reports the broken connection
        sys.stderr.flush()
    finally:
        os._exit(0)  # no exit-time teardown in a forked child: a gloo group torn down after its peer left can hang


def _two_processes(out: Path, stop_at: int | None = None, **cfg) -> list[dict[str, torch.Tensor]]:
    import torch._dynamo  # noqa: F401  (imported once before the fork: DDP/FSDP import it on first use)

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.pt"):
        old.unlink()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(rank, port, out, stop_at, cfg)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    results = [out / f"rank{rank}.pt" for rank in (0, 1)]
    assert all(r.is_file() for r in results), "a process failed (see its output above)"
    return [torch.load(r, weights_only=True) for r in results]


def _prefixed(what: str) -> Callable[[str], str]:
    """An assert_close `msg` that keeps torch's message behind `what`."""
    return lambda m: f"{what}: {m}"


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=2e-6, msg=_prefixed(f"{what} {k}"))


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, torch.Tensor]:
    return _train(tmp_path_factory.mktemp("single"), None)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_as_one(tmp_path, single, fsdp):
    start = {k: v for k, v in TinyDiT().modules["model"].state_dict().items()}
    assert any(not torch.equal(single[k], v) for k, v in start.items())   # the run moved the weights
    for rank, got in enumerate(_two_processes(tmp_path, fsdp=fsdp)):
        _assert_same(got, single, f"{'fsdp' if fsdp else 'ddp'} rank {rank}")


def test_sharded_checkpoint_is_written_by_every_process_and_covered_by_the_manifest(tmp_path):
    # with previews on: gathering the sharded weights for rank 0's preview is a collective every process joins
    _two_processes(tmp_path, stop_at=2, fsdp=True, preview_every=1)
    ckpt = checkpoint_dirs(tmp_path)[-1]
    shards = sorted(p.name for p in (ckpt / "dcp").glob("*.distcp"))
    assert len(shards) == 2 and not list(ckpt.glob("*.safetensors"))
    import json
    listed = json.loads((ckpt / "manifest.json").read_text())
    assert {f"dcp/{s}" for s in shards} <= listed.keys() and "dcp/.metadata" in listed


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
@pytest.mark.parametrize("first", [1, 2], ids=["1-then-2", "2-then-1"])
def test_resume_on_another_number_of_processes(tmp_path, single, fsdp, first):
    if first == 2:
        _two_processes(tmp_path, stop_at=2, fsdp=fsdp)
        resumed = [_train(tmp_path, None, fsdp=fsdp)]
    else:
        _train(tmp_path, 2, fsdp=fsdp)
        resumed = _two_processes(tmp_path, fsdp=fsdp)
    assert [int(p.name.split("_")[1]) for p in checkpoint_dirs(tmp_path)] == [2, 4]
    for rank, got in enumerate(resumed):
        _assert_same(got, single, f"resumed rank {rank}")


def test_a_checkpoint_of_the_other_layout_is_refused_by_name(tmp_path):
    _train(tmp_path, 2, fsdp=True)
    with pytest.raises(TrainingError, match="written with train.fsdp and the layouts differ: resume with train.fsdp=true"):
        _train(tmp_path, None, fsdp=False)


def test_fsdp_is_refused_for_a_stage_that_does_not_support_it(tmp_path):
    class Plain(TinyDiT):
        supports_fsdp = False

    with pytest.raises(ValueError, match="train.fsdp=true: Plain trains with DDP only"):
        Trainer(Plain(), _cfg(fsdp=True), tmp_path, progress=False)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_evaluation_shares_partition_the_data_with_rank_0_first(monkeypatch, world):
    from fae import distributed as D

    monkeypatch.setattr(D, "world_size", lambda: world)
    shares = []
    for r in range(world):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        shares.append(list(D.shard_of(11)))
    assert sum(shares, []) == list(range(11))   # disjoint, complete, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("sizes", [(3, 4), (40, 25), (0, 7)])
def test_merged_feature_statistics_equal_one_pass(sizes):
    import numpy as np

    from fae.metrics.frechet import StatsAccumulator

    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 8)) + i for i, n in enumerate(sizes)]
    one, merged = StatsAccumulator(8), StatsAccumulator(8)
    one.update(np.concatenate(parts))
    for part in parts:
        acc = StatsAccumulator(8)
        acc.update(part)
        merged.merge(acc)
    a, b = one.stats(), merged.stats()
    np.testing.assert_allclose(b.mu, a.mu, atol=1e-12)
    np.testing.assert_allclose(b.sigma, a.sigma, atol=1e-10)
    assert one.n == merged.n == sum(sizes)
    assert (a.factor is None) == (b.factor is None) == (sum(sizes) > 8)   # few samples: the exact factor is kept


def test_memory_plan_counts_the_paper_models_and_their_saved_activations(monkeypatch):
    """benchmarks/memory_plan.py (docs/scaling.md): state from exact parameter counts, activations per sample from the
    tensors autograd saves; the per-GPU figure falls with FSDP only for the generator stages."""
    import importlib.util

    from fae.models.dit import DiT, DiTConfig

    spec = importlib.util.spec_from_file_location("memory_plan", Path(__file__).parents[1] / "benchmarks/memory_plan.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    rows = [plan.plan("dit_sit_xl1"), plan.plan("fae_dinov2_g14")]
    assert rows[0]["trainable"] == 675_148_064 and rows[1]["trainable"] == 38_166_592 + 170_428_416
    # a 2-block DiT saves, per sample, the same bytes on meta as a real forward does (on the kernels a GPU uses:
    # F.linear, not the CPU-only oneDNN linear, whose backward keeps its own copies)
    import fae.nn

    monkeypatch.setattr(fae.nn, "_ONEDNN_AVAILABLE", False)
    with torch.device("meta"):
        tiny_meta = DiT(DiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3))
    tiny = DiT(DiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3))
    meta = plan.saved_bytes_per_sample(lambda b: tiny_meta(torch.randn(b, 4, 4, 4, device="meta"),
                                                           torch.rand(b, device="meta"), None))
    real = plan.saved_bytes_per_sample(lambda b: tiny(torch.randn(b, 4, 4, 4), torch.rand(b), None))
    assert meta == real > 0
    text = plan.table(rows, [8], None)
    assert "| dit_sit_xl1 |" in text and ", - GiB" in text.split("fae_dinov2_g14")[1]  # no FSDP for stage 1
    assert rows[0]["checkpointed_per_sample"] < rows[0]["activation_per_sample"] / 10   # block inputs only


# ---------------------------------------------------------------------------------------------------- FSDP gradient sync
# grad accumulation turns FSDP's gradient sync off on all but the last micro-batch (docs/scaling.md)
def test_gradient_sync_is_off_on_every_micro_batch_but_the_last(tmp_path, monkeypatch, one_thread):
    """grad_accum = 3: each optimizer step runs micro-batches with sync off, off, on (FSDP2's no_sync)."""
    from fae.data import split_key
    from fae.training import OptimConfig, TrainConfig, Trainer, TrainStage

    state: dict[str, bool] = {}
    seen: list[bool] = []
    monkeypatch.setattr(sharding, "set_gradient_sync", lambda module, sync: state.update(sync=sync))

    class Rows(Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, key):
            index, _ = split_key(key)
            return {"x": torch.full((3,), float(index))}

    class Toy(TrainStage):
        def __init__(self) -> None:
            self.modules = {"net": torch.nn.Linear(3, 1)}
            self.optim = OptimConfig(lr=1e-3)

        def train_dataset(self):
            return Rows()

        def loss(self, group, batch, step):
            seen.append(state["sync"])
            return self.modules["net"](batch["x"]).pow(2).mean(), {}

        def export(self, out_dir, modules):
            pass

    Trainer(Toy(), TrainConfig(steps=2, batch_size=6, grad_accum=3, checkpoint_every=2, log_every=1,
                               precision="fp32"), tmp_path, progress=False).fit()
    assert seen == [False, False, True] * 2


def test_set_gradient_sync_switches_a_sharded_module_and_leaves_others_alone():
    from torch.distributed.fsdp import FSDPModule

    class Sharded(FSDPModule, torch.nn.Module):   # stands in for what fully_shard makes (no process group needed)
        def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
            self.calls.append(requires_gradient_sync)

    module = object.__new__(Sharded)   # FSDPModule.__new__ expects a class made by fully_shard
    torch.nn.Module.__init__(module)
    module.calls = []
    for sync in (False, False, True):
        sharding.set_gradient_sync(module, sync)
    assert module.calls == [False, False, True]
    sharding.set_gradient_sync(torch.nn.Linear(2, 2), False)   # unsharded: nothing to switch, no error
