"""`fae encode` throughput (images/s) with the demo's frozen encoder (the shipped tiny DINOv2, 32 px, 8x8x128).

    python benchmarks/encode_throughput.py [--items 2048] [--batch 256] [--workers 0 2] [--repeats 3] [--compare]

Encodes Fashion-MNIST test images (32 px, plain + flipped latents, as `fae encode` does by default) through the
encoder and a demo-sized FAE (random weights: the cost is the same) into a fresh cache per run, and prints a
markdown table: images/s is items encoded (each with its flip) per second of wall time, the best of `--repeats`,
and per second of this process's CPU time (threads summed; robust to a busy machine preempting us, but blind to
loader workers). The statistics pass and the manifest are included: that is what a user waits for.

`--compare` also times the compute of one batch side by side in this process, interleaved (a busy machine slows
both alike): the path before issue 15 (plain and flipped images in two encoder calls, the FAE encoder in fp32)
against `fae encode`'s (one call on the 2B batch, the FAE encoder in precision auto), and prints the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fae.assets import asset
from fae.data.idx import FashionMNIST
from fae.encoders import EncoderConfig, FrozenEncoder
from fae.encoding import EncodeOptions, encode_latents, make_latent_fn
from fae.models.autoencoder import FAEConfig, FeatureAutoEncoder
from fae.precision import resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(asset("demo-encoder"))))
    data = FashionMNIST(split="test", image_size=32, limit=args.items)
    fae = FeatureAutoEncoder(FAEConfig(feature_dim=128, grid=(8, 8), latent_channels=8, encoder_heads=4,
                                       encoder_head_dim=64, decoder_depth=2, decoder_heads=4))
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, encoder precision {encoder.precision.describe()}, "
          f"{args.threads} threads, {args.items} items, batch {args.batch}")
    print("| workers | images/s (wall) | images/s (CPU time) | wall s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = fae.save_pretrained(Path(tmp) / "fae", extra={"encoder": encoder.reference()})
        for workers in args.workers:
            best, best_cpu = float("inf"), float("inf")
            for r in range(args.repeats):
                opts = EncodeOptions(batch_size=args.batch, num_workers=workers, shard_size=args.items)
                start, start_cpu = time.perf_counter(), time.process_time()
                encode_latents(data, Path(tmp) / f"cache-{workers}-{r}", fae=bundle, encoder=encoder, options=opts,
                               device="cpu", progress=False)
                best = min(best, time.perf_counter() - start)
                best_cpu = min(best_cpu, time.process_time() - start_cpu)
            print(f"| {workers} | {args.items / best:.0f} | {args.items / best_cpu:.0f} | {best:.2f} |")
    if args.compare:
        compare_paths(encoder, fae.eval(), torch.rand(args.batch, 3, 32, 32), args.repeats)


@torch.no_grad()
def compare_paths(encoder: FrozenEncoder, fae: FeatureAutoEncoder, images: torch.Tensor, repeats: int) -> None:
    precision = resolve_precision("auto", "cpu")
    new = make_latent_fn(encoder, fae, "fae", (8, 8), autocast=precision.autocast)

    def before() -> None:  # the pre-issue-15 path: two encoder calls, FAE in fp32
        for batch in (images, images.flip(-1)):
            fae.encode(encoder(batch).float()).mean.float()

    def after() -> None:
        new({"image": images}, True)

    times: dict[str, list[float]] = {"before": [], "after": []}
    before(), after()  # warm-up
    for _ in range(max(3, repeats)):
        for name, fn in (("before", before), ("after", after)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"\ncompute of one batch of {len(images)} (+ flips), FAE encoder {precision.name}: "
          f"before {len(images) / b:.0f} images/s, after {len(images) / a:.0f} images/s, ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
