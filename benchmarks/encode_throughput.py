"""`fae encode` throughput (images/s) with the demo's frozen encoder (the shipped tiny DINOv2, 32 px, 8x8x128).

    python benchmarks/encode_throughput.py [--items 2048] [--batch 256] [--workers 0 2] [--repeats 3]

Encodes Fashion-MNIST test images (32 px, plain + flipped latents, as `fae encode` does by default) through the
encoder and a demo-sized FAE (random weights: the cost is the same) into a fresh cache per run, and prints a
markdown table: images/s is items encoded (each with its flip) per second of wall time, the best of `--repeats`.
The statistics pass and the manifest are included: that is what a user waits for.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fae.assets import asset
from fae.data.idx import FashionMNIST
from fae.data.latents import EncodeOptions
from fae.encoders import EncoderConfig, FrozenEncoder
from fae.encoding import encode_latents
from fae.models.autoencoder import FAEConfig, FeatureAutoEncoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(asset("demo-encoder"))))
    data = FashionMNIST(split="test", image_size=32, limit=args.items)
    fae = FeatureAutoEncoder(FAEConfig(feature_dim=128, grid=(8, 8), latent_channels=8, encoder_heads=4,
                                       encoder_head_dim=64, decoder_depth=2, decoder_heads=4))
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, encoder precision {encoder.precision.describe()}, "
          f"{args.threads} threads, {args.items} items, batch {args.batch}")
    print("| workers | images/s | seconds |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = fae.save_pretrained(Path(tmp) / "fae", extra={"encoder": encoder.reference()})
        for workers in args.workers:
            best = float("inf")
            for r in range(args.repeats):
                opts = EncodeOptions(batch_size=args.batch, num_workers=workers, shard_size=args.items)
                start = time.perf_counter()
                encode_latents(data, Path(tmp) / f"cache-{workers}-{r}", fae=bundle, encoder=encoder, options=opts,
                               device="cpu", progress=False)
                best = min(best, time.perf_counter() - start)
            print(f"| {workers} | {args.items / best:.0f} | {best:.2f} |")


if __name__ == "__main__":
    main()
