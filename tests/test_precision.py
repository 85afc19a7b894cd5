"""Precision chosen from the hardware: `auto` follows what the CPU actually does (a timed matmul), an explicit slow
bf16 warns once, FAE_PRECISION overrides auto, the trainer and the frozen encoder compute in what was chosen, and the
verdict times its matmuls on one thread."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fae.precision as P
from fae.precision import CpuMatmulTiming, resolve_precision


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU runs bf16 natively (fast=True) or emulates it (fast=False)."""
    monkeypatch.delenv("FAE_PRECISION", raising=False)
    monkeypatch.setattr(P, "_warned", set())

    def set_speed(fast: bool) -> None:
        timing = CpuMatmulTiming(fp32_ms=1.0, bf16_ms=0.25 if fast else 30.0)
        monkeypatch.setattr(P, "cpu_matmul_timing", lambda: timing)

    return set_speed


def test_auto_follows_the_timed_matmul(cpu_bf16):
    cpu_bf16(True)
    fast = resolve_precision("auto", "cpu")
    assert fast.name == "bf16" and "native" in fast.reason and fast.requested == "auto"
    cpu_bf16(False)
    slow = resolve_precision("auto", "cpu")
    assert slow.name == "fp32" and "not native" in slow.reason
    assert resolve_precision("fp32", "cpu").name == "fp32"


def test_explicit_bf16_on_a_slow_cpu_runs_and_warns_once(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(UserWarning, match="not native"):
        assert resolve_precision("bf16", "cpu").name == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu").name == "bf16"  # second time: no warning
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("bf16", "cpu")


def test_environment_overrides_auto_only(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    monkeypatch.setenv("FAE_PRECISION", "fp32")
    assert resolve_precision("auto", "cpu").name == "fp32"
    assert resolve_precision("bf16", "cpu").name == "bf16"
    cpu_bf16(False)
    monkeypatch.setenv("FAE_PRECISION", "bf16")
    with pytest.warns(UserWarning):
        assert resolve_precision("auto", "cpu").name == "bf16"
    monkeypatch.setenv("FAE_PRECISION", "fp16")
    with pytest.raises(ValueError, match="FAE_PRECISION"):
        resolve_precision("auto", "cpu")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="'half'"):
        resolve_precision("half", "cpu")


def test_fp32_choice_switches_an_outer_autocast_off():
    a = torch.randn(8, 8)
    choice = resolve_precision("fp32", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with choice.autocast():
            assert (a @ a).dtype == torch.float32


def test_emulated_avx2_cpu_resolves_auto_to_fp32():
    """The real timing, no mock: with the CPU capped to AVX2 (no native bf16), auto must pick fp32."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    env.pop("FAE_PRECISION", None)
    code = ("import json, torch; from fae.precision import resolve_precision, cpu_matmul_timing; "
            "t = cpu_matmul_timing(); c = resolve_precision('auto', 'cpu'); "
            "print(json.dumps([c.name, torch.backends.cpu.get_cpu_capability(), t.fp32_ms, t.bf16_ms]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    name, capability, fp32_ms, bf16_ms = json.loads(out.stdout.strip().splitlines()[-1])
    assert capability in ("AVX2", "DEFAULT")
    assert name == "fp32" and bf16_ms > fp32_ms, (fp32_ms, bf16_ms)


def test_trainer_computes_in_the_chosen_precision_and_records_it(tmp_path, monkeypatch):
    from fae.data.keys import split_key
    from fae.training import TrainConfig, Trainer, TrainStage

    seen: list[torch.dtype] = []

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, key):
            index, _ = split_key(key)
            return {"x": torch.full((4,), float(index))}

    class Toy(TrainStage):
        def __init__(self) -> None:
            self.modules = {"net": torch.nn.Linear(4, 4)}
            from fae.training import OptimConfig
            self.optim = OptimConfig(lr=1e-2)

        def train_dataset(self):
            return Rows()

        def loss(self, group, batch, step):
            y = self.modules["net"](batch["x"])
            seen.append(y.dtype)
            return y.float().pow(2).mean(), {}

        def export(self, out_dir, modules):
            pass

    for forced, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setenv("FAE_PRECISION", forced)
        seen.clear()
        out = tmp_path / forced
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 may be slow on this CPU
            Trainer(Toy(), TrainConfig(steps=2, batch_size=4, checkpoint_every=2, log_every=1), out,
                    progress=False).fit()
        assert seen and set(seen) == {dtype}
        record = json.loads((out / "run.json").read_text())
        assert record["precision"]["precision"] == forced and record["precision"]["requested"] == "auto"
        assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_frozen_encoder_features_do_not_depend_on_the_callers_autocast(tiny_encoder_dir):
    """Training runs the encoder inside the trainer's autocast, `fae encode` and evaluation outside it: the encoder
    sets its own precision, so one image gives one set of features on every path."""
    from fae.encoders import EncoderConfig, FrozenEncoder

    path = tiny_encoder_dir
    images = torch.rand(2, 3, 16, 16)
    fp32 = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(path), precision="fp32"))
    plain = fp32(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fp32(images)
    assert torch.equal(plain, inside) and inside.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(path), precision="bf16"))
        low = bf16(images)
    assert low.dtype == torch.float32 and not torch.equal(low, plain)
    assert torch.allclose(low, plain, atol=0.1, rtol=0.1)


def test_the_bf16_verdict_does_not_depend_on_an_enclosing_autocast(monkeypatch):
    """The first caller of `bf16_native` may sit inside bf16 autocast (the fused MLP path asks there): the products
    must be timed with autocast off, or the "fp32" one runs in bf16 too and the verdict is a coin toss."""
    import fae.precision as P

    seen = []
    timed = P._timed_matmuls
    monkeypatch.setattr(P, "_timed_matmuls", lambda *a: (seen.append(torch.is_autocast_enabled("cpu")), timed(*a))[1])
    with torch.autocast("cpu", torch.bfloat16):
        P.cpu_matmul_timing.__wrapped__()   # the uncached body: the process's verdict stays as it was
    assert seen == [False]


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
