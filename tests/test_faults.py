"""Fault injection: damaged and hostile checkpoints, a full disk, damaged bundles. Nothing is lost, nothing is
executed, and every error names the file."""
from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import torch
from test_training import ToyStage, _cfg, _weights

from fae.io import MANIFEST_NAME, atomic_save_npz, manifest_problem
from fae.models.dit import DiT, DiTConfig
from fae.training import Trainer, TrainingError, checkpoint_dirs


def _straight(tmp_path: Path) -> list[torch.Tensor]:
    torch.manual_seed(0)
    stage = ToyStage()
    Trainer(stage, _cfg(), tmp_path / "straight", progress=False).fit()
    return _weights(stage)


def _paused(out: Path, stop_at: int) -> None:
    torch.manual_seed(0)
    Trainer(ToyStage(), _cfg(), out, progress=False).fit(stop_at=stop_at)


def _resume(out: Path) -> list[torch.Tensor]:
    torch.manual_seed(123)  # a new process: its own RNG, which the checkpoint must override
    stage = ToyStage()
    Trainer(stage, _cfg(), out, progress=False).fit()
    return _weights(stage)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(tmp_path, capsys, damage):
    expected = _straight(tmp_path)
    _paused(tmp_path / "run", stop_at=4)                       # checkpoints at steps 2 and 4
    newest = checkpoint_dirs(tmp_path / "run")[-1]
    assert newest.name == "step_00000004" and manifest_problem(newest) is None
    victim = newest / "model.safetensors"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        victim.unlink()
    assert str(victim) in manifest_problem(newest)
    with pytest.warns(UserWarning, match="step_00000004 is damaged"):
        resumed = _resume(tmp_path / "run")
    assert "passing over 1 damaged" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=True))   # from step 2, the same run


def test_no_usable_checkpoint_is_an_error_that_names_them(tmp_path):
    _paused(tmp_path / "run", stop_at=4)
    for ckpt in checkpoint_dirs(tmp_path / "run"):
        (ckpt / "training_state.pt").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="step_00000002.*Move"):
        _resume(tmp_path / "run")


class _Exploit:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.target}",)


def test_a_pickle_with_executable_content_is_refused_not_run(tmp_path):
    expected = _straight(tmp_path)
    _paused(tmp_path / "run", stop_at=4)
    newest = checkpoint_dirs(tmp_path / "run")[-1]
    sentinel = tmp_path / "pwned"
    (newest / "training_state.pt").write_bytes(pickle.dumps({"step": 4, "x": _Exploit(sentinel)}))
    (newest / MANIFEST_NAME).unlink()                         # even without a manifest to catch the change
    with pytest.warns(UserWarning, match="damaged"):
        resumed = _resume(tmp_path / "run")
    assert not sentinel.exists()
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=True))


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch):
    expected = _straight(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    torch.manual_seed(0)
    with pytest.raises(TrainingError, match=r"No space left.*step_00000002, is intact.*resume"):
        Trainer(ToyStage(), _cfg(), tmp_path / "run", progress=False).fit()
    monkeypatch.setattr(torch, "save", real_save)
    ckpts = checkpoint_dirs(tmp_path / "run")
    assert [c.name for c in ckpts] == ["step_00000002"] and manifest_problem(ckpts[0]) is None
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    resumed = _resume(tmp_path / "run")                      # space freed: the same command finishes the run
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=True))


def test_a_failed_npz_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import numpy as np

    path = tmp_path / "stats.npz"
    atomic_save_npz(path, path=np.arange(3), arr_0=np.ones((2, 2), np.uint8))  # any key, "path" too
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "path"] and data["path"].tolist() == [0, 1, 2]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_save_npz(path, arr_0=np.zeros(1))
    with np.load(path) as data:
        assert data["path"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_a_damaged_bundle_is_named_on_load(tmp_path):
    model = DiT(DiTConfig(in_channels=4, input_size=(4, 4), patch_size=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3))
    bundle = model.save_pretrained(tmp_path / "dit")
    assert DiT.from_pretrained(bundle) is not None
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"model.safetensors does not match the SHA-256.*again"):
        DiT.from_pretrained(bundle)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        DiT.from_pretrained(bundle)


def _image_folder(root: Path, count: int = 6, size: int = 20) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_a_missing_held_out_split_is_refused_before_the_first_step(tmp_path, tiny_encoder_dir, capsys):
    from fae.cli import main

    (tmp_path / "plain").mkdir()
    folder = _image_folder(tmp_path / "plain")                      # images, but no train/ and test/ folders
    cfg = tmp_path / "fae.yaml"
    cfg.write_text(f"""
stage: fae
encoder: {{kind: dinov2, name_or_path: {tiny_encoder_dir}}}
model: {{feature_dim: 32, grid: [4, 4], latent_channels: 4, encoder_heads: 2, encoder_head_dim: 16,
        decoder_depth: 1, decoder_heads: 2}}
data: {{kind: image_folder, root: {folder}, image_size: 16}}
train: {{steps: 2, batch_size: 2, checkpoint_every: 1}}
""")
    assert main(["train", "fae", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "eval.split='test'" in err and "eval.limit=0" in err
    assert checkpoint_dirs(tmp_path / "run") == []                   # refused before any training
    assert main(["train", "fae", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress",
                 "eval.limit=0"]) == 0


def _messy_folder(root: Path) -> tuple[list[str], list[str]]:
    """Readable images in every awkward mode, and files that are not readable images. Returns (good, bad) names."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    rgb = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    good = {
        "a_rgb.png": Image.fromarray(rgb),
        "b_rgba.png": Image.fromarray(rng.integers(0, 255, (24, 24, 4), dtype=np.uint8)),
        "c_palette.png": Image.fromarray(rgb).convert("P"),
        "d_la.png": Image.fromarray(rgb).convert("LA"),
        "e_grey16.png": Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)),
        "f_cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "g_grey.jpg": Image.fromarray(rgb).convert("L"),
        "h_tiny.png": Image.fromarray(rgb[:2, :3]),                  # smaller than a patch: resized up
    }
    for name, image in good.items():
        image.save(root / name)
    full = (root / "a_rgb.png").read_bytes()
    (root / "p_truncated.png").write_bytes(full[: len(full) // 2])
    (root / "q_empty.png").write_bytes(b"")
    (root / "r_text.png").write_text("not an image")
    (root / "s_random.jpg").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    Image.new("1", (14_000, 14_000)).save(root / "t_bomb.png")        # 196 Mpx: PIL refuses it unopened
    return sorted(good), ["p_truncated.png", "q_empty.png", "r_text.png", "s_random.jpg", "t_bomb.png"]


def test_bad_files_are_dropped_and_counted_never_replaced(tmp_path, tiny_encoder_dir):
    """A latent cache of a messy folder holds exactly the readable images (the same rows as a folder of only those),
    and its manifest names the files it left out."""
    import json
    import shutil
    import warnings

    from fae.data import DataConfig
    from fae.data.latents import LatentCache
    from fae.encoders import EncoderConfig
    from fae.encoding import EncodeOptions, encode_latents

    good, bad = _messy_folder(tmp_path / "messy" / "train" / "things")
    (tmp_path / "clean" / "train" / "things").mkdir(parents=True)
    for name in good:
        shutil.copy(tmp_path / "messy" / "train" / "things" / name, tmp_path / "clean" / "train" / "things" / name)
    encoder = EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir))
    opts = EncodeOptions(source="raw_features", flip=False, batch_size=4, shard_size=8)
    caches = {}
    for name in ("messy", "clean"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            caches[name] = encode_latents(DataConfig(kind="image_folder", root=str(tmp_path / name), image_size=16),
                                          tmp_path / f"cache-{name}", encoder=encoder, options=opts, progress=False)
        if name == "messy":
            for file in bad:                                           # each bad file named in a warning
                assert any(file in str(w.message) for w in caught), file
    manifest = json.loads((caches["messy"] / "cache.json").read_text())
    assert manifest["num_items"] == len(good) and manifest["skipped"]["count"] == len(bad)
    assert sorted(Path(p).name for p in manifest["skipped"]["items"]) == bad
    messy, clean = LatentCache(caches["messy"]), LatentCache(caches["clean"])
    assert len(messy) == len(clean) == len(good)
    for i in range(len(good)):                                         # no neighbour stands in for a bad file
        assert torch.equal(messy.row(i, "latents"), clean.row(i, "latents"))
    assert len({messy.row(i, "latents").sum().item() for i in range(len(good))}) == len(good)   # all distinct


def _messy_fae_config(tmp_path: Path, tiny_encoder_dir: Path, train: str) -> Path:
    """A tiny `fae` stage config on the messy folder under tmp_path/data, with the given `train:` settings."""
    cfg = tmp_path / "fae.yaml"
    cfg.write_text(f"""
stage: fae
encoder: {{kind: dinov2, name_or_path: {tiny_encoder_dir}}}
model: {{feature_dim: 32, grid: [4, 4], latent_channels: 4, encoder_heads: 2, encoder_head_dim: 16,
        decoder_depth: 1, decoder_heads: 2}}
data: {{kind: image_folder, root: {tmp_path / 'data'}, image_size: 16}}
train: {{{train}}}
eval: {{limit: 0}}
""")
    return cfg


def test_a_training_run_counts_the_unreadable_items_it_drew(tmp_path, tiny_encoder_dir):
    import json

    from fae.cli import main

    good, bad = _messy_folder(tmp_path / "data" / "train" / "things")
    cfg = _messy_fae_config(tmp_path, tiny_encoder_dir, f"steps: 1, batch_size: {len(good) + len(bad)}, checkpoint_every: 1")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        assert main(["train", "fae", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"] == {"items": len(good) + len(bad), "dropped_draws": len(bad)}   # one epoch: each file once
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/dropped"] == len(bad)


def test_a_resumed_run_counts_the_unreadable_items_of_the_whole_run(tmp_path, tiny_encoder_dir):
    """Killed mid-run and resumed, run.json's data.dropped_draws is the uninterrupted run's count, not the count
    since the resume (the checkpoint carries it)."""
    import json

    from test_kill import killed_then_resumed

    from fae.cli import main

    good, bad = _messy_folder(tmp_path / "data" / "train" / "things")
    cfg = _messy_fae_config(tmp_path, tiny_encoder_dir, "steps: 8, batch_size: 4, checkpoint_every: 2, log_every: 100")
    args = ["train", "fae", "--config", str(cfg)]
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        assert main([*args, "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
        reached = killed_then_resumed([*args, "--out", str(tmp_path / "killed")], kill_at=12, tmp_path=tmp_path)
    assert 2 <= reached < 8, reached    # killed after a checkpoint, before the end
    straight, killed = (json.loads((tmp_path / run / "run.json").read_text())["data"] for run in ("straight", "killed"))
    assert straight["dropped_draws"] > len(bad) and killed == straight   # 32 draws over 13 items: bad ones recur


def _fae_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "fae" / "model.safetensors"))


@pytest.mark.parametrize("stage_name", ["fae", "pixel-decoder"])
def test_a_run_does_not_depend_on_a_cache_hit_or_on_workers(tmp_path, tiny_encoder_dir, stage_name):
    """The same seeded run gives the same weights whether it builds its feature cache (cold), reads it (warm), or
    loads with DataLoader workers."""
    from safetensors.torch import load_file

    from fae.stages import load_stage_config, train_stage

    cfg_path = tmp_path / "run.yaml"
    if stage_name == "fae":
        body = """model: {feature_dim: 32, grid: [4, 4], latent_channels: 4, encoder_heads: 2, encoder_head_dim: 16,
        decoder_depth: 1, decoder_heads: 2}
loss: {kl_weight: 1.0e-4}"""
        bundle = "fae"
    else:
        body = """decoder: {in_dim: 32, num_tokens: 16, patch_size: 4, width: 32, depth: 1, num_heads: 2}
losses: {gan_weight: 0.0, perceptual_weight: 0.0}"""
        bundle = "pixel_decoder"
    cfg_path.write_text(f"""
stage: {stage_name}
encoder: {{kind: dinov2, name_or_path: {tiny_encoder_dir}}}
{body}
data: {{kind: fashion_mnist, image_size: 16, limit: 32, hflip: true}}
features: cache
feature_cache_dir: {tmp_path / 'cache'}
optim: {{lr: 1.0e-3, warmup_steps: 1}}
train: {{steps: 4, batch_size: 8, checkpoint_every: 4, seed: 5}}
eval: {{limit: 0}}
""")
    runs = {"cold": [], "warm": [], "workers": ["train.num_workers=2"]}
    weights = {}
    for name, extra in runs.items():
        _, cfg = load_stage_config(cfg_path, extra)
        torch.manual_seed(1000 + len(weights))          # whatever the caller's RNG: the config's seed decides
        train_stage(stage_name, cfg, tmp_path / name, progress=False)
        weights[name] = load_file(str(tmp_path / name / bundle / "model.safetensors"))
    for name in ("warm", "workers"):
        assert all(torch.equal(weights["cold"][k], weights[name][k]) for k in weights["cold"]), name


@pytest.mark.parametrize("stage_name", ["fae", "pixel-decoder", "encoder"])
def test_non_finite_losses_in_every_stage_skip_the_update_then_stop(tmp_path, tiny_encoder_dir, stage_name):
    """A NaN loss skips the step (no optimizer or EMA update, logged); K in a row stop the run with the last good
    checkpoint intact."""
    from test_pretrain import TINY

    from fae.config import apply_overrides, read_yaml
    from fae.stages import load_stage_config, stage_module

    if stage_name == "encoder":
        cfg_path = tmp_path / "enc.yaml"
        import yaml

        cfg_path.write_text(yaml.safe_dump(apply_overrides(read_yaml(Path(__file__).resolve().parents[1] / "configs"
                                                                     / "demo" / "encoder_pretrain.yaml"), TINY)))
    elif stage_name == "fae":
        from test_fae_stage import write_config as fae_config

        cfg_path = fae_config(tmp_path / "fae.yaml", tiny_encoder_dir)
    else:
        from test_pixel_decoder import write_config as pd_config

        cfg_path = pd_config(tmp_path / "pd.yaml", tiny_encoder_dir)
    _, cfg = load_stage_config(cfg_path, ["train.steps=8", "train.checkpoint_every=2", "train.max_bad_steps=3",
                                          "eval.limit=0"] if stage_name != "encoder" else
                               ["train.steps=8", "train.checkpoint_every=2", "train.max_bad_steps=3"])
    stage = stage_module(stage_name).build(cfg)
    real_loss = stage.loss

    def poisoned(group, batch, step):
        loss, logs = real_loss(group, batch, step)
        return (loss * float("nan") if step == 2 or step >= 4 else loss), logs

    stage.loss = poisoned
    trainer = Trainer(stage, cfg.train, tmp_path / "run", run_config=cfg, progress=False)
    before: dict[str, torch.Tensor] = {}
    real_step = trainer._optimizer_step

    def watched(group, opt, micro, autocast, logs):
        if trainer.step in (2, 4):
            before.update({f"{trainer.step}/{k}": v.detach().clone() for k, v in trainer.raw[trainer.groups[group][0]]
                           .state_dict().items()})
        stepped = real_step(group, opt, micro, autocast, logs)
        if trainer.step in (2, 4):
            after = trainer.raw[trainer.groups[group][0]].state_dict()
            assert all(torch.equal(before[f"{trainer.step}/{k}"], v) for k, v in after.items()), "weights moved"
        return stepped

    trainer._optimizer_step = watched
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(TrainingError, match="3 steps in a row"):
        trainer.fit()
    from safetensors.torch import load_file

    ckpts = checkpoint_dirs(tmp_path / "run")               # steps 4 and 5 were skipped, 6 stopped the run
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000006"] and manifest_problem(ckpts[-1]) is None
    for f in ckpts[-1].glob("*.safetensors"):               # the last checkpoint: finite, and no update since step 4
        weights, earlier = load_file(str(f)), load_file(str(ckpts[0] / f.name))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), f
        assert all(torch.equal(weights[k], earlier[k]) for k in weights), f"{f.name} moved during skipped steps"


def test_a_bundle_config_with_unexpected_fields_is_refused_with_the_field_named(tmp_path):
    import json

    from fae.config import ConfigError

    model = DiT(DiTConfig(in_channels=4, input_size=(4, 4), patch_size=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3))
    bundle = model.save_pretrained(tmp_path / "dit")
    record = json.loads((bundle / "config.json").read_text())
    record["config"]["hiden_size"] = 64                          # a typo, or a field of some other version
    (bundle / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="hiden_size: unknown key"):
        DiT.from_pretrained(bundle)
    record["config"].pop("hiden_size")
    record["config"]["depth"] = "deep"
    (bundle / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="depth: expected an integer"):
        DiT.from_pretrained(bundle)


def test_a_damaged_latent_shard_is_named_and_repaired_by_encoding_again(tmp_path, tiny_encoder_dir):
    from fae.data import DataConfig
    from fae.data.latents import LatentCache
    from fae.encoders import EncoderConfig
    from fae.encoding import EncodeOptions, encode_latents

    data = DataConfig(kind="fashion_mnist", split="test", image_size=16, limit=12)
    encoder = EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir))
    opts = EncodeOptions(source="raw_features", flip=False, shard_size=4)
    out = encode_latents(data, tmp_path / "cache", encoder=encoder, options=opts, progress=False)
    good = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(good[: len(good) // 3])
    cache = LatentCache(out)
    assert cache.verify() == ["shard-00001.safetensors"]
    with pytest.raises(ValueError, match=r"shard-00001.safetensors is unreadable.*fae encode"):
        cache.row(5, "latents")
    encode_latents(data, tmp_path / "cache", encoder=encoder, options=opts, progress=False)
    assert (out / "shard-00001.safetensors").read_bytes() == good and LatentCache(out).verify() == []
