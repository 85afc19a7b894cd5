"""The `fae` command. It only parses arguments and calls library functions a Python user can call too.

User mistakes (bad config keys, missing files, ...) print one line and a hint, not a traceback;
`fae --debug ...` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fae.cli import data, demo, generate, plan, serve, train
from fae.cli import eval as evaluation
from fae.config import ConfigError

# The command table: each module's `register(subparsers)` adds its commands and sets `func` on their parsers.
COMMANDS = [train.register, generate.register, evaluation.register, data.register, demo.register, serve.register,
            plan.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fae", description="FAE: adapt a frozen visual encoder into a small latent "
                                     "space; train, sample and evaluate generators on it.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for register in COMMANDS:
        register(sub)
    return parser


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may stand anywhere after the options, which argparse's positionals cannot express
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from fae.training import TrainingError, TrainingInterrupted

    try:
        return int(func(args) or 0)
    except TrainingInterrupted as exc:
        print(f"fae: {exc}", file=sys.stderr)
        return 130
    except (*USER_ERRORS, TrainingError) as exc:  # type: ignore[misc]  # mypy cannot read a starred tuple of exception types
        if args.debug:
            raise
        print(f"fae: error: {exc}", file=sys.stderr)
        print("hint: check the path or key named above; `fae <command> --help` lists the options, "
              "`fae --debug ...` shows a traceback", file=sys.stderr)
        return 1

