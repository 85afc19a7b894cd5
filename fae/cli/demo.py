"""`fae demo`: parse, then call fae.demo.run_demo."""
from __future__ import annotations

import argparse

from fae.demo import run_demo


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, fresh=args.fresh, progress=not args.no_progress, precision=args.precision,
             from_scratch=args.from_scratch, text=args.text, flow=args.flow, compare=args.compare)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from fae.precision import PRECISIONS

    p = sub.add_parser("demo", help="run FAE end to end on Fashion-MNIST on CPU and write an HTML report",
                       description="Run the embedded default: FAE on Fashion-MNIST, on CPU, offline. Finished steps "
                       "are skipped on a re-run; --fresh starts over.")
    p.add_argument("--out", default=None, help="output folder (default runs/demo, runs/demo-quick with --quick, "
                   "runs/demo-text with --text)")
    p.add_argument("--text", action="store_true", help="the text-to-image demo instead: MMDiT on emoji + "
                   "Fashion-MNIST captions with the shipped MiniLM text encoder (about five minutes)")
    p.add_argument("--quick", action="store_true", help="a much smaller run for smoke tests (under two minutes)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto (default): bf16 where this CPU runs it natively, else fp32")
    p.add_argument("--from-scratch", action="store_true",
                   help="pretrain the frozen encoder and train the judge classifier now (a few minutes more) instead "
                   "of using the copies fae ships")
    p.add_argument("--flow", action="store_true",
                   help="the normalizing-flow comparison instead of the DiT steps: STARFlow on FAE latents vs raw "
                   "features (its own budget of about five minutes; reuses finished steps of --out)")
    p.add_argument("--compare", action="store_true",
                   help="after the main steps, the paper's baselines in miniature: a KL autoencoder with SD-VAE's "
                   "architecture beside FAE and the raw features, the same DiT on each (about ten minutes more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
