"""`fae data preview` and `fae data prepare`: parse, then call fae.data.preview / fae.data.prepare."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _cmd_preview(args: argparse.Namespace) -> int:
    from fae.data import load_data_config
    from fae.data.preview import format_summary, preview_data

    cfg = load_data_config(args.config, args.overrides)
    out = Path(args.out or f"{Path(args.config).stem}-preview.png")
    report = preview_data(cfg, out, split=args.split, limit=args.limit, grid=args.grid, workers=args.workers,
                          progress=not args.no_progress)
    print(format_summary(report))
    print(f"grid: {report['grid'] or '(no readable image)'}  report: {out.with_suffix('.json')}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from fae.data import load_data_config
    from fae.data.prepare import prepare_data

    cfg = load_data_config(args.config, args.overrides)
    record = prepare_data(cfg, args.out, splits=args.split, workers=args.workers, progress=not args.no_progress)
    for split in args.split or [cfg.split]:
        s = record["splits"][split]
        print(f"{split}: {s['written']} written, {s['already_there']} already there, {s['dropped']['count']} dropped "
              f"of {s['images']}")
    print(f"done: {args.out} (train on it with data.root={json.dumps(str(args.out))}; record "
          f"{Path(args.out) / 'fae_prepared.json'})")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="look at a data set as the model sees it, or prepare a copy at training size",
                       description="Image data tools: `preview` shows and counts what loading meets; `prepare` "
                       "writes a copy of an image folder at the training size.")
    commands = p.add_subparsers(dest="data_command", metavar="<preview|prepare>", required=True)

    q = commands.add_parser("preview", help="a grid of images as the model sees them, with counts (JSON)",
                            description="Scan a split of a config's `data:` block; write a grid PNG of the first "
                            "K*K images after background and resize, a JSON report beside it (dropped files, "
                            "converted modes, alpha, content hidden by the background, resize, huge images) and "
                            "print a summary.")
    q.add_argument("config", help="stage YAML with a `data:` block (or a file that is only that block)")
    q.add_argument("--split", help="split to scan (default: data.split)")
    q.add_argument("--out", help="grid PNG; the report is the same name with .json (default "
                   "<config stem>-preview.png in the current folder)")
    q.add_argument("--limit", type=int, help="scan only the first N items")
    q.add_argument("--grid", type=int, default=8, help="K: the grid shows K*K images (default 8)")
    q.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this one)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("overrides", nargs="*", help="overrides data.key=value (or key=value), e.g. data.resize=pad")
    q.set_defaults(func=_cmd_preview)

    r = commands.add_parser("prepare", help="write a copy of an image folder at the training size",
                            description="Write every readable image after background and resize as PNG under "
                            "OUT/<split>/<class>/, with OUT/fae_prepared.json. Resumable: the same command again "
                            "skips the files already written.")
    r.add_argument("config", help="stage YAML with a `data:` block (kind image_folder)")
    r.add_argument("--out", required=True, help="folder for the copy (new, empty, or an earlier copy to resume)")
    r.add_argument("--split", nargs="+", help="splits to prepare, e.g. --split train test (default: data.split)")
    r.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this one)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("overrides", nargs="*", help="overrides data.key=value (or key=value)")
    r.set_defaults(func=_cmd_prepare)
