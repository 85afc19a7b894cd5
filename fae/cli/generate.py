"""`fae encode` (latent cache) and `fae sample` (images from a generator). Parsing only; the work is in
fae.data.latents and fae.sampling."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fae.config import ConfigError, apply_overrides, from_dict, section_overrides, yaml_section
from fae.precision import PRECISIONS
from fae.speed import COMPILE_MODES

if TYPE_CHECKING:
    from fae.generators import Generator
    from fae.sampling import Decoder


def _tokenizer_help() -> str:
    from fae.tokenizers import tokenizer_kinds

    return (f"<kind>:<hub id or folder> (kinds: {', '.join(tokenizer_kinds())}; e.g. sd-vae:stabilityai/sd-vae-ft-ema), "
            "or a folder one kind recognises (docs/tokenizers.md)")


def _cmd_encode(args: argparse.Namespace) -> int:
    from fae.data import DataConfig
    from fae.distributed import init_distributed
    from fae.encoders import EncoderConfig, TextEncoderConfig
    from fae.encoding import EncodeOptions, encode_latents

    init_distributed()
    data = from_dict(DataConfig, apply_overrides(yaml_section(args.data, "data", missing="top_level"),
                                                     section_overrides(args.overrides, "data")), "data")
    encoder = None
    if args.encoder:
        encoder = from_dict(EncoderConfig, yaml_section(args.encoder, "encoder", missing="top_level"), "encoder")
    opts = EncodeOptions(source=args.source, flip=not args.no_flip, store_std=args.store_std,
                         shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                         num_workers=args.num_workers, precision=args.precision)
    text = None
    if args.text_encoder:
        text = TextEncoderConfig(kind=args.text_encoder, name_or_path=args.text_model, max_length=args.text_max_length)
    out = encode_latents(data, args.out, fae=args.fae, encoder=encoder, split=args.split, options=opts,
                         device=args.device, progress=not args.no_progress, feature_cache=args.feature_cache,
                         text_encoder=text, tokenizer=args.tokenizer)
    from fae.distributed import is_main

    if is_main():
        print(f"latent cache: {out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from fae.distributed import init_distributed, is_main, resolve_device
    from fae.sampling import sample_to_dir, sampler_config
    from fae.stages import load_run_generator

    init_distributed()
    device = str(resolve_device(args.device))
    sampler = sampler_config(args.guidance, args.sampler, args.steps, args.time_shift, args.guidance_channels,
                             args.cfg_batch, denoise=not args.no_denoise, flow=args.flow or (), rtol=args.rtol,
                             atol=args.atol)
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    gen, decode = generator_and_decoder(args, device, "fae sample")
    if args.guidance_model:   # autoguidance: loaded like --generator, checked to share its latent space and conditions
        gen.set_guide(load_run_generator(args.guidance_model, device=device))
    written = sample_to_dir(gen, decode, args.out, args.num_samples, seed=args.seed, labels=args.labels,
                            sampler=sampler, batch_size=args.batch_size, device=device, progress=not args.no_progress,
                            grid=not args.no_grid, pngs=not args.no_pngs, npz=not args.no_npz, per_row=args.per_row,
                            precision=args.precision, prompts=prompts or None, compile=args.compile)
    if is_main():
        for kind, path in written.items():
            print(f"{kind}: {path}")
    return 0


def generator_and_decoder(args: argparse.Namespace, device: str, command: str) -> tuple[Generator, Decoder]:
    """The generator and its way to pixels from --pipeline, or from --generator with --fae / --pixel-decoder /
    --tokenizer (the flags `fae sample` and `fae eval t2i` share)."""
    from fae.pipeline import GenerationPipeline
    from fae.sampling import load_decoder
    from fae.stages import load_run_generator

    if args.pipeline:
        if args.generator or args.fae or args.pixel_decoder or args.tokenizer:
            raise ConfigError("--pipeline holds the generator and the tokenizer: drop --generator/--fae/"
                              "--pixel-decoder/--tokenizer")
        pipe = GenerationPipeline.from_pretrained(args.pipeline, device=device)
        pipe.tokenizer.compile_networks(args.compile, device)
        return pipe.generator, pipe.tokenizer.decode
    if not args.generator:
        raise ConfigError(f"{command}: give --pipeline <folder>, or --generator <run> with --fae <pixel-decoder "
                          "fine-tune run>")
    gen = load_run_generator(args.generator, device=device)
    return gen, load_decoder(gen, fae=args.fae, pixel_decoder=args.pixel_decoder, device=device,
                             compile=args.compile, tokenizer=args.tokenizer)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from fae.pipeline import GenerationPipeline

    pipe = GenerationPipeline.assemble(args.generator, fae=args.fae, pixel_decoder=args.pixel_decoder,
                                       tokenizer=args.tokenizer)
    print(f"pipeline: {pipe.save_pretrained(args.out)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    tokenizer_help = _tokenizer_help()
    p = sub.add_parser("encode", help="encode a data set into a latent cache (for `fae train dit`)",
                       description="Run the frozen encoder and the FAE encoder once over a data set (plain and "
                       "h-flipped images) and write safetensors shards with labels and exact per-channel "
                       "statistics. Re-running resumes: finished shards are kept. Works under torchrun.")
    p.add_argument("--fae", help="the stage-1 FAE run folder or bundle (e.g. runs/fae); its recorded frozen encoder "
                   "is used")
    p.add_argument("--tokenizer", help=f"any latent space instead of --fae: {tokenizer_help}")
    p.add_argument("--data", required=True, help="YAML with a data: section (e.g. the FAE training config) or "
                   "DataConfig fields")
    p.add_argument("--encoder", help="YAML with an encoder: section; default: the encoder the FAE bundle records")
    p.add_argument("--split", help="data split (default: the config's)")
    p.add_argument("--feature-cache", help="a feature cache file of the same encoder and data (stage 1's: "
                   "features-<hash>.safetensors under the stage's feature_cache_dir, by default ~/.cache/fae/features, "
                   "or $FAE_CACHE/features): its features are used instead of running the encoder")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--source", choices=["fae", "raw_features"], default="fae",
                   help="fae: FAE posterior means; raw_features: the frozen encoder's features as (D, h, w)")
    p.add_argument("--no-flip", action="store_true", help="do not store latents of flipped images")
    p.add_argument("--store-std", action="store_true", help="also store the posterior std (sample at train time)")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--num-workers", type=int, default=0, help="data loading processes (kept alive for the run)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto", help="the FAE encoder's compute: auto = "
                   "bf16 where the device runs it natively, else fp32 (the frozen encoder follows its own config)")
    p.add_argument("--text-encoder", choices=["minilm", "t5", "siglip2"],
                   help="caption data (kind: caption_folder | caption_manifest | webdataset): also cache the "
                   "captions' text embeddings, for `fae train mmdit` (minilm ships with fae and works offline)")
    p.add_argument("--text-model", help="text encoder hub id or local folder (default: the shipped MiniLM; "
                   "google/flan-t5-xl for t5)")
    p.add_argument("--text-max-length", type=int, default=None,
                   help="tokens per caption (padded/truncated; default: 64 for siglip2, as trained, else 32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="data overrides key=value (or data.key=value), e.g. limit=1000 "
                   "data.root=my-images")
    p.set_defaults(func=_cmd_encode)

    from fae.generators import families
    from fae.transport import SAMPLER_METHODS

    names = ", ".join(families())
    p = sub.add_parser("sample", help=f"generate images with a trained generator ({names})",
                       description=f"Sample latents with a trained generator (families: {names}; class labels, or "
                       "--prompt for a text generator), decode them to pixels and write a labelled "
                       "grid.png, images/*.png and samples.npz (arr_0: uint8 NHWC, for the ADM evaluator). Under "
                       "torchrun the work is split across processes with identical results.")
    p.add_argument("--pipeline", help="a generation pipeline folder (generator + FAE pipeline, e.g. runs/demo/pipeline)")
    p.add_argument("--generator", "--dit", dest="generator",
                   help=f"a generator bundle or `fae train <family>` run folder ({names}; an unfinished run: its "
                   "newest EMA weights). --dit is the same flag's older name")
    p.add_argument("--prompt", action="append", help="text generator: a prompt (repeat for several); sample i gets "
                   "prompt i mod P, one grid row per prompt")
    p.add_argument("--prompts", help="text generator: a file with one prompt per line")
    p.add_argument("--fae", help="with --generator: the pixel-decoder fine-tune run (or its tokenizer/ bundle), or the "
                   "stage-1 FAE run, the generator was trained on (checked by the SHA-256 of its weights); for a "
                   "flow also a stage-1 run noise-tuned for it (latent_noise_flow; with --no-denoise, docs/flow.md)")
    p.add_argument("--pixel-decoder", help="pixel decoder bundle (when --fae has none, or for raw-feature latents)")
    p.add_argument("--tokenizer", help="with --generator, for latents of another latent space than an FAE: "
                   f"{tokenizer_help}; default: the one the generator's bundle records (identity-checked)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-n", "--num-samples", type=int, default=100)
    p.add_argument("--labels", default="equal", help="equal (sample i gets class i mod K) | random | ids like 0,3,7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["auto", *SAMPLER_METHODS], default="auto",
                   help="auto: Euler-Maruyama SDE without guidance, Euler ODE with it (the paper's protocol); "
                   "dpmpp_2m: DPM-Solver++(2M) multistep; dopri5: adaptive, --steps unused (docs/diffusion.md)")
    p.add_argument("--rtol", type=float, default=1e-3, help="dopri5: relative tolerance per sample (default 1e-3)")
    p.add_argument("--atol", type=float, default=1e-6, help="dopri5: absolute tolerance per sample (default 1e-6)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--guidance", default="none", help="none | paper (0.9 on t in [0.9,1], 2.5 on [0,0.7]) | "
                   "paper-text (1.5 on [0,0.9], the MMDiT's) | a scale "
                   "for all t | 't_min-t_max:scale,...' | starflow:W. A scale s is fae's: 1 = conditional, "
                   "uncond + s (cond - uncond); ml-starflow's cfg W is s = 1 + W, so its cfg 2.5 is 3.5 here "
                   "or starflow:2.5 (docs/flow.md)")
    p.add_argument("--guidance-model", metavar="RUN",
                   help="autoguidance (Karras et al. 2024): a smaller or less-trained generator run or bundle of the "
                   "same family, latent space and conditions; --guidance's scales then weigh the main model against "
                   "it (v_guide + s (v_main - v_guide)) instead of against the unconditional branch")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first N channels (3 = the DiT/SiT code's legacy behaviour); default all")
    p.add_argument("--time-shift", type=float, default=None, help="the paper's s; default: the training value")
    p.add_argument("--cfg-batch", choices=["auto", "concat", "separate"], default="auto",
                   help="run conditional/unconditional as one batch or two calls; auto: one batch on a GPU, on a "
                        "CPU whichever this machine measured faster (docs/speed.md)")
    p.add_argument("--no-denoise", action="store_true",
                   help="flows: skip STARFlow's score-based denoising step after sampling (as ml-starflow does "
                        "when --fae is a decoder noise-tuned for the flow)")
    p.add_argument("--flow", action="append", metavar="KEY=VALUE",
                   help="flows: override one of the bundle's sampling switches (repeat): guide_top, "
                   "annealed_guidance, attention_temperature, jacobi, jacobi_block_size, jacobi_max_iter, "
                   "jacobi_tolerance; e.g. --flow jacobi=true (docs/flow.md)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto (default): bf16 autocast where the device runs bf16 natively, else fp32")
    p.add_argument("--compile", choices=list(COMPILE_MODES), default="auto",
                   help="torch.compile the generator and decoders: auto (default) = on CUDA, off on CPU (docs/speed.md)")
    p.add_argument("--per-row", type=int, default=10, help="samples per class row in grid.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--no-pngs", action="store_true")
    p.add_argument("--no-npz", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("pipeline", help="put a trained generator and its tokenizer into one pipeline folder",
                       description="Write a generation pipeline folder (GenerationPipeline: tokenizer/ + generator/) "
                       "from a finished generator run and the tokenizer its latents came from, checked to be the one "
                       "it was trained on. `fae sample --pipeline <folder>` then needs nothing else.")
    p.add_argument("--generator", required=True, help=f"a finished generator run or bundle ({names})")
    p.add_argument("--fae", help="the pixel-decoder fine-tune run (or its tokenizer/ bundle), or a stage-1 FAE run "
                   "with --pixel-decoder")
    p.add_argument("--pixel-decoder", help="with a stage-1 --fae: its pixel-decoder run or bundle")
    p.add_argument("--tokenizer", help=f"another latent space: {tokenizer_help}; default: the one the generator "
                   "records")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--no-progress", action="store_true", help="accepted like every command's (nothing here shows a bar)")
    p.set_defaults(func=_cmd_pipeline)
