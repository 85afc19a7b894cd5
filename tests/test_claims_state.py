"""Claims about state around the models, checked by behaviour: the bf16 verdict's timing (docs/precision.md),
checkpoint manifests (docs/reliability.md) and FSDP's gradient sync under accumulation (docs/scaling.md)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

import fae.precision as P
from fae import sharding
from fae.io import manifest_problem, write_checkpoint_manifest


# ---------------------------------------------------------------------------------------------------- precision
def test_the_bf16_verdict_times_its_matmuls_on_one_thread_and_restores_the_threads(monkeypatch):
    """"On one thread and in the thread's CPU time": a second thread's work would not show in thread_time."""
    seen: list[int] = []
    timed = P._timed_matmuls
    monkeypatch.setattr(P, "_timed_matmuls", lambda *a: (seen.append(torch.get_num_threads()), timed(*a))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        timing = P.cpu_matmul_timing.__wrapped__(size=16, repeats=1)   # uncached: the process's verdict stays
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1] and after == 2
    assert timing.fp32_ms >= 0 and timing.bf16_ms >= 0


# ---------------------------------------------------------------------------------------------------- manifests
def test_a_checkpoint_manifest_covers_files_in_sub_folders(tmp_path):
    """A sharded checkpoint keeps its shards under dcp/: damage there must be found like damage at the top."""
    ckpt = tmp_path / "step_00000002"
    (ckpt / "dcp").mkdir(parents=True)
    (ckpt / "training_state.pt").write_bytes(b"state" * 10)
    (ckpt / "dcp" / "__0_0.distcp").write_bytes(b"shard" * 10)
    write_checkpoint_manifest(ckpt)
    assert manifest_problem(ckpt) is None
    (ckpt / "dcp" / "__0_0.distcp").write_bytes(b"shard" * 9 + b"sharD")   # same size, one byte altered
    assert "__0_0.distcp" in manifest_problem(ckpt)
    (ckpt / "dcp" / "__0_0.distcp").unlink()
    assert "__0_0.distcp" in manifest_problem(ckpt)


# ---------------------------------------------------------------------------------------------------- FSDP sync
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
