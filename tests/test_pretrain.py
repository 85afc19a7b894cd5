"""Self-supervised pretraining of the demo encoder (fae.stages.encoder): schedule and masks, mimetic init, a tiny run
that exports a folder FrozenEncoder loads, exact resume, and the cache that lets a second demo skip training."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from seeding import subprocess_env

from fae.config import ConfigError, apply_overrides, from_dict, read_yaml
from fae.stages import train_stage
from fae.stages.encoder import (
    RECORD_NAME,
    Config,
    EncoderArchConfig,
    build_encoder,
    cache_key,
    demo_encoder,
    random_masks,
    teacher_momentum,
)

TINY = ["data.limit=96", "data.image_size=16", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "views.local_crops=1", "views.local_size=8", "objective.prototypes=32", "objective.head_hidden=32",
        "objective.bottleneck=16", "train.steps=6", "train.batch_size=16", "train.checkpoint_every=3",
        "train.log_every=1", "optim.warmup_steps=1"]


def tiny_config(*extra: str) -> Config:
    data = apply_overrides(read_yaml("configs/demo/encoder_pretrain.yaml"), [*TINY, *extra])
    data.pop("stage")
    return from_dict(Config, data)


def test_teacher_momentum_schedule_and_masks():
    assert teacher_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert teacher_momentum(0.99, 100, 100) == pytest.approx(1.0)
    values = [teacher_momentum(0.99, s, 100) for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    masks = random_masks(500, 64, (0.1, 0.5), torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert counts.min() >= round(0.1 * 64) and counts.max() <= round(0.5 * 64)
    assert counts.float().std() > 1  # the ratio varies per image


def test_mimetic_init_makes_attention_local():
    torch.manual_seed(0)
    arch = EncoderArchConfig(hidden_size=64, num_layers=1, num_heads=2)
    mimetic = build_encoder(arch, 16).encoder.layer[0].attention
    default = build_encoder(EncoderArchConfig(hidden_size=64, num_layers=1, num_heads=2, init="default"), 16)
    default = default.encoder.layer[0].attention

    def qk_trace(attn) -> float:  # sum over heads of tr(W_q^T W_k): large and positive = tokens attend to themselves
        q, k = attn.q_proj.weight, attn.k_proj.weight
        return float(sum(torch.trace(q[h * 32:(h + 1) * 32].T @ k[h * 32:(h + 1) * 32]) for h in range(2)))

    assert qk_trace(mimetic) > 10 * abs(qk_trace(default))
    vo = (mimetic.o_proj.weight @ mimetic.v_proj.weight).diagonal().mean()
    assert vo < -0.1  # W_v W_o ~ -I


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="mask_ratio"):
        tiny_config("objective.mask_ratio=[0.6,0.2]")
    with pytest.raises(ConfigError, match="patch_size"):
        tiny_config("views.local_size=6")


def test_tiny_pretraining_exports_a_loadable_encoder_and_resumes_exactly(tmp_path, one_thread):
    from fae.encoders import EncoderConfig, FrozenEncoder

    cfg = tiny_config()
    full = train_stage("encoder", cfg, tmp_path / "full", progress=False)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss/main"])) for r in rows)
    assert 0 < rows[-1]["teacher_entropy"] < torch.log(torch.tensor(32.0)).item()

    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(full / "encoder")))
    features = encoder(torch.rand(3, 3, 16, 16))
    assert features.shape == (3, 16, 32) and torch.isfinite(features).all()
    record = json.loads((full / "encoder" / RECORD_NAME).read_text())
    assert record["config"]["train"]["steps"] == 6 and record["data"]["length"] == 96

    # a run stopped after 3 steps and resumed exports the same teacher, bit for bit
    train_stage("encoder", cfg, tmp_path / "split", progress=False, stop_at=3)
    assert not (tmp_path / "split" / "encoder").exists()
    train_stage("encoder", cfg, tmp_path / "split", progress=False)
    a = load_file(str(full / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "encoder" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the teacher moved away from its initialisation
    torch.manual_seed(cfg.train.seed)
    init = build_encoder(cfg.model, cfg.data.image_size).state_dict()
    assert any(not torch.allclose(init[k], a[k]) for k in a)


def test_demo_encoder_cache(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config("train.steps=2")
    folder, from_cache = demo_encoder(cfg, tmp_path / "run1", progress=False)
    assert not from_cache and (folder / "metrics.jsonl").is_file()
    assert json.loads((folder / RECORD_NAME).read_text())["seconds"] > 0
    again, from_cache = demo_encoder(cfg, tmp_path / "run2", progress=False)
    assert from_cache and again == folder and not (tmp_path / "run2").exists()
    # another config or other data is another key
    assert cache_key(tiny_config("train.steps=3")) != cache_key(cfg)
    assert cache_key(tiny_config("train.steps=2", "data.limit=80")) != cache_key(cfg)


def test_torchrun_two_processes(tmp_path):
    """DDP with two student forwards per step (global and local crops) and all-reduced centres."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = subprocess_env(OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fae.cli", "train", "encoder", "--config", str(root / "configs/demo/encoder_pretrain.yaml"),
                             "--out", str(out), "--no-progress", *TINY, "train.steps=3"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "encoder" / "model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
