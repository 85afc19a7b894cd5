"""Class-conditional latent diffusion on Fashion-MNIST, end to end on CPU, with the numbers docs/diffusion.md reports.

    python benchmarks/dit_fashion_mnist.py --work runs/dit_fmnist [--encoder runs/demo/encoder] [--dit-steps 3000]

Steps (each skipped when its output exists, so the script resumes):
 1. frozen encoder: --encoder, else the demo's pretrained tiny DINOv2 (runs/demo/encoder) when present, else a
    randomly initialised tiny DINOv2 (hidden 128, patch 4 on 32 px -> 8x8 tokens);
 2. FAE (stage 1) with configs/demo/fae.yaml;
 3. Gaussian pixel decoder (stage Ib) on the frozen features;
 4. `fae encode` of the train split (plain + flipped), exact statistics;
 5. DiT with configs/demo/dit.yaml (wall-clock is reported; the issue's budget is 10 minutes);
 6. a small CNN classifier trained on real Fashion-MNIST;
 7. samples with and without guidance: class agreement, and the Frechet distance to the test split in the frozen
    encoder's feature space (mean-pooled tokens); grids and report.json.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def encoder_dir(args: argparse.Namespace, work: Path) -> Path:
    from fae.encoders import save_tiny_encoder

    if args.encoder:
        return Path(args.encoder)
    if (ROOT / "runs/demo/encoder/config.json").is_file():
        return ROOT / "runs/demo/encoder"
    path = work / "encoder"
    if not (path / "config.json").is_file():
        save_tiny_encoder("dinov2", path, hidden_size=128, num_layers=4, num_heads=4, patch_size=4, image_size=32)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/dit_fmnist")
    ap.add_argument("--encoder", help="frozen encoder folder (default: runs/demo/encoder or a random tiny DINOv2)")
    ap.add_argument("--dit-config", default=str(ROOT / "configs/demo/dit.yaml"))
    ap.add_argument("--dit-steps", type=int, default=None, help="override train.steps of the DiT config")
    ap.add_argument("--pd-steps", type=int, default=1500)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--guidance", nargs="+", default=["paper"], help="guidance schedules to evaluate (ODE)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (every stage; DiT CPU time is timed apart)")
    ap.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke tests)")
    ap.add_argument("--fae-steps", type=int, default=None, help="override configs/demo/fae.yaml train.steps")
    ap.add_argument("--clf-epochs", type=int, default=4)
    ap.add_argument("--clf-limit", type=int, default=None, help="classifier training images (default: all 60k)")
    ap.add_argument("--perceptual", default="encoder", help="pixel decoder perceptual loss: encoder | none")
    ap.add_argument("--until", choices=["encode", "dit", "all"], default="all", help="stop after this step")
    ap.add_argument("overrides", nargs="*", help="DiT config overrides key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fae.config import from_dict, read_yaml, to_dict
    from fae.data import DataConfig, build_dataset
    from fae.data.features import FeatureCache
    from fae.distributed import resolve_device
    from fae.encoders import EncoderConfig, FrozenEncoder
    from fae.encoding import EncodeOptions, encode_latents
    from fae.generators import load_generator
    from fae.grid import to_uint8_hwc
    from fae.metrics import EncoderNetwork, TensorSource, fid
    from fae.metrics.judge import class_agreement, train_classifier
    from fae.sampling import generate, load_decoder, write_samples
    from fae.stages import load_stage_config, train_stage
    from fae.transport import GuidanceSchedule, SamplerConfig

    device = str(resolve_device(args.device))
    common = [f"train.device={device}"] + ([f"data.limit={args.limit}"] if args.limit else [])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = json.loads((work / "report.json").read_text()) if (work / "report.json").is_file() else {}
    enc = encoder_dir(args, work)
    report["encoder"] = str(enc)
    log(f"encoder: {enc}")

    # 2. FAE
    fae_run = work / "fae"
    if not (fae_run / "fae" / "config.json").is_file():
        _, cfg = load_stage_config(ROOT / "configs/demo/fae.yaml", [
            f"encoder.name_or_path={enc}", f"feature_cache_dir={work / 'feature_cache'}", *common,
            *([f"train.steps={args.fae_steps}"] if args.fae_steps else [])])
        t0 = time.time()
        train_stage("fae", cfg, fae_run, progress=False)
        report["fae_train_s"] = round(time.time() - t0, 1)
        log(f"FAE trained in {report['fae_train_s']} s")
    data_cfg = replace(from_dict(DataConfig, read_yaml(ROOT / "configs/demo/fae.yaml")["data"]), limit=args.limit)

    # 3. Gaussian pixel decoder
    pd_run = work / "pixel_decoder"
    if not (pd_run / "pixel_decoder" / "config.json").is_file():
        encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(enc)))
        text = {
            "stage": "pixel-decoder",
            "encoder": {"kind": "dinov2", "name_or_path": str(enc)},
            "decoder": {"in_dim": encoder.dim, "num_tokens": encoder.num_tokens, "patch_size": 32 // encoder.grid[0],
                        "width": 128, "depth": 4, "num_heads": 4, "refine_channels": 16},
            "data": to_dict(data_cfg),
            "losses": {"rec": "l2", "perceptual": args.perceptual, "perceptual_weight": 0.1, "gan_weight": 0.0},
            "noise": {"sigma": 0.4},
            "features": "cache", "feature_cache_dir": str(work / "feature_cache"),
            "optim": {"lr": 1e-3, "warmup_steps": 50, "min_lr": 1e-5},
            "train": {"steps": args.pd_steps, "batch_size": 64, "ema_decay": 0.99, "precision": "bf16",
                      "checkpoint_every": 500, "log_every": 50, "device": device},
            "eval": {"limit": 500},
        }
        (work / "pixel_decoder.yaml").write_text(json.dumps(text, indent=1))
        _, cfg = load_stage_config(work / "pixel_decoder.yaml")
        t0 = time.time()
        train_stage("pixel-decoder", cfg, pd_run, progress=False)
        report["pixel_decoder_train_s"] = round(time.time() - t0, 1)
        log(f"pixel decoder trained in {report['pixel_decoder_train_s']} s")

    # 4. latent cache
    cache = work / "latents"
    if not (cache / "cache.json").is_file():
        t0 = time.time()
        feats = None  # reuse stage 1's feature cache of the train split when there is one
        for candidate in sorted((work / "feature_cache").glob("*.safetensors")):
            found = FeatureCache(candidate)
            if found.has_flips and found.length == (args.limit or 60000) and found.encoder["name_or_path"] == str(enc):
                feats = candidate
        encode_latents(replace(data_cfg, hflip=False), cache, fae=fae_run / "fae", split="train",
                       options=EncodeOptions(shard_size=20000, batch_size=500), progress=False, feature_cache=feats,
                       device=device)
        report["encode_s"] = round(time.time() - t0, 1)
        log(f"encoded in {report['encode_s']} s")

    (work / "report.json").write_text(json.dumps(report, indent=2))
    if args.until == "encode":
        return

    # 5. DiT
    overrides = [f"latents={cache}", f"train.device={device}",
                 *(f"train.steps={args.dit_steps}",) * (args.dit_steps is not None), *args.overrides]
    _, dit_cfg = load_stage_config(args.dit_config, overrides)
    dit_run = work / "dit"
    if not (dit_run / "dit" / "config.json").is_file():
        t0 = time.time()
        train_stage("dit", dit_cfg, dit_run, progress=False)
        report["dit_train_s"] = round(time.time() - t0, 1)
        report["dit_config"] = to_dict(dit_cfg)
        log(f"DiT trained in {report['dit_train_s']} s")
    rows = [json.loads(line) for line in (dit_run / "metrics.jsonl").read_text().splitlines()]
    report["dit_loss_first_last"] = [rows[0]["loss/main"], rows[-1]["loss/main"]]

    (work / "report.json").write_text(json.dumps(report, indent=2))
    if args.until == "dit":
        return

    # 6. classifier on real images
    clf = train_classifier(replace(data_cfg, limit=None), work / "classifier", epochs=args.clf_epochs, progress=False,
                           device=device, train_limit=args.clf_limit)
    from fae.io import read_bundle_config

    report["classifier_test_accuracy"] = read_bundle_config(work / "classifier")["test_accuracy"]
    log(f"classifier test accuracy {report['classifier_test_accuracy']:.4f}")

    # 7. samples and scores
    gen = load_generator(dit_run, device=device)
    decode = load_decoder(gen, fae=fae_run / "fae", pixel_decoder=pd_run / "pixel_decoder", device=device)
    test = build_dataset(replace(data_cfg, hflip=False, limit=None), "test")
    reference = to_uint8_hwc(torch.stack([test[i]["image"] for i in range(len(test))]))
    network = EncoderNetwork(FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(enc))), device)
    recon_fd = fid(reference[:5000], TensorSource(reference[5000:]), network)
    report["fd_test_half_vs_half"] = recon_fd
    runs = {"no_guidance": SamplerConfig(method="euler_maruyama", steps=args.sample_steps),
            "no_guidance_ode": SamplerConfig(method="euler", steps=args.sample_steps)}
    for spec in args.guidance:
        runs[f"guidance_{spec}"] = SamplerConfig(method="euler", steps=args.sample_steps,
                                                 guidance=GuidanceSchedule.parse(spec))
    for name, sampler in runs.items():
        if name in report:
            continue
        t0 = time.time()
        samples = generate(gen, decode, args.num_samples, seed=0, labels="equal", sampler=sampler, batch_size=250,
                           progress=False, device=device)
        seconds = time.time() - t0
        folder = work / "samples" / name.replace(":", "_").replace(",", "+")
        write_samples(folder, samples, gen.class_names, pngs=False)
        agree = class_agreement(clf, samples.images, samples.labels)
        fd = fid(samples.images, TensorSource(reference), network)
        report[name] = {"class_agreement": agree["agreement"], "per_class": agree["per_class"], "fd_encoder": fd,
                        "sampler": to_dict(sampler), "seconds": round(seconds, 1),
                        "grid": str(folder / "grid.png")}
        log(f"{name}: class agreement {agree['agreement']:.3f}, FD(encoder) {fd:.3f}, {seconds:.0f} s")
        (work / "report.json").write_text(json.dumps(report, indent=2))
    log(f"report: {work / 'report.json'}")


if __name__ == "__main__":
    main()
