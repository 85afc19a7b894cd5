"""`fae train` and `fae summary`: parse, then call fae.stages (or, for `fae train judge`, fae.metrics.judge)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

JUDGE = "judge"   # not a stage: the class-agreement classifier (fae.metrics.judge), trained by the same command
JUDGE_OPTIONS = ("data", "image_size", "epochs", "channels", "device")


def _cmd_train(args: argparse.Namespace) -> int:
    from fae.config import ConfigError
    from fae.stages import load_stage_config, train_stage

    if args.stage == JUDGE:
        return _cmd_judge(args)
    given = [f"--{o.replace('_', '-')}" for o in JUDGE_OPTIONS if getattr(args, o) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only for `fae train judge`; a stage reads its settings from --config")
    if args.config is None:
        raise ConfigError(f"fae train {args.stage} needs --config YAML (see configs/paper and configs/demo)")
    overrides = list(args.overrides)
    # pixel-decoder stage II shorthands (same as the config keys finetune_from= and fae=)
    if getattr(args, "finetune_from", None):
        overrides.append(f"finetune_from={json.dumps(args.finetune_from)}")
    if getattr(args, "fae", None):
        overrides.append(f"fae={json.dumps(args.fae)}")
    if getattr(args, "init_from", None):
        _check_init_from(args.stage)
        overrides.append(f"init_from={json.dumps(args.init_from)}")
    name, cfg = load_stage_config(args.config, overrides, stage=args.stage)
    out = Path(args.out or f"runs/{name}")
    train_stage(name, cfg, out, fresh=args.fresh, progress=not args.no_progress)
    print(f"done: {out}")
    return 0


def _check_init_from(stage: str) -> None:
    """--init-from needs a stage whose config has `init_from` (every built-in stage but the encoder pretraining)."""
    import dataclasses

    from fae.config import ConfigError
    from fae.stages import stage_module

    if "init_from" not in {f.name for f in dataclasses.fields(stage_module(stage).Config)}:
        why = (": the encoder pretraining makes the frozen encoder every latent space is built on, so it always "
               "starts from its own init (docs/training.md)") if stage == "encoder" else " (its config has no init_from)"
        raise ConfigError(f"fae train {stage} has no --init-from{why}")


def _cmd_judge(args: argparse.Namespace) -> int:
    """Train (or reuse, when the same settings made it) the class-agreement judge on a labelled data set."""
    import shutil

    from fae.config import ConfigError
    from fae.distributed import resolve_device
    from fae.io import read_bundle_config
    from fae.metrics.datasets import data_config
    from fae.metrics.judge import train_classifier

    if (args.config is None) == (args.data is None):
        raise ConfigError("fae train judge needs --config CONFIG (a stage YAML's `data:` block) or --data "
                          "CONFIG|FOLDER (with --image-size N for a folder), one of them")
    if args.finetune_from or args.fae or args.init_from:
        raise ConfigError("fae train judge takes --config/--data, --image-size, --epochs, --channels, --out and "
                          "data.key=value overrides; no --fae, --finetune-from or --init-from")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be a positive integer, got {args.epochs}")
    data = data_config(args.config or args.data, args.image_size, overrides=args.overrides)
    out = Path(args.out or f"runs/{JUDGE}")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    model = train_classifier(data, out, epochs=args.epochs or 3, channels=args.channels,
                             device=str(resolve_device(args.device or "auto")), progress=not args.no_progress)
    record = read_bundle_config(out)
    channels = "colour" if model.config.in_channels == 3 else "grey"
    print(f"judge: {out} ({channels}, {model.config.num_classes} classes, {data.image_size} px)")
    print(f"test accuracy: {record['test_accuracy']:.4f} on {record.get('test_images', '?')} images "
          f"({record.get('test_split', 'test')})")
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
    p = sub.add_parser("train", help=f"train a stage: {names}; or the class-agreement judge",
                       description="Train one stage with the shared trainer. Re-running the same command resumes "
                       "from the newest checkpoint in --out.\n\n`fae train judge --config CONFIG | --data FOLDER "
                       "--image-size N --out DIR` trains the class-agreement judge (a small CNN, "
                       "fae.metrics.judge) on a labelled data set's train split, prints its test accuracy and "
                       "writes a bundle for `fae eval generator --judge DIR` and a generator stage's eval.judge.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", help=f"{names} | {JUDGE}")
    p.add_argument("--config", help="YAML config (see configs/paper and configs/demo); for judge, its `data:` block")
    p.add_argument("--out", help="run folder (default runs/<stage>)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--init-from", metavar="RUN", help="start a new run from the weights of this run folder or bundle "
                   "of the same stage (the config key init_from): a fresh optimizer, LR schedule and step 0; a "
                   "different class count or text width re-initialises only those tables (docs/training.md)")
    p.add_argument("--finetune-from", metavar="RUN", help="pixel-decoder stage II: start from this Gaussian-decoder "
                   "run folder (or pixel_decoder bundle)")
    p.add_argument("--fae", metavar="RUN", help="pixel-decoder stage II: the stage-1 FAE run folder (or bundle) whose "
                   "reconstructed features x_hat the decoder is fine-tuned on")
    judge = p.add_argument_group("judge only (fae train judge)")
    judge.add_argument("--data", metavar="CONFIG|FOLDER", help="a stage YAML, fashion_mnist, or a labelled image "
                       "folder (root/{train,test}/<class>/*; without test/, every 10th training image is held out)")
    judge.add_argument("--image-size", type=int, metavar="N", help="the training size (required for a folder; "
                       "default: the config's data.image_size)")
    judge.add_argument("--epochs", type=int, help="epochs (default 3)")
    judge.add_argument("--channels", choices=["grey", "colour"], help="default: grey for fashion_mnist, colour for "
                       "image folders")
    judge.add_argument("--device", help="auto (default), cpu, cuda, ...")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.steps=100")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("summary", help="per-component parameter counts of a config",
                       description="Build every component of a stage config on the meta device (no memory, no "
                       "download) and print its parameter count.")
    p.add_argument("config", help="YAML config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.set_defaults(func=_cmd_summary)

