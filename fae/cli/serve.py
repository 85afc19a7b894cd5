"""`fae serve`: a local web page for a generation pipeline. Parsing only; the work is in fae.serve."""
from __future__ import annotations

import argparse

from fae.precision import PRECISIONS
from fae.speed import COMPILE_MODES


def _cmd_serve(args: argparse.Namespace) -> int:
    from fae.distributed import resolve_device
    from fae.serve import ServeLimits, serve

    limits = ServeLimits(max_images=args.max_images, max_steps=args.max_steps, budget=args.budget,
                         max_queue=args.max_queue, batch_size=args.batch_size)
    serve(args.pipeline, host=args.host, port=args.port, limits=limits, device=str(resolve_device(args.device)),
          precision=args.precision, compile=args.compile, verbose=args.verbose)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from fae.serve.jobs import ServeLimits

    defaults = ServeLimits()
    p = sub.add_parser("serve", help="try a generation pipeline in the browser (a local web page)",
                       description="Serve a local web page for a generation pipeline folder (class-conditional DiT or "
                       "flow, or text MMDiT): pick a class or type a prompt, set guidance, sampler, steps and seed, "
                       "and get the images, each downloadable, with the `fae sample` command that writes exactly the "
                       "same ones. Requests queue and run one at a time (docs/serve.md).")
    p.add_argument("pipeline", help="a generation pipeline folder (e.g. runs/demo/pipeline after `fae demo`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "another, e.g. 0.0.0.0, lets others use it, with a warning: there is no authentication)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--budget", type=int, default=defaults.budget, help="most work one request may ask for: images x "
                   "network evaluations per image (steps, x2 for heun, x2 with guidance; a flow: its latent tokens)")
    p.add_argument("--max-images", type=int, default=defaults.max_images, help="most images per request")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="most sampler steps per request")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue, help="most requests waiting at once")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per chunk (progress is "
                   "reported per chunk; the page's `fae sample` command names it)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto")
    p.add_argument("--compile", choices=list(COMPILE_MODES), default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.set_defaults(func=_cmd_serve)
