"""Small pretrained files that ship inside the package, as a real user downloads pretrained weights.

Each asset is a folder `fae/assets/<name>/` with a `manifest.json`: how it was made (a command and its seed), on
what machine, and the SHA-256 of every file. `asset(name)` checks the hashes before handing out the folder, so a
corrupt or partial install is refused by name instead of training on garbage. `scripts/ship_demo_assets.py` makes
them.

- `demo-encoder`: the demo's frozen encoder, a tiny DINOv2 pretrained without labels (configs/demo/encoder_pretrain.yaml).
- `demo-judge`: the demo's class-agreement judge, a small CNN trained on the real Fashion-MNIST training images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fae.io import file_sha256

ROOT = Path(__file__).resolve().parent
MANIFEST = "manifest.json"


def manifest(name: str) -> dict[str, Any]:
    path = ROOT / name / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"the asset {name!r} ({path.parent}) is missing from this installation of fae; "
                                "reinstall fae (or run scripts/ship_demo_assets.py in a checkout)")
    return json.loads(path.read_text())


def asset(name: str) -> Path:
    """The folder of a shipped asset, after checking every file against the SHA-256 its manifest records."""
    folder = ROOT / name
    for file, expected in manifest(name)["files"].items():
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall fae (or run scripts/ship_demo_assets.py)")
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(f"{path} is corrupt: SHA-256 {actual[:16]}... where the manifest records "
                             f"{expected[:16]}...; reinstall fae (or run scripts/ship_demo_assets.py)")
    return folder


def write_asset_manifest(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of `folder` (except the manifest) into its manifest, with `record` (how it was made)."""
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    full = {**record, "files": files}
    (folder / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return full
