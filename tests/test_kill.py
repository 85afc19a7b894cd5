"""kill -9 at a chosen write in every stage and in `fae encode` / `fae sample`, then the same command again: the
result equals an uninterrupted run, bit for bit.

The kill point is the N-th atomic write of the process (FAE_KILL_AT_WRITE=N, fae.io): after a file's bytes are
written and before it is renamed into place, i.e. in the middle of a checkpoint, a latent shard, a sample chunk or a
bundle. The uninterrupted run happens in this process; the killed one in a subprocess; the resume here again."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from seeding import subprocess_env
from tiny import tiny_dit_yaml

from fae.cli import main

ROOT = Path(__file__).resolve().parents[1]


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def killed_then_resumed(args: list[str], kill_at: int, tmp_path: Path) -> int:
    """Run `fae <args>` in a subprocess that SIGKILLs itself at its `kill_at`-th atomic write; then run it here.
    Returns the newest checkpoint step the killed run left (0 if none or not a training run)."""
    env = subprocess_env(FAE_KILL_AT_WRITE=str(kill_at), FAE_CACHE=str(tmp_path / "c"))
    done = subprocess.run([sys.executable, "-m", "fae.cli", *args, "--no-progress"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"not killed (rc {done.returncode}): {done.stderr[-2000:]}"
    out = Path(args[args.index("--out") + 1])
    reached = (checkpoint_steps(out) or [0])[-1] if (out / "checkpoints").is_dir() else 0
    assert main([*args, "--no-progress"]) == 0
    return reached


def same_safetensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (a, b)


def test_encode_resumes_its_shards_exactly(tiny_latent_world, tmp_path, monkeypatch):
    parts = tiny_latent_world["root"]
    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "c"))
    args = ["encode", "--fae", str(parts / "pipeline" / "fae"), "--data", str(parts / "data.yaml"), "--shard-size", "8"]
    assert main([*args, "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    killed_then_resumed([*args, "--out", str(tmp_path / "killed")], kill_at=3, tmp_path=tmp_path)  # in shard 3 of 5
    files = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "killed").iterdir())      # no temporary file left behind
    for name in files:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name


def test_dit_training_and_sampling_resume_exactly(tiny_latent_world, tmp_path, monkeypatch):
    parts = tiny_latent_world["root"]
    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "c"))
    cfg = tmp_path / "dit.yaml"
    cfg.write_text(tiny_dit_yaml(tiny_latent_world["cache"], steps=6))
    train = ["train", "dit", "--config", str(cfg)]
    assert main([*train, "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    killed_then_resumed([*train, "--out", str(tmp_path / "killed")], kill_at=5, tmp_path=tmp_path)  # 2nd checkpoint
    same_safetensors(tmp_path / "straight" / "dit" / "model.safetensors", tmp_path / "killed" / "dit" / "model.safetensors")
    for name in ("model", "model.ema"):
        same_safetensors(tmp_path / "straight" / "checkpoints" / "step_00000006" / f"{name}.safetensors",
                         tmp_path / "killed" / "checkpoints" / "step_00000006" / f"{name}.safetensors")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000006" / "training_state.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "step_00000006" / "training_state.pt", weights_only=True)
    for k, v in a["optimizers"]["main"]["state"][0].items():
        assert torch.equal(v, b["optimizers"]["main"]["state"][0][k]), k

    sample = ["sample", "--dit", str(tmp_path / "straight"), "--fae", str(parts / "pipeline"), "-n", "12",
              "--batch-size", "3", "--steps", "2", "--sampler", "euler"]
    assert main([*sample, "--out", str(tmp_path / "s-straight"), "--no-progress"]) == 0
    killed_then_resumed([*sample, "--out", str(tmp_path / "s-killed")], kill_at=3, tmp_path=tmp_path)  # 3rd chunk
    assert np.array_equal(np.load(tmp_path / "s-straight" / "samples.npz")["arr_0"],
                          np.load(tmp_path / "s-killed" / "samples.npz")["arr_0"])
    assert not (tmp_path / "s-killed" / ".chunks").exists()


def test_pixel_decoder_with_gan_resumes_exactly(tmp_path, tiny_encoder_dir, monkeypatch):
    from test_pixel_decoder import write_config

    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "c"))
    cfg = write_config(tmp_path / "g.yaml", tiny_encoder_dir, steps=4, eval_limit=0)
    train = ["train", "pixel-decoder", "--config", str(cfg)]
    assert main([*train, "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    killed_then_resumed([*train, "--out", str(tmp_path / "killed")], kill_at=6, tmp_path=tmp_path)
    for name in ("pixel_decoder/model.safetensors", "discriminator.safetensors"):
        same_safetensors(tmp_path / "straight" / name, tmp_path / "killed" / name)


def test_encoder_pretraining_resumes_exactly(tmp_path, monkeypatch):
    from test_pretrain import TINY

    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "c"))
    train = ["train", "encoder", "--config", str(ROOT / "configs" / "demo" / "encoder_pretrain.yaml"), *TINY]
    assert main([*train, "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    killed_then_resumed([*train, "--out", str(tmp_path / "killed")], kill_at=4, tmp_path=tmp_path)
    same_safetensors(tmp_path / "straight" / "encoder" / "model.safetensors",
                     tmp_path / "killed" / "encoder" / "model.safetensors")
