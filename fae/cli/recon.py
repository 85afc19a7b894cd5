"""`fae eval recon`: PSNR, SSIM and rFID of pixel decoders on held-out images, plus a side-by-side grid.

    fae eval recon --gaussian runs/pixel-decoder --finetuned runs/pixel-decoder-ft --out runs/recon

The FAE bundle (for x_hat) defaults to the one the fine-tuned decoder was trained with, the frozen encoder to the
one the bundles record, and the held-out data to the `data` block of the run's config.yaml (split `test`).
The library call behind it is `fae.metrics.reconstruction.evaluate_decoders`.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from fae.config import ConfigError, from_dict


def register_recon(eval_subparsers: Any) -> None:
    """Add `recon` to the `fae eval` sub-commands."""
    p = eval_subparsers.add_parser(
        "recon", help="PSNR/SSIM/rFID of pixel decoders on held-out images, with a grid PNG",
        description="Score the Gaussian embedding decoder on x and on x_hat, and the fine-tuned decoder on x_hat, "
        "over held-out images; write recon.json and recon_grid.png (original | each decoder).")
    p.add_argument("--gaussian", metavar="RUN", help="Gaussian-decoder run folder or pixel_decoder bundle")
    p.add_argument("--finetuned", metavar="RUN", help="fine-tuned decoder run folder or pixel_decoder bundle")
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


def _run_config(bundle: Path) -> dict[str, Any] | None:
    """The config.yaml of the run a bundle came from (bundle = <run>/pixel_decoder)."""
    file = bundle.parent / "config.yaml"
    return yaml.safe_load(file.read_text()) if file.is_file() else None


def cmd_recon(args: argparse.Namespace) -> int:
    import torch

    from fae.data import DataConfig, build_dataset
    from fae.encoders import FrozenEncoder, reference_differences
    from fae.io import read_bundle_config
    from fae.metrics.reconstruction import build_fid_network, evaluate_decoders
    from fae.models.autoencoder import FeatureAutoEncoder
    from fae.models.pixel_decoder import PixelDecoder
    from fae.stages.pixel_decoder import bundle_dir

    if not args.gaussian and not args.finetuned:
        raise ConfigError("fae eval recon: give --gaussian and/or --finetuned")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    bundles = {k: bundle_dir(v, "pixel_decoder") for k, v in (("gaussian", args.gaussian),
                                                                ("finetuned", args.finetuned)) if v}
    records = {k: read_bundle_config(b) for k, b in bundles.items()}
    fae_path = args.fae or (records["finetuned"].get("fae") if "finetuned" in records else None)
    fae_dir = bundle_dir(fae_path, "fae") if fae_path else None
    if fae_dir is not None:
        records["fae"] = read_bundle_config(fae_dir)
    refs = {k: r.get("encoder") for k, r in records.items()}
    if any(r is None for r in refs.values()):
        raise ConfigError(f"bundles without an encoder record: {[k for k, r in refs.items() if r is None]}")
    first = next(iter(refs))
    for k, ref in refs.items():
        differs = reference_differences(refs[first], ref)
        if differs:
            raise ConfigError(f"the {k} bundle was trained on another encoder than the {first} one (differs in {differs})")
    encoder = FrozenEncoder.from_reference(refs[first]).to(device)

    decoders: dict[str, Any] = {}
    if "gaussian" in bundles:
        gaussian = PixelDecoder.from_pretrained(bundles["gaussian"])
        decoders["gaussian(x)"] = (gaussian, "x")
        if fae_dir is not None:
            decoders["gaussian(x_hat)"] = (gaussian, "x_hat")
    if "finetuned" in bundles:
        if fae_dir is None:
            raise ConfigError("--finetuned decodes x_hat: give --fae (its bundle does not record one)")
        decoders["finetuned(x_hat)"] = (PixelDecoder.from_pretrained(bundles["finetuned"]), "x_hat")
    image_size = next(iter(decoders.values()))[0].config.image_size
    fae = FeatureAutoEncoder.from_pretrained(fae_dir) if fae_dir is not None else None

    if args.data:
        kind = "fashion_mnist" if args.data == "fashion_mnist" else "image_folder"
        data_cfg = DataConfig(kind=kind, root=None if kind == "fashion_mnist" else args.data, image_size=image_size)
    else:
        run = _run_config(bundles.get("finetuned", bundles.get("gaussian")))
        if run is None or "data" not in run:
            raise ConfigError("no --data given and the run folder has no config.yaml with a data block")
        data_cfg = from_dict(DataConfig, run["data"], "data")
    dataset = build_dataset(replace(data_cfg, hflip=False, limit=args.limit), args.split)

    spec = args.network
    network = build_fid_network(spec, encoder) if spec in ("encoder", "none") else None
    if spec not in ("encoder", "none"):
        from fae.metrics.networks import build_network

        network = build_network(spec, args.inception_weights, device=device)
    scores = evaluate_decoders(encoder, dataset, decoders, fae=fae, network=network,
                                     batch_size=args.batch_size, grid_rows=args.grid_rows, out_dir=args.out)
    print(f"{args.split}: {scores['images']} images")
    for name, row in scores["decoders"].items():
        rfid = f", rFID {row['rfid']:.3f}" if "rfid" in row else ""
        print(f"  {name:<18} PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}{rfid}")
    print(f"wrote {Path(args.out) / 'recon.json'} and {scores['grid']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m fae.cli.recon ...`) for when `fae eval` is not wired up."""
    parser = argparse.ArgumentParser(prog="fae eval")
    sub = parser.add_subparsers(dest="command", required=True)
    register_recon(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["cmd_recon", "register_recon"]
