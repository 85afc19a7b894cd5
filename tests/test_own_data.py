"""docs/own-data.md, run literally: every command of its walkthrough block, in order, on a tiny generated folder of
colour PNGs (transparency, odd sizes, one huge image, one unreadable file), with fewer steps. Then what the page
promises: the preview's background and counts, the pad mode's aspect, stage 1 opening no image once its features
are cached, the pipeline folder sampling from another directory with its original files gone, and the Fréchet
distance of the test split to its own statistics being zero."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fae.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-data.md"
WHITE = (255, 255, 255)

# fewer steps and smaller batches, appended to each command of the page (a later key=value or option wins)
TINY = {
    "train fae": "train.steps=4 train.batch_size=4 train.checkpoint_every=4 train.log_every=2 eval.limit=6 --no-progress",
    "train pixel-decoder": "train.steps=4 train.batch_size=4 train.checkpoint_every=4 train.log_every=2 eval.limit=6 "
                           "--no-progress",
    "train dit": "train.steps=4 train.batch_size=8 train.checkpoint_every=4 train.log_every=2 --no-progress",
    "train judge": "--epochs 1 --no-progress",
    "encode": "--batch-size 8 --no-progress",
    "sample": "-n 6 --steps 2 --no-progress",
    "eval generator": "-n 6 --steps 2 --no-progress",
    "eval stats": "--no-progress",
    "eval fid": "--no-progress",
    "data preview": "--no-progress data.huge_pixels=5000",
    "data prepare": "--no-progress data.huge_pixels=5000",
}


def walkthrough() -> tuple[dict[str, str], list[str]]:
    """The page's variables and its `fae` commands, in order."""
    block = DOC.read_text().split("<!-- own-data:begin -->")[1].split("<!-- own-data:end -->")[0]
    variables, commands = {}, []
    for line in block.splitlines():
        line = line.strip()
        if match := re.fullmatch(r"([A-Z]+)=(\S+)", line):
            variables[match[1]] = match[2]
        elif line.startswith("fae "):
            commands.append(line)
    return variables, commands


def _shape(seed: int, size: tuple[int, int], alpha: bool) -> Image.Image:
    """A coloured disc of a random hue on transparency (or on a random flat colour without alpha)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    inside = (xx - w / 2) ** 2 / (w / 2.2) ** 2 + (yy - h / 2) ** 2 / (h / 2.2) ** 2 < 1
    colour = rng.integers(0, 200, 3)
    rgb = np.where(inside[..., None], colour, rng.integers(0, 256, 3)).astype(np.uint8)
    if not alpha:
        return Image.fromarray(rgb)
    return Image.fromarray(np.dstack([rgb, (inside * 255).astype(np.uint8)]), "RGBA")


def make_folder(root: Path) -> None:
    """Two classes; train 8 + test 4 each; RGBA and RGB, odd sizes; a 40x10 stripe, a huge file, white art on
    transparency, a fully transparent file, a broken file."""
    sizes = [(40, 40), (50, 20), (17, 41), (64, 48), (33, 33), (20, 60), (45, 30), (36, 36)]
    for c, name in enumerate(("circles", "ovals")):
        for split, count in (("train", 8), ("test", 4)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = sizes[(i + c) % len(sizes)]
                _shape(100 * c + 10 * (split == "test") + i, size, alpha=i % 2 == 0).save(
                    root / split / name / f"{i:02d}.png")
    stripe = np.zeros((10, 40, 4), np.uint8)
    stripe[..., 0], stripe[..., 3] = 255, 255                      # opaque red, 4:1
    Image.fromarray(stripe, "RGBA").save(root / "train" / "circles" / "stripe.png")
    _shape(7, (100, 80), alpha=True).save(root / "train" / "ovals" / "huge.png")   # "huge" under data.huge_pixels=5000
    ghost = np.zeros((30, 30, 4), np.uint8)
    ghost[10:20, 5:25] = 255                                       # white art on transparency: hidden on white
    Image.fromarray(ghost, "RGBA").save(root / "train" / "ovals" / "ghost.png")
    Image.new("RGBA", (24, 24), (0, 0, 0, 0)).save(root / "train" / "ovals" / "empty.png")   # nothing to see
    (root / "train" / "ovals" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def run(command: str, variables: dict[str, str], *extra: str) -> int:
    """Run one command of the page in this process with the tiny settings (and `extra`) after its own; its exit code."""
    argv = shlex.split(re.sub(r"\$([A-Z]+)", lambda m: variables[m[1]], command))[1:]
    name = " ".join(argv[:2]) if argv[0] in ("train", "data", "eval") else argv[0]
    return main([*argv, *shlex.split(TINY.get(name, "")), *extra])


def test_the_walkthrough_of_docs_own_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from fae.assets import asset

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    variables, commands = walkthrough()
    assert {"DATA", "ENC", "RUN"} <= set(variables) and len(commands) >= 12
    make_folder(work / variables["DATA"])
    shutil.copytree(asset("demo-encoder"), work / variables["ENC"])    # what `fae demo` leaves in runs/demo/encoder
    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "cache"))
    printed = []
    for command in commands:
        assert run(command, variables) == 0, command
        printed.append(capsys.readouterr().out)
    run_dir = work / variables["RUN"]

    # 1. the preview: transparent pixels on white, and the counts
    counts = json.loads((run_dir / "preview.json").read_text())
    assert (counts["images"], counts["readable"], counts["with_alpha"]) == (21, 20, 12)
    assert counts["fully_transparent"]["count"] == 1 and "empty.png" in counts["fully_transparent"]["files"][0]
    assert counts["dropped"]["count"] == 1 and "broken.png" in counts["dropped"]["files"][0]
    assert counts["huge"]["count"] == 1 and counts["huge"]["slowest"][0]["file"].endswith("huge.png")
    assert counts["hidden_by_background"]["count"] == 1 and "ghost.png" in counts["hidden_by_background"]["files"][0]
    assert counts["resized"]["padded"] == counts["non_square"] == 12
    grid = np.asarray(Image.open(run_dir / "preview.png").convert("RGB"))
    assert (grid == WHITE).all(-1).mean() > 0.2    # the discs' transparent surroundings are white, not black

    # 2. the pad mode keeps the 4:1 stripe's aspect: a red band of 8 rows across, white above and below
    stripe = np.asarray(Image.open(run_dir / "prepared" / "train" / "circles" / "stripe.png").convert("RGB"))
    red_rows = ((stripe[..., 0] > 200) & (stripe[..., 1] < 60)).all(1)
    assert stripe.shape == (32, 32, 3) and 7 <= red_rows.sum() <= 9 and red_rows[15] and red_rows[16]
    assert (stripe[:10] == WHITE).all() and (stripe[-10:] == WHITE).all()

    # 3. stage 1 again on the cached features: it trains without opening one image
    opened: list[str] = []
    original = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or original(fp, *a, **k))
    fae_command = next(c for c in commands if c.startswith("fae train fae "))
    assert run(fae_command.replace("$RUN/fae ", "$RUN/fae-again "), variables, "eval.limit=0") == 0
    assert opened == [] and (run_dir / "fae-again" / "fae").is_dir()
    monkeypatch.setattr(Image, "open", original)

    # ... and a per-step random crop cannot come from a cache of one view per image
    assert run(fae_command.replace("$RUN/fae ", "$RUN/fae-rrc "), variables, f"data.root={variables['DATA']}",
               "data.resize=random_resized_crop", "eval.limit=0") == 1
    assert "data.resize=random_resized_crop draws a new crop" in capsys.readouterr().err

    # 6. the statistics were taken at the training crop and size: the prepared test images are at distance 0
    assert main(["eval", "fid", "--samples", str(run_dir / "prepared" / "test"), "--ref", str(run_dir / "test-stats.npz"),
                 "--network", f"encoder:{variables['ENC']}", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 8 and abs(report["metrics"]["fd_encoder"]) < 1e-6

    # the page's Python example, in the walkthrough's folder
    code = DOC.read_text().split("## From Python")[1].split("```python")[1].split("```")[0]
    exec(compile(code, f"{DOC.name}: From Python", "exec"), {"__name__": "example"})
    assert Image.open("first.png").size == (32, 32)

    # 5. the pipeline folder, copied elsewhere with the runs and the encoder gone, samples the same images
    in_place = np.load(run_dir / "samples" / "samples.npz")["arr_0"]
    moved = tmp_path / "elsewhere" / "pipeline"
    shutil.copytree(run_dir / "pipeline", moved)
    shutil.rmtree(work)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    sample = next(c for c in commands if c.startswith("fae sample "))
    assert run(sample.replace("$RUN/pipeline", str(moved)).replace("$RUN/samples", "again"), variables) == 0
    np.testing.assert_array_equal(np.load(Path("again") / "samples.npz")["arr_0"], in_place)

    # 6. the distance is named after its network, and is finite
    fid_output = next(out for c, out in zip(commands, printed, strict=True) if c.startswith("fae eval fid "))
    assert "fd_encoder" in fid_output and "fid" not in fid_output.replace("fd_", "").lower().split()
