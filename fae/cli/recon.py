"""`fae eval recon`: PSNR, SSIM and rFID of pixel decoders on held-out images, plus a side-by-side grid.

    fae eval recon --gaussian runs/pixel-decoder --finetuned runs/pixel-decoder-ft --out runs/recon

The FAE bundle (for x_hat) defaults to the one the fine-tuned decoder was trained with, the frozen encoder to the
one the bundles record, and the held-out data to the `data` block of the run's config.yaml (split `test`).
The library call behind it is `fae.metrics.reconstruction.evaluate_bundles`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal


def register_recon(eval_subparsers: Any) -> None:
    """Add `recon` to the `fae eval` sub-commands."""
    p = eval_subparsers.add_parser(
        "recon", help="PSNR/SSIM/rFID (rfd_encoder in the encoder's space) of pixel decoders on held-out images, "
        "with a grid PNG",
        description="Score the Gaussian embedding decoder on x and on x_hat, and the fine-tuned decoder on x_hat, "
        "over held-out images; write recon.json and recon_grid.png (original | each decoder).")
    p.add_argument("--gaussian", metavar="RUN", help="Gaussian-decoder run folder or pixel_decoder bundle")
    p.add_argument("--finetuned", metavar="RUN", help="fine-tuned decoder run folder or pixel_decoder bundle")
    p.add_argument("--tokenizer", action="append", metavar="NAME=SPEC",
                   help="instead of pixel decoders: a latent space's decode(encode(x)), named NAME in the table; SPEC is "
                   "what `fae encode --tokenizer` takes (<kind>:<hub id or folder>, or a folder). Repeat to compare. "
                   "Needs --data; rFID with --network inception or encoder:<model folder>")
    p.add_argument("--image-size", type=int, default=256, help="with --tokenizer: the images' size (default 256)")
    p.add_argument("--fae", metavar="RUN", help="stage-1 FAE run folder or bundle, for x_hat (default: the one the "
                   "fine-tuned decoder recorded)")
    p.add_argument("--data", help="'fashion_mnist' or an image folder (default: the run's config.yaml data block)")
    p.add_argument("--split", default="test", help="held-out split (default test)")
    p.add_argument("--limit", type=int, default=1000, help="number of held-out images (default 1000)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--grid-rows", type=int, default=8)
    p.add_argument("--network", default="encoder", help="rFID feature space: encoder (the bundles' frozen encoder, "
                   "offline; default), inception, inception:pytorch, encoder:<model folder>, or none")
    p.add_argument("--inception-weights", help="FID Inception weights file (for --network inception)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/recon", help="output folder for recon.json and recon_grid.png")
    p.set_defaults(func=cmd_recon)


def cmd_recon(args: argparse.Namespace) -> int:
    from fae.data import DataConfig
    from fae.distributed import resolve_device
    from fae.metrics.reconstruction import evaluate_bundles, recon_fd

    data = None
    if args.data:
        kind: Literal["fashion_mnist", "image_folder"] = "fashion_mnist" if args.data == "fashion_mnist" else "image_folder"
        data = DataConfig(kind=kind, root=None if kind == "fashion_mnist" else args.data)
    if args.tokenizer:
        scores = _tokenizers(args, data)
    else:
        scores = evaluate_bundles(args.gaussian, args.finetuned, fae=args.fae, data=data, split=args.split,
                                  limit=args.limit, batch_size=args.batch_size, grid_rows=args.grid_rows,
                                  network=args.network, inception_weights=args.inception_weights,
                                  device=resolve_device(args.device), out_dir=args.out)
    print(f"{args.split}: {scores['images']} images")
    for name, row in scores["decoders"].items():
        fd = recon_fd(row)
        distance = f", {fd[0]} {fd[1]:.3f}" if fd else ""
        print(f"  {name:<18} PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}{distance}")
    print(f"wrote {Path(args.out) / 'recon.json'} and {scores['grid']}")
    return 0


def _tokenizers(args: argparse.Namespace, data: Any) -> dict[str, Any]:
    from dataclasses import replace

    from fae.config import ConfigError
    from fae.distributed import resolve_device
    from fae.evaluation import evaluate_tokenizers
    from fae.metrics.networks import build_network

    if data is None:
        raise ConfigError("--tokenizer needs --data (fashion_mnist or an image folder)")
    if args.gaussian or args.finetuned or args.fae:
        raise ConfigError("--tokenizer scores latent spaces: drop --gaussian/--finetuned/--fae")
    specs = dict(t.split("=", 1) if "=" in t else (t, t) for t in args.tokenizer)
    device = resolve_device(args.device)
    network = None if args.network in ("none", "encoder") else build_network(args.network, args.inception_weights,
                                                                            device=device)
    return evaluate_tokenizers(specs, replace(data, image_size=args.image_size, hflip=False), args.split, args.limit,
                               network, args.batch_size, device, args.out)


__all__ = ["cmd_recon", "register_recon"]
