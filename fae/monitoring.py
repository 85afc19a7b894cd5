"""Watching a long run: TensorBoard events beside metrics.jsonl, throughput and memory figures, preview sheets.

metrics.jsonl stays the source of truth: every scalar TensorBoard receives is a number of a metrics.jsonl row, at
the row's step (the Trainer passes the row it just wrote). The writer lives on rank 0 only and writes under
`<run>/tensorboard`. `train.tensorboard`: `auto` (the default) writes events when the `tensorboard` package is
installed and stays silent otherwise; `on` requires it (a clear error without it); `off` writes nothing.

Resume: the writer opens with `purge_step` = the step resumed from + 1, so TensorBoard drops the events an
interrupted run wrote after its last checkpoint, exactly as the Trainer truncates metrics.jsonl.

Preview sheets (`train.preview_every`) are (3,H,W) tensors in [0,1] from the stage's `preview` hook; they go to
TensorBoard as images and to `<run>/previews/step_XXXXXXXX_<name>.png` (readable without TensorBoard).
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from fae.grid import draw_columns, draw_grid, to_uint8_hwc

TensorBoardMode = Literal["auto", "on", "off"]
TENSORBOARD_MODES: tuple[str, ...] = get_args(TensorBoardMode)
TENSORBOARD_DIR = "tensorboard"
PREVIEW_DIR = "previews"


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class RunMonitor:
    """Rank 0's TensorBoard writer (None inside when events are off) and preview PNG writer of one run folder."""

    def __init__(self, out_dir: str | Path, mode: TensorBoardMode, resumed_step: int = 0) -> None:
        if mode not in TENSORBOARD_MODES:
            raise ValueError(f"train.tensorboard must be one of {list(TENSORBOARD_MODES)}, not {mode!r}")
        self.out_dir = Path(out_dir)
        self.writer: Any = None
        if mode == "off" or (mode == "auto" and not tensorboard_installed()):
            return
        if not tensorboard_installed():
            raise RuntimeError("train.tensorboard=on but the `tensorboard` package is not installed: "
                               "pip install tensorboard==2.21.0, or set train.tensorboard=auto|off")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events after the step we (re)start from were written by an interrupted run (log rows and
        # previews are stamped with the step just finished, >= 1)
        _after_the_newest_event_file(self.out_dir / TENSORBOARD_DIR)
        self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=resumed_step + 1, flush_secs=30)

    def scalars(self, row: dict[str, Any], step: int) -> None:
        """The numbers of a metrics.jsonl row (key `loss/main` becomes TensorBoard tag `loss/main`)."""
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def images(self, sheets: dict[str, torch.Tensor], step: int) -> list[Path]:
        """Write each (3,H,W) sheet in [0,1] as a PNG under previews/ and, with events on, as a TensorBoard image."""
        from PIL import Image

        folder = self.out_dir / PREVIEW_DIR
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, sheet in sheets.items():
            if sheet.ndim != 3 or sheet.shape[0] != 3:
                raise ValueError(f"preview {name!r}: expected a (3,H,W) image, got {tuple(sheet.shape)}")
            pixels = sheet.detach().float().clamp(0, 1).cpu()
            if self.writer is not None:
                self.writer.add_image(f"preview/{name}", pixels, step)
            path = folder / f"step_{step:08d}_{name.replace('/', '_')}.png"
            Image.fromarray(to_uint8_hwc(pixels)).save(path)
            written.append(path)
        return written

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def memory_row(device: torch.device) -> dict[str, float]:
    """The memory figure of a log row: the CUDA allocator's peak since the previous row (MiB), or the process's
    resident set on CPU (MiB)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/cuda_max_allocated_mib": round(peak, 1)}
    return {"memory/rss_mib": round(process_rss_mib(), 1)}


def process_rss_mib() -> float:
    """This process's resident set size in MiB (Linux /proc; elsewhere the peak from `resource`)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------- sheets
def picture_tensor(picture: Any) -> torch.Tensor:
    """A PIL picture (fae.grid) as a (3,H,W) tensor in [0,1]."""
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255


def image_sheet(columns: dict[str, torch.Tensor], min_cell: int = 48) -> torch.Tensor:
    """Image batches (B,3,H,W) in [0,1] side by side, one column each (e.g. input | reconstruction), one row per
    item."""
    return picture_tensor(draw_columns(columns, min_cell=min_cell))


def latent_sheet(latents: torch.Tensor, max_channels: int = 8, row_names: Sequence[str] | None = None,
                 min_cell: int = 48) -> torch.Tensor:
    """Latents (B,C,h,w) as grey images: one row per sample, one column per channel (the first `max_channels`),
    each tile scaled to its own min..max so the structure shows whatever the channel's range."""
    z = latents.detach().float().cpu()[:, :max_channels]
    lo = z.amin(dim=(-2, -1), keepdim=True)
    hi = z.amax(dim=(-2, -1), keepdim=True)
    grey = ((z - lo) / (hi - lo).clamp_min(1e-8)).unsqueeze(2).expand(-1, -1, 3, -1, -1)
    rows = [[to_uint8_hwc(tile) for tile in sample] for sample in grey]
    return picture_tensor(draw_grid(rows, row_names=row_names, column_names=[f"c{c}" for c in range(z.shape[1])],
                                    min_cell=min_cell))


def _after_the_newest_event_file(folder: Path) -> None:
    """Wait, if need be, until a new event file's name sorts after every existing one. TensorBoard reads a folder's
    event files in name order, and a name is `events.out.tfevents.<second opened>.<host>.<pid>.<counter>`: a writer
    opened in the same second by the same process (a resume right after a stop) sorts by its counter as text, so
    counter 10 came before 9 and the resumed run's purge hid its own new steps."""
    seconds = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    wait = max(seconds, default=0) + 1 - time.time()
    if 0 < wait <= 1:
        time.sleep(wait)
