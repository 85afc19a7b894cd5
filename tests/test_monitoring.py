"""Watching a long run (fae/monitoring.py, Trainer logging): TensorBoard events that mirror metrics.jsonl, preview
sheets at the right steps, `off` writes nothing, a resume does not duplicate steps, throughput and memory in rows."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import Dataset

import fae.monitoring
from fae.io import checkpoint_dirs
from fae.monitoring import RunMonitor, latent_sheet
from fae.training import OptimConfig, TrainConfig, Trainer, TrainStage


class Data(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 6, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return {"x": self.x[index]}


class Stage(TrainStage):
    """A toy regression whose preview draws random numbers (the trainer must keep them out of training)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.modules = {"model": nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 6))}
        self.optim = OptimConfig(lr=1e-2, schedule="cosine")
        self.previews: list[tuple[int, bool]] = []

    def train_dataset(self) -> Dataset:
        return Data()

    def loss(self, group, batch, step):
        pred = self.modules["model"](batch["x"])
        return (pred - batch["x"]).pow(2).mean(), {"mse_x2": 2 * (pred - batch["x"]).pow(2).mean().item()}

    def preview(self, modules, step):
        self.previews.append((step, modules["model"].training))
        return {"noise": torch.rand(3, 8, 12)}

    def export(self, out_dir: Path, modules) -> None:
        pass


def _train(out: Path, stop_at: int | None = None, **kw) -> Stage:
    cfg = dict(steps=6, batch_size=4, checkpoint_every=2, log_every=1, ema_decay=0.9, seed=3, precision="fp32")
    stage = Stage()
    Trainer(stage, TrainConfig(**{**cfg, **kw}), out, progress=False).fit(stop_at=stop_at)
    return stage


def _events(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars_match_metrics(out: Path) -> None:
    acc, rows = _events(out), _rows(out)
    tags = acc.Tags()["scalars"]
    expected = {k for row in rows for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    assert set(tags) == expected
    for tag in tags:
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(row["step"], row[tag]) for row in rows if tag in row]
        assert [s for s, _ in got] == [s for s, _ in want], tag         # each logged step once, in order
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, rel=1e-6), tag                  # float32 events of the float64 row


def test_events_mirror_metrics_and_previews_land_at_their_steps(tmp_path):
    stage = _train(tmp_path / "run", preview_every=4)
    _scalars_match_metrics(tmp_path / "run")
    rows = _rows(tmp_path / "run")
    memory = "memory/cuda_max_allocated_mib" if torch.cuda.is_available() else "memory/rss_mib"
    assert len(rows) == 6 and {"loss/main", "lr/main", "grad_norm/main", "mse_x2", "images_per_s", memory} <= set(rows[0])
    assert rows[0]["images_per_s"] > 0 and rows[0][memory] > (0 if torch.cuda.is_available() else 10)
    images = _events(tmp_path / "run").Images("preview/noise")
    assert [e.step for e in images] == [4] and (e := images[0]).width == 12 and e.height == 8
    assert sorted(p.name for p in (tmp_path / "run" / "previews").iterdir()) == ["step_00000004_noise.png"]
    assert stage.previews == [(4, False)]                               # drawn in eval mode (EMA weights)


def test_previews_leave_the_training_unchanged(tmp_path):
    with_previews = _train(tmp_path / "a", preview_every=1)
    without = _train(tmp_path / "b", tensorboard="off")
    for k, v in without.modules["model"].state_dict().items():
        assert torch.equal(with_previews.modules["model"].state_dict()[k], v), k
    assert len(with_previews.previews) == 6


def test_off_writes_nothing_and_on_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    _train(tmp_path / "off", tensorboard="off")
    assert not (tmp_path / "off" / "tensorboard").exists() and not (tmp_path / "off" / "previews").exists()
    monkeypatch.setattr(fae.monitoring, "tensorboard_installed", lambda: False)
    _train(tmp_path / "auto", steps=1)                                  # auto: silently without events
    assert not (tmp_path / "auto" / "tensorboard").exists()
    with pytest.raises(RuntimeError, match="tensorboard=on but the `tensorboard` package is not installed"):
        _train(tmp_path / "on", steps=1, tensorboard="on")
    with pytest.raises(ValueError, match="train.tensorboard"):
        TrainConfig(tensorboard="yes").validate()                       # type: ignore[arg-type]


def test_a_resume_does_not_duplicate_steps(tmp_path):
    out = tmp_path / "run"
    _train(out, stop_at=3, preview_every=3)        # checkpoints at 2 and 3, events and a preview up to step 3
    shutil.rmtree(checkpoint_dirs(out)[-1])        # as if killed after step 3 was logged, before its checkpoint
    _train(out, preview_every=3)                   # resumes from step 2: step 3 is trained and logged again
    _scalars_match_metrics(out)
    assert [row["step"] for row in _rows(out)] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in _events(out).Images("preview/noise")] == [3, 6]


def test_a_writer_opened_in_the_same_second_sorts_after_the_earlier_files(tmp_path):
    """TensorBoard reads event files in name order; a resume in the same second and process must not sort first
    (the name's last field is a counter compared as text: 10 < 9)."""
    folder = tmp_path / fae.monitoring.TENSORBOARD_DIR
    folder.mkdir()
    # this process's name fields and a counter that sorts after any counter as text
    earlier = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.999999999"
    earlier.write_bytes(b"")
    monitor = RunMonitor(tmp_path, "on", resumed_step=2)
    monitor.writer.flush()
    names = sorted(p.name for p in folder.glob("events.out.tfevents.*"))
    assert names[0] == earlier.name and len(names) == 2
    monitor.writer.close()


def test_latent_sheet_layout():
    z = torch.zeros(2, 3, 4, 4)
    z[1, 2, 0, 0] = 5.0                                                 # one bright pixel in sample 1, channel 2
    sheet = latent_sheet(z, min_cell=4)
    assert sheet.shape[0] == 3 and sheet.min() >= 0 and sheet.max() <= 1
    assert latent_sheet(torch.randn(2, 12, 4, 4), min_cell=4).shape[2] > sheet.shape[2]  # capped at 8 columns


def test_generator_stages_preview_latent_samples(tiny_latent_world, tmp_path):
    from PIL import Image

    from fae.stages import load_stage_config, train_stage

    cache = tiny_latent_world["cache"]
    models = {"dit": "{input_size: [4, 4], in_channels: 4, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10}",
              "flow": "{input_size: [4, 4], in_channels: 4, hidden_size: 32, layers_per_block: [1, 1], head_dim: 16, "
                      "num_classes: 10}"}
    for stage, model in models.items():
        path = tmp_path / f"{stage}.yaml"
        path.write_text(f"stage: {stage}\nlatents: {cache}\nmodel: {model}\n"
                        "train: {steps: 2, batch_size: 4, checkpoint_every: 2, log_every: 1, preview_every: 2}\n")
        _, cfg = load_stage_config(path)
        train_stage(stage, cfg, tmp_path / stage, progress=False)
        png = tmp_path / stage / "previews" / "step_00000002_samples.png"
        with Image.open(png) as image:                                  # 8 rows (samples) x 4 columns (channels)
            assert image.size[1] == 16 + 8 * (48 + 2) + 2 and image.size[0] > 4 * (48 + 2)
        assert [e.step for e in _events(tmp_path / stage).Images("preview/samples")] == [2]


def test_pixel_decoder_stage_previews_reconstructions(tmp_path, tiny_encoder_dir):
    from fae.stages import load_stage_config
    from fae.stages.pixel_decoder import PixelDecoderStage
    from tests.test_pixel_decoder import write_config

    _, cfg = load_stage_config(write_config(tmp_path / "pd.yaml", tiny_encoder_dir))
    stage = PixelDecoderStage(cfg)
    sheets = stage.preview({"decoder": stage.modules["decoder"].eval()}, step=0)
    sheet = sheets["reconstruction"]                                    # input | decoded, 8 rows of 48-px tiles
    assert sheet.shape[1] == 16 + 8 * (48 + 2) + 2 and sheet.shape[0] == 3
    first_input = sheet[:, 16 + 2:16 + 2 + 48, 2:2 + 48]              # the first input tile, upscaled x3
    image = stage.train_dataset()[0]["image"]
    assert torch.allclose(first_input[:, ::3, ::3], (image * 255).round() / 255, atol=1 / 255)
