"""`fae eval ...`: generation metrics, reference statistics, reconstruction metrics and linear probing.

Every subcommand writes a JSON report (numbers, feature network + weights hash, sample counts, protocol) and
prints a table. The work is done by `fae.metrics`; this module only parses arguments.

Names say what was measured: a Fréchet distance is "fid" only through the FID Inception; in a frozen encoder's space
it is "fd_encoder" ("rfd_encoder" for reconstructions).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fae.cli.generate import generator_and_decoder
from fae.cli.recon import register_recon
from fae.config import ConfigError
from fae.precision import PRECISIONS
from fae.speed import COMPILE_MODES
from fae.transport import SAMPLER_METHODS

WEIGHTS_TEXT = """\
Inception weights: the FID network needs pt_inception-2015-12-05-6726825d.pth (91 MB, the
pytorch-fid port of TensorFlow's inception-2015-12-05 graph). Nothing is downloaded at run
time. The file is taken from --inception-weights PATH, else $FAE_INCEPTION_WEIGHTS, else the
torch hub folder <torch hub dir>/checkpoints/ (usually ~/.cache/torch/hub/checkpoints/):
  mkdir -p ~/.cache/torch/hub/checkpoints
  curl -L -o ~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth \\
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
"""
INPUTS_TEXT = """\
Samples: an image folder or an .npz with arr_0 uint8 (N,H,W,3) (the ADM format; a `fae sample`
run folder holding one .npz also works).
Reference: an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), a `fae eval stats`
file, or an image folder / .npz of images.
A folder's images must share one size, unless --image-size N reads them as training does
(centre crop to N px). For reference statistics of a training set at its training size, use
`fae eval stats --data CONFIG|FOLDER`.
"""
INCEPTION_HELP = ("FID Inception weights file pt_inception-2015-12-05-6726825d.pth (default: $FAE_INCEPTION_WEIGHTS, "
                  "else ~/.cache/torch/hub/checkpoints/; see the description above)")
NETWORK_HELP = (
    "feature network: 'inception' (FID Inception-v3, TF-1 resize from uint8 as the ADM evaluator; default), "
    "'inception:pytorch' (pytorch-fid's resize), or 'encoder:<model folder or kind:hub id>' for a Fréchet distance "
    "in a frozen encoder's space (e.g. FD-DINOv2; mean-pooled patch tokens), reported as fd_encoder, not fid")
IMAGE_SIZE_HELP = ("read image folders as training does, centre-cropped to N px (their images may then differ in size; "
                   "without it they must share one size)")


def _add_common(p: argparse.ArgumentParser, network: bool = True, out: bool = True) -> None:
    if network:
        p.add_argument("--network", default="inception", help=NETWORK_HELP)
        p.add_argument("--inception-weights", metavar="PATH", help=INCEPTION_HELP)
    p.add_argument("--batch-size", type=int, default=50, help="images per feature-network batch (default 50)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", help="feature cache folder (default ~/.cache/fae/eval-features, or under "
                   "$FAE_CACHE or $XDG_CACHE_HOME); features are reused per input + network + weights")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    if out:
        p.add_argument("--out", help="JSON report path (default: next to the samples, <samples>.<command>.json)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_image_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, metavar="N", help=IMAGE_SIZE_HELP)


def register(subparsers: Any) -> None:
    """Add `fae eval` and its subcommands to the `fae` command's subparsers."""
    ev = subparsers.add_parser("eval", help="evaluate: FID/sFID/IS/precision/recall, reference stats, rFID/PSNR/SSIM, "
                               "linear probe", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ev.add_subparsers(dest="eval_command", metavar="<metric>")
    ev.set_defaults(func=lambda args: (ev.print_help(), 2)[1])

    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("fid", help="FID (or FD in another feature network's space)", formatter_class=raw,
                       description="Fréchet distance between the samples and the reference in a feature network's "
                       "space.\nWith --network inception (default) this is FID as the ADM evaluator computes it; in an "
                       "encoder's\nspace it is reported as fd_encoder.\n\n"
                       + INPUTS_TEXT + "\n" + WEIGHTS_TEXT)
    _add_gen_args(p, precision_recall=False)
    p.set_defaults(func=_cmd_gen, metrics=["fid"], command_name="fid", is_splits=10, is_split_size=None, k=3)

    p = sub.add_parser("gen", help="all generation metrics: FID, sFID, IS, precision, recall (the ADM suite)",
                       formatter_class=raw,
                       description="FID, sFID, Inception Score (10 splits) and k-NN precision/recall (k=3) of the "
                       "samples,\nas in the paper's Table 2 (ADM evaluator protocol). With an encoder network only "
                       "FD,\nprecision and recall are available.\n\n" + INPUTS_TEXT + "\n" + WEIGHTS_TEXT)
    _add_gen_args(p)
    p.add_argument("--metrics", nargs="+", choices=["fid", "fd", "sfid", "is", "precision", "recall"],
                   help="subset to compute (default: all the network supports); fid and fd both ask for the Fréchet "
                   "distance, reported as fid (Inception) or fd_encoder")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--is-split-size", type=int, help="IS parts of this many samples instead (ADM: 5000)")
    p.set_defaults(func=_cmd_gen, command_name="gen")

    p = sub.add_parser("is", help="Inception Score", formatter_class=raw,
                       description="Inception Score of the samples (softmax of the Inception logits, 10 splits;\n"
                       "--split-size 5000 reproduces ADM exactly).\n\n" + WEIGHTS_TEXT)
    p.add_argument("--samples", required=True, help="image folder or .npz (arr_0)")
    p.add_argument("--num-samples", type=int, help="use only the first N samples")
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--split-size", type=int, help="split into parts of this many samples instead (ADM: 5000)")
    _add_image_size(p)
    _add_common(p)
    p.set_defaults(func=_cmd_is, command_name="is")

    p = sub.add_parser("stats", help="compute reference statistics (ADM-compatible .npz)", formatter_class=raw,
                       description="Compute mu/sigma (and sFID mu_s/sigma_s) of an image set, keep a seeded random "
                       "subset of\nimages (arr_0) and of pool features (feat_pool) for precision/recall, and write "
                       "them in the\nADM reference format (+ fae_meta: network, weights hash, sample count).\n\n"
                       "The images: --images (a folder or .npz, as they are) or --data (a data set at the training "
                       "crop and\nsize: a stage YAML's `data:` block, or an image folder with --image-size N, read "
                       "through\nfae.data.build_dataset exactly as training reads it; unreadable files are left "
                       "out).\n\n" + WEIGHTS_TEXT)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", help="image folder or .npz (arr_0), taken as they are")
    what.add_argument("--data", metavar="CONFIG|FOLDER", help="a stage YAML (its `data:` block), fashion_mnist, or an "
                      "image folder (root/{train,test}/<class>/* or root/<class>/*; needs --image-size)")
    p.add_argument("--split", default="test", help="with --data: the split (default test)")
    p.add_argument("--image-size", type=int, metavar="N", help="with --data: the training size (required for a "
                   "folder; default: the config's data.image_size); with --images: " + IMAGE_SIZE_HELP)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-samples", "--limit", type=int, metavar="N", help="use only N images: the first N of "
                   "--images; with --data the data set's class-balanced subset (data.limit)")
    p.add_argument("--keep-images", type=int, default=10_000, help="reference images stored as arr_0 (ADM: 10000)")
    p.add_argument("--keep-features", type=int, default=10_000, help="pool features stored for precision/recall")
    p.add_argument("--seed", type=int, default=0, help="seed of the kept subset")
    _add_common(p, out=False)
    p.add_argument("overrides", nargs="*", help="with --data: data.key=value overrides of the data block, as "
                   "`fae train` takes them (e.g. data.root=my-images data.resize=pad)")
    p.set_defaults(func=_cmd_stats, command_name="stats")

    p = sub.add_parser("rfid", help="rFID + PSNR + SSIM of paired originals / reconstructions",
                       formatter_class=raw,
                       description="Reconstruction metrics on aligned image pairs (same order; same file names for\n"
                       "folders): PSNR (data range 1), SSIM (Gaussian 11x11, sigma 1.5) and rFID through the\n"
                       "feature network.\n\n" + WEIGHTS_TEXT)
    p.add_argument("--originals", required=True, help="image folder or .npz")
    p.add_argument("--reconstructions", required=True, help="image folder or .npz, paired with --originals")
    p.add_argument("--num-samples", type=int, help="use only the first N pairs")
    p.add_argument("--no-rfid", action="store_true", help="PSNR/SSIM only (no feature network needed)")
    _add_common(p)
    p.set_defaults(func=_cmd_rfid, command_name="rfid")

    p = sub.add_parser("probe", help="linear probe of raw features x, reconstructions x̂ and latents z (Table 1)",
                       description="Linear probing (a grid of learning rates x poolings trained in parallel on frozen "
                       "inputs, best picked on a held-out split of the training set, test top-1 reported) of the "
                       "frozen encoder's features x, the FAE reconstructions x̂ = decode(z) and the latents z = "
                       "posterior mean, side by side. Without --fae only x is probed.")
    p.add_argument("--fae", metavar="RUN", help="the FAE: a `fae train fae --out RUN` run folder (its bundle is RUN/fae/), "
                   "that bundle itself, a pixel-decoder fine-tune run, or an FAE tokenizer bundle (RUN/tokenizer/)")
    p.add_argument("--encoder", help="frozen encoder (model folder or hub id); default: the one the bundle records")
    p.add_argument("--config", help="a stage YAML whose `data:` section describes the data set (e.g. configs/demo/...)")
    p.add_argument("--data", choices=["fashion_mnist", "image_folder"], help="data set kind (overrides --config)")
    p.add_argument("--data-root", help="data folder (default for fashion_mnist: the Debian package's)")
    p.add_argument("--image-size", type=int, help="image size fed to the encoder (default: the data config's, else "
                   "the encoder's input size)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--train-limit", type=int, help="use only N training images")
    p.add_argument("--test-limit", type=int, help="use only N test images")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid (default 8 values, 1e-3 .. 3)")
    p.add_argument("--poolings", nargs="+", choices=["mean", "mean_max", "flatten"], help="default: all three")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="batch size for feature extraction and probe training")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON report path (default: beside what --fae names, <RUN>.probe.json; with only a "
                   "hub-id --encoder, ./probe.json)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_probe, command_name="probe")

    register_recon(sub)
    _register_generator(sub)
    _register_t2i(sub)


def _add_gen_args(p: argparse.ArgumentParser, precision_recall: bool = True) -> None:
    p.add_argument("--samples", required=True, help="image folder or .npz (arr_0 uint8 N,H,W,3)")
    p.add_argument("--ref", required=True, help="reference .npz (ADM or `fae eval stats`) or image folder / .npz")
    p.add_argument("--num-samples", type=int, help="use only the first N samples (the paper: 50000)")
    _add_image_size(p)
    if precision_recall:
        p.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds for precision/recall (ADM: 3)")
    _add_common(p)


# ----------------------------------------------------------------------------------------------------------------


def _network(args: argparse.Namespace) -> Any:
    from fae.distributed import init_distributed, resolve_device
    from fae.metrics.networks import build_network

    init_distributed()   # under torchrun the feature extraction is split over the processes
    return build_network(args.network, args.inception_weights, resolve_device(args.device))


def _cache_dir(args: argparse.Namespace) -> Path | None:
    from fae.metrics.features import default_cache_dir

    if args.no_cache:
        return None
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _default_out(anchor: str, command: str) -> Path:
    path = Path(anchor)
    return path.with_name(f"{path.stem if path.suffix == '.npz' else path.name}.{command}.json")


def _finish(args: argparse.Namespace, report: Any, anchor: str) -> int:
    from fae.distributed import is_main

    if not is_main():   # under torchrun every process holds the report; one writes and prints it
        return 0
    out = Path(args.out) if args.out else _default_out(anchor, args.command_name)
    report.write(out)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    if not args.json:
        print(f"report: {out}")
    return 0


def _check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def _cmd_gen(args: argparse.Namespace) -> int:
    from fae.distributed import resolve_device
    from fae.metrics.evaluate import evaluate_generation

    _check_positive(num_samples=args.num_samples, batch_size=args.batch_size, k=args.k, is_splits=args.is_splits,
                    is_split_size=args.is_split_size, image_size=args.image_size)
    network = _network(args)
    samples = _at_size(args.samples, args.image_size, args.num_samples)
    report = evaluate_generation(samples, _at_size(args.ref, args.image_size), network, metrics=args.metrics,
                                 num_samples=args.num_samples, batch_size=args.batch_size,
                                 cache_dir=_cache_dir(args), is_splits=args.is_splits,
                                 is_split_size=args.is_split_size, pr_k=args.k, device=resolve_device(args.device),
                                 progress=not args.no_progress)
    return _finish(args, report, args.samples)


def _cmd_is(args: argparse.Namespace) -> int:
    from fae.metrics.features import extract_features
    from fae.metrics.report import EvalReport
    from fae.metrics.scores import inception_score

    _check_positive(num_samples=args.num_samples, batch_size=args.batch_size, splits=args.splits,
                    split_size=args.split_size, image_size=args.image_size)
    network = _network(args)
    fs = extract_features(_at_size(args.samples, args.image_size, args.num_samples), network, args.batch_size,
                          _cache_dir(args), args.num_samples, not args.no_progress)
    mean, std = inception_score(fs["logits"], splits=args.splits, split_size=args.split_size)
    report = EvalReport("generation", {"is": mean, "is_std": std}, network.info(), fs.num_samples,
                        {"is": {"splits": None if args.split_size else args.splits, "split_size": args.split_size,
                                "logits": "pool @ W^T (no bias), 1008 classes"}}, {"samples": fs.source})
    return _finish(args, report, args.samples)


def _at_size(spec: str, image_size: int | None, limit: int | None = None) -> Any:
    """An image folder read at --image-size with the training preprocessing (its images may differ in size);
    anything else (no --image-size, an .npz, a reference file) as the user named it."""
    if image_size is None or not Path(spec).is_dir():
        return spec
    from fae.metrics.features import open_images

    return open_images(spec, limit=limit, image_size=image_size)


def _stats_images(args: argparse.Namespace) -> Any:
    """What `fae eval stats` measures: --images as they are (or at --image-size), or --data at the training crop
    and size (the split's class-balanced --limit subset)."""
    if args.images is not None:
        if args.overrides:
            raise ConfigError(f"{' '.join(args.overrides)}: data overrides go with --data, not --images")
        return _at_size(args.images, args.image_size, args.num_samples)
    from fae.metrics.datasets import data_config
    from fae.metrics.features import dataset_source

    data = data_config(args.data, args.image_size, limit=args.num_samples, overrides=args.overrides)
    return dataset_source(data, split=args.split)


def _cmd_stats(args: argparse.Namespace) -> int:
    from fae.metrics.reference import save_reference
    from fae.metrics.report import EvalReport

    _check_positive(num_samples=args.num_samples, batch_size=args.batch_size, image_size=args.image_size)
    if args.keep_images < 0 or args.keep_features < 0:
        raise ConfigError("--keep-images and --keep-features must be >= 0")
    images = _stats_images(args)   # a user's data mistake is reported before any network loads
    network = _network(args)
    meta = save_reference(args.out, images, network, keep_images=args.keep_images,
                          keep_features=args.keep_features, seed=args.seed, batch_size=args.batch_size,
                          cache_dir=_cache_dir(args), limit=args.num_samples, progress=not args.no_progress)
    report = EvalReport("reference-stats", {"num_samples": meta["num_samples"], "images_kept": meta["num_images_kept"],
                                            "features_kept": meta["num_features_kept"]},
                        network.info(), meta["num_samples"], {"subset_seed": args.seed}, {"images": meta["source"],
                                                                                          "written": args.out})
    from fae.distributed import is_main

    if not is_main():
        return 0
    report_path = report.write(Path(args.out).with_suffix(".json"))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    print(f"reference statistics: {args.out} (report: {report_path})")
    return 0


def _cmd_rfid(args: argparse.Namespace) -> int:
    from fae.metrics.evaluate import evaluate_reconstruction

    _check_positive(num_samples=args.num_samples, batch_size=args.batch_size)
    network = None if args.no_rfid else _network(args)
    report = evaluate_reconstruction(args.originals, args.reconstructions, network, num_samples=args.num_samples,
                                     batch_size=args.batch_size, cache_dir=_cache_dir(args),
                                     progress=not args.no_progress)
    return _finish(args, report, args.reconstructions)


def _cmd_probe(args: argparse.Namespace) -> int:
    from fae.metrics.probe import POOLINGS, ProbeConfig, run_probe

    _check_positive(train_limit=args.train_limit, test_limit=args.test_limit, epochs=args.epochs,
                    batch_size=args.batch_size)
    lrs: dict[str, Any] = {"learning_rates": tuple(args.lrs)} if args.lrs else {}
    cfg = ProbeConfig(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                      poolings=tuple(args.poolings or POOLINGS),
                      **lrs)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    report = run_probe(fae=args.fae, encoder=args.encoder, config_path=args.config, data_kind=args.data,
                       data_root=args.data_root, image_size=args.image_size, train_split=args.train_split,
                       test_split=args.test_split, train_limit=args.train_limit, test_limit=args.test_limit,
                       probe=cfg, device=args.device, progress=not args.no_progress)
    anchor = args.fae or args.encoder
    if args.out is None and (anchor is None or not Path(anchor).exists()):
        args.out = "probe.json"   # a hub id: write in the current folder
    return _finish(args, report, anchor or "probe")


def _register_generator(sub: Any) -> None:
    p = sub.add_parser("generator", help="score a generator: FD (or FID) and class agreement of its samples",
                       description="Sample a generator bundle or run (--step: that kept checkpoint's EMA weights), "
                       "decode, and score: the Fréchet distance to --reference in the --network space and, with "
                       "--judge, class agreement. The same code and settings as a generator stage's eval.every, so "
                       "the number equals the one its metrics.jsonl logged at that step.")
    p.add_argument("--generator", required=True, help="a generator bundle or `fae train <family>` run folder")
    p.add_argument("--step", type=int, help="score this kept checkpoint of the run (default: the finished bundle)")
    p.add_argument("--decoder", "--tokenizer", dest="decoder",
                   help="the latents' tokenizer (an FAE pixel-decoder fine-tune run, sd-vae:<folder>, ...; default: "
                   "the one the generator records)")
    p.add_argument("--pixel-decoder", help="for raw-feature latents: the pixel-decoder bundle or run")
    p.add_argument("--reference", required=True, help="reference statistics .npz (`fae eval stats`) or images")
    p.add_argument("--network", default="encoder", help="encoder (the latents' frozen encoder; default), "
                   "encoder:<model folder>, inception (needs --inception-weights), inception:pytorch")
    p.add_argument("--inception-weights")
    p.add_argument("--judge", help="a classifier bundle (fae.metrics.judge): class agreement")
    p.add_argument("--precision-recall", action="store_true", help="also k=3 precision and recall")
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--sampler", default="euler", choices=list(SAMPLER_METHODS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", default="none", help="none | a scale | 't_min-t_max:scale,...' | paper")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_generator)


def _cmd_generator(args: argparse.Namespace) -> int:
    import json

    from fae.distributed import is_main, resolve_device
    from fae.evaluation import GeneratorEvalConfig
    from fae.io import atomic_write_text
    from fae.stages.generator import evaluate_generator

    cfg = GeneratorEvalConfig(decoder=args.decoder, pixel_decoder=args.pixel_decoder, num_samples=args.num_samples,
                              seed=args.seed, batch_size=args.batch_size, method=args.sampler, steps=args.steps,
                              guidance=args.guidance, network=args.network, inception_weights=args.inception_weights,
                              reference=args.reference, judge=args.judge, precision_recall=args.precision_recall)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    scores = evaluate_generator(args.generator, cfg, step=args.step, device=resolve_device(args.device),
                                progress=not args.no_progress)
    if is_main():
        text = json.dumps(scores, indent=2)
        if args.out:
            atomic_write_text(Path(args.out), text)
        print(text)
    return 0


T2I_TEXT = """\
The paper's text-to-image protocol (MS-COCO validation, 256 px, 30K captions, zero-shot): one
sample per caption, FID against the caption set's images and CLIP score of each sample with its
caption. Sampling follows `fae sample`: sample i from noise seeded by (--seed, i) with caption i,
the paper's text guidance (1.5 on t in [0, 0.9]) with the Euler ODE at 250 steps by default;
interrupted runs resume from OUT/.chunks. Writes OUT/samples.npz (ADM format), OUT/grid.png and
OUT/t2i.json. docs/text-to-image.md has the 30K MS-COCO recipe.

Captions: a folder of <name>.<image ext> + <name>.txt pairs, a .jsonl / .csv manifest of
{image, caption} rows (image paths relative to it), or webdataset .tar shards
(fae.data.captions); the FID reference is the same set's images, each image once.
CLIP score: 100 * max(cos(image embedding, text embedding), 0), averaged over the pairs.
"""


def _register_t2i(sub: Any) -> None:
    p = sub.add_parser("t2i", help="text-to-image: FID and CLIP score of one sample per caption (MS-COCO style)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=T2I_TEXT + "\n" + WEIGHTS_TEXT)
    p.add_argument("--generator", help="a text-to-image generator bundle or `fae train mmdit` run folder")
    p.add_argument("--pipeline", help="a generation pipeline folder instead (generator + its tokenizer)")
    p.add_argument("--fae", help="with --generator: the FAE it was trained on (pixel-decoder fine-tune run or its "
                   "tokenizer/ bundle), as `fae sample --fae`")
    p.add_argument("--pixel-decoder", help="with a stage-1 --fae: its pixel-decoder run or bundle")
    p.add_argument("--tokenizer", help="with --generator, another latent space's tokenizer (default: the recorded one)")
    p.add_argument("--captions", required=True, help="caption set: folder of image + .txt pairs, .jsonl/.csv "
                   "manifest, or .tar shards; its images are the FID reference")
    p.add_argument("--caption-format", choices=["folder", "manifest", "webdataset"],
                   help="default: told by the path (a folder, .jsonl/.csv, .tar)")
    p.add_argument("--clip", required=True, metavar="MODEL", help="CLIP model for the CLIP score: hub id (e.g. "
                   "openai/clip-vit-large-patch14) or a local save_pretrained folder with its tokenizer and image "
                   "processor; SigLIP models load too")
    p.add_argument("--clip-revision", help="hub revision (commit, tag) of --clip")
    p.add_argument("-n", "--num-samples", type=int, help="caption N pairs (default: all; the paper: 30000)")
    p.add_argument("--subset-seed", type=int, help="take a seeded random N pairs instead of the first N (a smaller "
                   "N with the same seed is a prefix of a larger one)")
    p.add_argument("--reference", help="FID reference statistics (`fae eval stats`) or images instead of the "
                   "caption set's images")
    p.add_argument("--reference-images", choices=["all", "chosen"], default="all",
                   help="FID against all the caption set's images (default, as U-ViT's full validation-set "
                   "statistics) or only those of the chosen pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["auto", *SAMPLER_METHODS], default="auto",
                   help="auto: the Euler ODE with guidance, Euler-Maruyama without (the paper's rule)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--guidance", default="paper-text", help="paper-text (default: 1.5 on t in [0, 0.9], the "
                   "paper's MMDiT setting) | none | a scale | 't_min-t_max:scale,...', as `fae sample`")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first N channels (as `fae sample`); default all")
    p.add_argument("--time-shift", type=float, default=None, help="the paper's s; default: the training value")
    p.add_argument("--cfg-batch", choices=["auto", "concat", "separate"], default="auto")
    p.add_argument("--sample-batch-size", type=int, default=64, help="samples per generator batch (default 64)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="the generator's autocast (as `fae sample`)")
    p.add_argument("--compile", choices=list(COMPILE_MODES), default="auto",
                   help="torch.compile the generator and decoders: auto = on CUDA, off on CPU")
    p.add_argument("--out", required=True, help="output folder: samples.npz, grid.png, t2i.json")
    _add_common(p, out=False)
    p.set_defaults(func=_cmd_t2i, command_name="t2i")


def _cmd_t2i(args: argparse.Namespace) -> int:
    from fae.distributed import is_main, resolve_device
    from fae.evaluation import evaluate_text_to_image
    from fae.metrics.clip_score import ClipScorer
    from fae.sampling import sampler_config

    _check_positive(num_samples=args.num_samples, batch_size=args.batch_size, steps=args.steps,
                    sample_batch_size=args.sample_batch_size)
    sampler = sampler_config(args.guidance, args.sampler, args.steps, args.time_shift, args.guidance_channels,
                             args.cfg_batch)
    network = _network(args)   # a missing weights file or CLIP model is reported before any sampling
    device = resolve_device(args.device)
    clip = ClipScorer.load(args.clip, device=device, revision=args.clip_revision)
    gen, decode = generator_and_decoder(args, str(device), "fae eval t2i")
    report = evaluate_text_to_image(gen, decode, args.captions, args.out, clip, network,
                                    num_samples=args.num_samples, subset_seed=args.subset_seed, seed=args.seed,
                                    sampler=sampler, batch_size=args.sample_batch_size, reference=args.reference,
                                    reference_images=args.reference_images, caption_format=args.caption_format,
                                    device=device, precision=args.precision, compile=args.compile,
                                    cache_dir=_cache_dir(args), feature_batch_size=args.batch_size,
                                    progress=not args.no_progress)
    if not is_main():
        return 0
    out = Path(args.out) / "t2i.json"
    report.write(out)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    if not args.json:
        print(f"report: {out}")
    return 0
