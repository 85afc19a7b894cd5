"""Build the "own data" example folder from Debian's openclipart-png (public domain; `apt-get install openclipart-png`).

    python benchmarks/clipart_folder.py data/clipart            # -> data/clipart/{train,test}/<class>/*.png

The 15 largest categories of /usr/share/openclipart/png (folders and their sub-folders; links followed), files in
sorted order; per category the first five sixths, at most 100, go to train and the next ones, at most 20, to test:
1,437 training and 285 test images of colour clip-art, many with transparency, many not square, a few 10k x 16k px.
Files are symlinked, not copied. docs/own-data.md runs its walkthrough on this folder; the closing notes of issue 30
quote stage 1's time on it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

SOURCE = Path("/usr/share/openclipart/png")
CLASSES, TRAIN, TEST = 15, 100, 20


def category_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if p.is_file())


def build(out: Path, source: Path = SOURCE) -> dict[str, tuple[int, int]]:
    """Symlink the example's train and test images under `out`; returns {class: (train, test)}."""
    if not source.is_dir():
        raise SystemExit(f"{source} is missing: install the Debian package openclipart-png")
    files = {d.name: category_files(d) for d in sorted(source.iterdir()) if d.is_dir()}
    largest = sorted(files, key=lambda c: (-len(files[c]), c))[:CLASSES]
    counts = {}
    for name in sorted(largest):
        n_train = min(TRAIN, len(files[name]) * 5 // 6)
        split = {"train": files[name][:n_train], "test": files[name][n_train:n_train + TEST]}
        for part, chosen in split.items():
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(chosen):
                link = folder / f"{i:03d}-{path.name}"
                if not link.is_symlink():
                    link.symlink_to(path.resolve())
        counts[name] = (len(split["train"]), len(split["test"]))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder to create")
    counts = build(parser.parse_args().out)
    for name, (train, test) in counts.items():
        print(f"{name:20s} train {train:4d}  test {test:3d}")
    print(f"{'total':20s} train {sum(t for t, _ in counts.values()):4d}  test {sum(t for _, t in counts.values()):3d}")


if __name__ == "__main__":
    main()
