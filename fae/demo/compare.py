"""`fae demo --compare`: the paper's baselines in miniature. Beside the FAE and the raw encoder features (the RAE-style
baseline) the demo trains a small KL autoencoder with SD-VAE's architecture (diffusers `AutoencoderKL`,
configs/demo/kl_vae.yaml: 8x8x8 latents, the FAE's shape) on the same images, encodes them through the tokenizer
interface, and trains the same DiT on it. On each latent space, the same measurements: reconstruction (PSNR, FD),
guided and unguided class-agreement and FD, a linear probe on the latent, and class-agreement against training step
(the paper's convergence claim: each DiT scores itself every 250 steps, eval.every). With --flow also the same STARFlow on
each (held-out bits/dim, class-agreement and FD). An experiment: the report shows what comes out, including where
FAE loses; every seed is fixed.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from fae.data.loading import num_items
from fae.demo.steps import Step, _dit, _flow, _score, _scoring

SPACES = {"fae": "FAE latents (8x8x8)", "kl": "KL-VAE latents (8x8x8, SD-VAE architecture)",
          "raw": "raw features (8x8x128, RAE-style)"}
RUNS = {"fae": "dit", "kl": "dit-kl", "raw": "dit-raw"}
KNOBS: dict[str, dict[str, Any]] = {
    "default": {"kl-vae": [], "recon_images": 1000, "probe": {"train_limit": 5000, "test_limit": 2000},
                "curve_samples": 200},
    "quick": {"kl-vae": ["data.limit=512", "train.steps=20", "train.checkpoint_every=20", "train.log_every=10",
                         "optim.warmup_steps=2", "eval.limit=64"],
              "recon_images": 100, "probe": {"train_limit": 300, "test_limit": 100}, "curve_samples": 20},
}


def _knobs(ctx: Any) -> dict[str, Any]:
    return KNOBS["quick" if ctx.quick else "default"]


def _kl_tokenizer(ctx: Any) -> str:
    return f"sd-vae:{ctx.out / 'kl-vae' / 'kl-vae'}"   # the stage exports a plain diffusers AutoencoderKL folder


def step_kl_vae(ctx: Any) -> dict[str, Any]:
    """A small AutoencoderKL (SD-VAE's architecture: conv encoder/decoder, KL posterior) on the demo images."""
    import json

    run = ctx.train("kl-vae", "kl_vae.yaml", "kl-vae", _knobs(ctx)["kl-vae"])
    recon = run / "recon.json"
    return {"run": str(run), **(json.loads(recon.read_text()) if recon.is_file() else {})}


def step_kl_latents(ctx: Any) -> dict[str, Any]:
    """Its latents of the training images (plain + flipped) through `encode_latents(tokenizer=...)`: the cache
    format, statistics and flips every latent space gets."""
    from fae.encoding import EncodeOptions, encode_latents

    data = replace(ctx.data_config(), hflip=False, limit=ctx.profile["latent_limit"])
    out = ctx.out / "latents" / "kl"
    encode_latents(data, out, tokenizer=_kl_tokenizer(ctx), split="train", progress=ctx.progress, device="cpu",
                   options=EncodeOptions(shard_size=20000, batch_size=500))
    return {"kl": str(out)}


def step_dit_kl(ctx: Any) -> dict[str, Any]:
    """The same DiT, budget and seed as on the FAE latents."""
    return _dit(ctx, "dit-kl", ctx.results["kl-latents"]["kl"], f"eval.decoder={_kl_tokenizer(ctx)}")


def _decoders(ctx: Any) -> dict[str, Any]:
    """Each space's way back to pixels: FAE and KL through their tokenizers, raw features through the Gaussian
    pixel decoder (the same decoders the samples use)."""
    from fae.models.pixel_decoder import PixelDecoder
    from fae.tokenizers import load_tokenizer

    fae = load_tokenizer(ctx.out / "pixel-decoder-ft")
    kl = load_tokenizer(_kl_tokenizer(ctx))
    pd = PixelDecoder.from_pretrained(ctx.out / "pixel-decoder" / "pixel_decoder").eval()
    return {"fae": fae, "kl": kl, "raw": pd}


def _reconstruction(ctx: Any, scoring: dict[str, Any], nets: dict[str, Any]) -> dict[str, Any]:
    """PSNR and FD (frozen-encoder space) of image -> latent -> image on held-out test images."""
    from torch.utils.data import Subset

    from fae.data import build_dataset
    from fae.metrics.reconstruction import evaluate_reconstructions, recon_fd

    test = build_dataset(replace(ctx.data_config(), hflip=False, limit=None), "test")
    test = Subset(test, range(min(_knobs(ctx)["recon_images"], num_items(test))))
    encoder = nets["fae"].encoder

    def reconstruct(x: Any) -> dict[str, Any]:
        return {"fae": nets["fae"].decode(nets["fae"].encode(x)), "kl": nets["kl"].decode(nets["kl"].encode(x)),
                "raw": nets["raw"].decode(encoder(x).float())}

    scores = evaluate_reconstructions(reconstruct, test, "cpu", scoring["network"], out_dir=ctx.out / "compare")
    return {k: {"psnr": v["psnr"], "ssim": v["ssim"], "fd": (recon_fd(v) or (None, None))[1]}
            for k, v in scores["decoders"].items()}


def _latents_of(ctx: Any, nets: dict[str, Any], split: str, limit: int) -> tuple[dict[str, Any], Any]:
    import torch

    from fae.data import build_dataset
    from fae.data.readable import readable_batches

    data = build_dataset(replace(ctx.data_config(), hflip=False, limit=limit), split)
    parts: dict[str, list[Any]] = {k: [] for k in SPACES}
    labels = []
    with torch.no_grad():
        for batch in readable_batches(data, 250):
            x = batch["image"]
            features = nets["fae"].encoder(x).float()
            parts["fae"].append(nets["fae"].autoencoder.encode(features).mode())
            parts["kl"].append(nets["kl"].encode(x))
            parts["raw"].append(features)
            labels.append(batch["label"])
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels)


def _probes(ctx: Any, nets: dict[str, Any]) -> dict[str, Any]:
    """A linear probe on each latent (the same protocol as the demo's probe step)."""
    from fae.metrics.probe import linear_probe

    knobs = _knobs(ctx)["probe"]
    train, ytr = _latents_of(ctx, nets, "train", knobs["train_limit"])
    test, yte = _latents_of(ctx, nets, "test", knobs["test_limit"])
    out: dict[str, Any] = {"train_images": len(ytr), "test_images": len(yte)}
    for space in SPACES:
        r = linear_probe(train[space], ytr, test[space], yte)
        out[space] = {"top1": r.top1, "pooling": r.best_pooling}
    return out


def step_compare(ctx: Any) -> dict[str, Any]:
    """The KL DiT sampled as the others were (section 4's sampler, seeds and judge), then every measurement on
    all three spaces, with each part's time."""
    from fae.sampling import load_decoder
    from fae.stages import load_run_generator
    from fae.transport import GuidanceSchedule, SamplerConfig

    p, times = ctx.profile, {}
    scoring = _scoring(ctx)
    nets = _decoders(ctx)
    begin = time.time()
    generation: dict[str, Any] = {}
    gen = load_run_generator(ctx.out / "dit-kl")
    decode = load_decoder(gen, tokenizer=nets["kl"])   # the one loaded above, checked against the bundle's record
    for g_name, schedule in {"no_guidance": GuidanceSchedule(), "guidance": GuidanceSchedule.parse(p["guidance"])}.items():
        sampler = SamplerConfig(method="euler", steps=p["sample_steps"], guidance=schedule)
        folder = ctx.out / "samples" / f"kl-{g_name.replace('_', '-')}"
        generation[f"kl/{g_name}"] = _score(ctx, scoring, gen, decode, sampler, folder, p["samples"])
    for key, value in ctx.results["samples"].items():
        if key.startswith(("fae/", "raw/")):
            generation[key] = value
    times["samples_kl"] = time.time() - begin
    parts = {"reconstruction": lambda: _reconstruction(ctx, scoring, nets), "probe": lambda: _probes(ctx, nets)}
    out: dict[str, Any] = {"generation": generation, "num_samples": p["samples"], "guidance": p["guidance"]}
    for name, run in parts.items():
        begin = time.time()
        out[name] = run()
        times[name] = time.time() - begin
    out["curves"] = {space: ctx.results[run].get("curve", []) for space, run in RUNS.items()}   # eval.every rows
    out["seconds_by_part"] = {k: round(v, 1) for k, v in times.items()}
    out["recon_grid"] = str(ctx.out / "compare" / "recon_grid.png")
    out["recon_images"] = _knobs(ctx)["recon_images"]
    return out


def step_flow_kl(ctx: Any) -> dict[str, Any]:
    """With --flow: the same STARFlow, budget and seed as on the FAE latents."""
    return _flow(ctx, "flow-kl", ctx.results["kl-latents"]["kl"])


def step_flow_compare(ctx: Any) -> dict[str, Any]:
    """The KL flow sampled as `flow-samples` sampled the others (exact inverse + denoising step, flow guidance);
    held-out bits/dim of all three."""
    from fae.generators import load_generator
    from fae.sampling import load_decoder
    from fae.transport import GuidanceSchedule, SamplerConfig

    p = ctx.profile
    scoring = _scoring(ctx)
    gen = load_generator(ctx.out / "flow-kl")
    decode = load_decoder(gen)
    out: dict[str, Any] = {k: v for k, v in ctx.results["flow-samples"].items() if k.startswith(("fae/", "raw/"))}
    for g_name, schedule in {"no_guidance": GuidanceSchedule(),
                             "guidance": GuidanceSchedule.parse(p["flow_guidance"])}.items():
        folder = ctx.out / "samples" / f"flow-kl-{g_name.replace('_', '-')}"
        out[f"kl/{g_name}"] = _score(ctx, scoring, gen, decode, SamplerConfig(guidance=schedule), folder,
                                     p["flow_samples"])
    out["heldout_bpd"] = {space: ctx.results[run].get("heldout_bpd")
                          for space, run in {"fae": "flow", "kl": "flow-kl", "raw": "flow-raw"}.items()}
    out["num_samples"], out["guidance"] = p["flow_samples"], p["flow_guidance"]
    return out


COMPARE_STEPS = [
    Step("kl-vae", "KL autoencoder with SD-VAE's architecture (baseline tokenizer)", step_kl_vae),
    Step("kl-latents", "latent cache through the KL tokenizer", step_kl_latents),
    Step("dit-kl", "DiT on KL-VAE latents (baseline)", step_dit_kl),
    Step("compare", "the three latent spaces side by side", step_compare),
]
FLOW_COMPARE_STEPS = [   # --compare --flow: after the flow steps (fae.demo.steps.FLOW_STEPS)
    Step("flow-kl", "STARFlow on KL-VAE latents (baseline)", step_flow_kl),
    Step("flow-compare", "the three latent spaces under STARFlow", step_flow_compare),
]
