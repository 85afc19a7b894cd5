"""Make the pretrained files that ship inside the package (fae.assets), each with a manifest of how it was made and
the SHA-256 of every file (checked on every use and by the tests):

    .venv/bin/python scripts/ship_demo_assets.py                   # both, about 3 minutes on 2 CPU cores
    .venv/bin/python scripts/ship_demo_assets.py --only demo-judge

- demo-encoder: the demo's frozen encoder, configs/demo/encoder_pretrain.yaml (seed 0, fp32): 200 steps of
  DINO + iBOT on the Fashion-MNIST training images, no labels. The teacher is exported with its loss curves.
- demo-judge: the class-agreement judge, `fae.metrics.judge.train_classifier` with JUDGE below on the real training
  images (the only place labels are used besides the probes).

The shipped files were made under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (fp32). Another CPU kind trains
equivalent weights that differ in the last bits (summation order), so their hashes differ.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from fae.assets import ROOT, write_asset_manifest
from fae.io import replace_dir

REPO = Path(__file__).resolve().parents[1]
ENCODER_CONFIG = REPO / "configs" / "demo" / "encoder_pretrain.yaml"
# the judge's training settings (fae.metrics.judge.train_classifier); fae demo reads them back from the manifest
JUDGE = {"epochs": 2, "train_limit": 30000, "lr": 3e-3, "seed": 0, "width": 32}


def machine() -> dict[str, str | None]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def make_encoder(work: Path, staged: Path) -> dict:
    from fae.stages import load_stage_config, train_stage

    name, cfg = load_stage_config(ENCODER_CONFIG, stage="encoder")
    run = train_stage(name, cfg, work / "run", progress=True)
    shutil.copytree(run / "encoder", staged)
    shutil.copy(run / "metrics.jsonl", staged / "metrics.jsonl")  # the loss curves travel with the weights
    return {"description": "the fae demo's frozen encoder: a tiny DINOv2 pretrained with DINO + iBOT, no labels",
            "command": "python scripts/ship_demo_assets.py --only demo-encoder "
                       f"(config {ENCODER_CONFIG.relative_to(REPO)})",
            "steps": cfg.train.steps, "seed": cfg.train.seed}


def make_judge(work: Path, staged: Path) -> dict:
    from fae.config import from_dict, read_yaml
    from fae.data import DataConfig
    from fae.metrics.judge import train_classifier

    data = from_dict(DataConfig, read_yaml(REPO / "configs" / "demo" / "fae.yaml")["data"])
    train_classifier(data, staged, progress=True, **JUDGE)
    return {"description": "the fae demo's class-agreement judge: a small CNN trained on real Fashion-MNIST images",
            "command": "python scripts/ship_demo_assets.py --only demo-judge", **JUDGE}


MAKERS = {"demo-encoder": make_encoder, "demo-judge": make_judge}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(MAKERS), action="append", help="make only this asset (repeatable)")
    args = parser.parse_args()
    for name in args.only or list(MAKERS):
        with tempfile.TemporaryDirectory(dir=ROOT) as work:  # same file system: the final move is a rename
            begin = time.time()
            staged = Path(work) / name
            record = MAKERS[name](Path(work), staged)
            record.update({"made_with": machine(), "seconds": round(time.time() - begin, 1)})
            files = write_asset_manifest(staged, record)["files"]
            replace_dir(staged, ROOT / name)
        print(f"wrote {ROOT / name}: {', '.join(f'{f} {h[:12]}' for f, h in files.items())} "
              f"({record['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
