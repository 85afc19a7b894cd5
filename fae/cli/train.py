"""`fae train` and `fae summary`: parse, then call fae.stages."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _cmd_train(args: argparse.Namespace) -> int:
    from fae.stages import load_stage_config, train_stage

    overrides = list(args.overrides)
    # pixel-decoder stage II shorthands (same as the config keys finetune_from= and fae=)
    if getattr(args, "finetune_from", None):
        overrides.append(f"finetune_from={json.dumps(args.finetune_from)}")
    if getattr(args, "fae", None):
        overrides.append(f"fae={json.dumps(args.fae)}")
    name, cfg = load_stage_config(args.config, overrides, stage=args.stage)
    out = Path(args.out or f"runs/{name}")
    train_stage(name, cfg, out, fresh=args.fresh, progress=not args.no_progress)
    print(f"done: {out}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from fae.stages import load_stage_config, parameter_table

    name, cfg = load_stage_config(args.config, args.overrides)
    rows = parameter_table(name, cfg)
    if args.json:
        print(json.dumps({"stage": name, "components": rows}, indent=2))
        return 0
    width = max(len(r["component"]) for r in rows)
    print(f"stage: {name}  ({args.config})")
    print(f"{'component':<{width}}  {'parameters':>14}  {'millions':>9}")
    for r in rows:
        print(f"{r['component']:<{width}}  {r['parameters']:>14,}  {r['millions']:>8.2f}M")
    total = sum(int(r["parameters"]) for r in rows)
    print(f"{'total':<{width}}  {total:>14,}  {total / 1e6:>8.2f}M")
    return 0


def register(sub: Any) -> None:
    from fae.stages import stage_names

    names = " | ".join(stage_names())
    p = sub.add_parser("train", help=f"train a stage: {names}",
                       description="Train one stage with the shared trainer. Re-running the same command resumes "
                       "from the newest checkpoint in --out.")
    p.add_argument("stage", help=names)
    p.add_argument("--config", required=True, help="YAML config (see configs/paper and configs/demo)")
    p.add_argument("--out", help="run folder (default runs/<stage>)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--finetune-from", metavar="RUN", help="pixel-decoder stage II: start from this Gaussian-decoder "
                   "run folder (or pixel_decoder bundle)")
    p.add_argument("--fae", metavar="RUN", help="pixel-decoder stage II: the stage-1 FAE run folder (or bundle) whose "
                   "reconstructed features x_hat the decoder is fine-tuned on")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.steps=100")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("summary", help="per-component parameter counts of a config",
                       description="Build every component of a stage config on the meta device (no memory, no "
                       "download) and print its parameter count.")
    p.add_argument("config", help="YAML config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_summary)

