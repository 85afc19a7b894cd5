"""`fae demo --quick` runs every step end to end, records what the report needs, skips finished steps on a re-run,
resumes after a step is lost, and its report references only files that exist."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from margins import within

from fae.cli import main
from fae.demo import (
    REFERENCE_CALIBRATION,
    REFERENCE_SECONDS,
    STEPS,
    DemoContext,
    Forecast,
    calibration_step_seconds,
    step_classifier,
    step_encoder,
)
from fae.demo.html import referenced_images
from fae.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory):
    """A quick demo finished in <root>/runs/demo, with the repository's configs/ beside it: the layout the docs'
    commands assume when run from a checkout after `fae demo`. Yields (root, what the demo printed)."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "configs").symlink_to(REPO / "configs")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("FAE_CACHE", str(root / "cache"))
        assert main(["demo", "--quick", "--out", str(root / "runs" / "demo"), "--no-progress"]) == 0
    return root, printed.getvalue()


# Commands the docs and config headers show for use after `fae demo`, with the file that shows each. The test runs
# each one from the checkout against the finished demo, writing to a scratch folder (`out`) and at a tiny size.
QUICK_LATENT_STAGE = ["train.steps=2", "data.limit=512", "train.batch_size=16"]  # the quick demo's data limit
DOCUMENTED = [
    ("configs/demo/fae.yaml", "fae train fae --config configs/demo/fae.yaml --out runs/demo-fae",
     [*QUICK_LATENT_STAGE, "eval.limit=200"]),
    ("configs/demo/pixel_decoder.yaml",
     "fae train pixel-decoder --config configs/demo/pixel_decoder.yaml --out runs/demo/pixel-decoder",
     [*QUICK_LATENT_STAGE, "eval.limit=64"]),
    ("configs/demo/pixel_decoder_finetune.yaml",
     "fae train pixel-decoder --config configs/demo/pixel_decoder_finetune.yaml --out runs/demo/pixel-decoder-ft "
     "--finetune-from runs/demo/pixel-decoder --fae runs/demo/fae",
     [*QUICK_LATENT_STAGE, "eval.limit=64"]),
    ("configs/demo/dit.yaml",
     "fae encode --fae runs/demo/fae --data configs/demo/fae.yaml --out runs/demo/latents/fae", ["limit=32"]),
    ("docs/diffusion.md", "fae train dit --config configs/demo/dit.yaml --out runs/demo/dit",
     ["train.steps=2", "train.batch_size=16"]),
    ("docs/diffusion.md",
     "fae sample --generator runs/demo/dit --fae runs/demo/pixel-decoder-ft --out samples -n 1000 "
     "--guidance paper", ["-n", "4", "--steps", "2"]),
    ("docs/flow.md", "fae train flow --config configs/demo/flow.yaml --out runs/demo/flow",
     ["train.steps=2", "train.batch_size=16", "holdout=16"]),
    ("docs/diffusion.md", "fae sample --pipeline runs/demo/pipeline --out samples -n 1000 --guidance paper",
     ["-n", "4", "--steps", "2"]),
    ("docs/evaluation.md", "fae eval probe --encoder runs/demo/encoder",
     ["--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--out", "{out}/probe.json"]),
    ("docs/evaluation.md", "fae eval probe --fae runs/demo/fae --config configs/demo/fae.yaml --train-limit 20000",
     ["--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--out", "{out}/probe-fae.json"]),
]


def _documented(text: str) -> str:
    """A doc's text with shell line continuations joined and runs of spaces collapsed."""
    return " ".join(text.replace("\\\n", " ").replace("#", " ").split())


@pytest.mark.parametrize("doc,command,tiny", DOCUMENTED, ids=[c.split(" --")[0] for _, c, _ in DOCUMENTED])
def test_documented_commands_work_after_the_demo(finished_demo, tmp_path, monkeypatch, doc, command, tiny):
    root, _ = finished_demo
    assert command in _documented((REPO / doc).read_text()), f"{doc} no longer shows: {command}"
    args = command.split()[1:]
    if "--out" in args:  # write somewhere new: the demo's own run folders stay as the demo left them
        args[args.index("--out") + 1] = str(tmp_path / "out")
    monkeypatch.chdir(root)
    monkeypatch.setenv("FAE_CACHE", str(root / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))  # the default feature cache folder
    demo_caches = sorted((root / "runs" / "demo" / "feature_cache").iterdir())
    assert main([*args, *[t.format(out=tmp_path) for t in tiny], "--no-progress"]) == 0
    # the demo's configs, run by hand at the demo's data limit, reuse its feature cache: nothing new is encoded
    assert sorted((root / "runs" / "demo" / "feature_cache").iterdir()) == demo_caches
    assert not list((root / "xdg").rglob("*.safetensors")), "a hand-run built a second feature cache"


@pytest.mark.margin
def test_quick_demo_end_to_end(finished_demo, capsys, monkeypatch):
    root, printed = finished_demo
    monkeypatch.setenv("FAE_CACHE", str(root / "cache"))
    out = root / "runs" / "demo"
    assert "report:" in printed
    # it says what it chose and what to expect, then one line per step with the time left
    choice = resolve_precision("auto", "cpu")
    assert f"[demo] precision: {choice.name} (auto;" in printed and "[demo] estimate: about" in printed
    assert printed.count(" left") == len(STEPS)
    results = {s.name: json.loads((out / s.name / "done.json").read_text()) for s in STEPS}
    assert json.loads((out / "machine.json").read_text())["precision"] == choice.name

    # the frozen encoder is the shipped one, where the configs in configs/demo/ look for it
    assert results["encoder"]["origin"] == "shipped" and results["encoder"]["steps"] == 200
    assert (out / "encoder" / "config.json").is_file()
    assert results["fae"]["images"] == 200
    within("quick demo FAE feature cosine", results["fae"]["cos"], lo=0.5)
    decoders = results["finetune"]["decoders"]
    assert set(decoders) == {"gaussian(x)", "gaussian(x_hat)", "finetuned(x_hat)"}
    assert results["latents"]["feature_cache"] is not None  # stage 1's features were reused, not recomputed
    for run in ("dit", "dit-raw"):
        assert results[run]["loss_last"] < results[run]["loss_first"]
        # each DiT scored itself at its eval.every step (the convergence curve), guided like the samples below
        (point,) = results[run]["curve"]
        assert point["step"] == 30 and 0 <= point["class_agreement"] <= 1 and point["fd_encoder"] > 0
        assert 0 < results[run]["eval_overhead"] < 10
    samples = results["samples"]
    for key in ("fae/no_guidance", "fae/guidance", "raw/no_guidance", "raw/guidance"):
        assert 0 <= samples[key]["class_agreement"] <= 1 and samples[key]["fd_encoder"] > 0  # finite, not NaN
        assert Path(samples[key]["grid"]).is_file()
    for space in ("fae", "raw"):  # the quick run's numbers mean nothing, but guidance must change the samples
        assert samples[f"{space}/guidance"]["fd_encoder"] != samples[f"{space}/no_guidance"]["fd_encoder"]
    from fae.pipeline import GenerationPipeline  # the whole chain in one folder, sampled in one call
    pipe = GenerationPipeline.from_pretrained(samples["pipeline"])
    assert pipe.generate(3, progress=False).images.shape == (3, 32, 32, 3)
    inputs = [row["input"] for row in results["probe"]["rows"]]
    assert len(inputs) == 4 and inputs[-1].startswith("x at random")

    html = (out / "index.html").read_text()
    images = referenced_images(html)
    assert len(images) >= 8, images  # curves, reconstructions, four sample grids
    for src in images:
        assert (out / src).is_file(), src
    assert "report/dit_convergence.png" in images
    for needle in ("class-agreement", "raw features", "PSNR", "random initialisation", f"Precision: {choice.name}",
                   f"fae serve {out / 'pipeline'}"):
        assert needle in html

    # a re-run skips everything; losing one step's folder redoes only that step
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done before") == len(STEPS)
    shutil.rmtree(out / "encoder")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done before") == len(STEPS) - 1
    assert json.loads((out / "encoder" / "done.json").read_text())["origin"] == "shipped"


@pytest.mark.margin
def test_from_scratch_trains_the_encoder_once_and_the_judge(tmp_path, monkeypatch):
    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "cache"))
    first = DemoContext(out=tmp_path / "a", quick=True, progress=False, from_scratch=True)
    info = step_encoder(first)
    assert info["origin"] == "trained" and info["steps"] == 10
    assert (first.encoder_dir / "config.json").is_file() and (first.encoder_dir / "metrics.jsonl").is_file()
    again = step_encoder(DemoContext(out=tmp_path / "b", quick=True, progress=False, from_scratch=True))
    assert again["origin"] == "cache" and again["source"] == info["source"]
    judge = step_classifier(first)
    assert judge["origin"] == "trained" and judge["train_images"] == 2000
    within("judge trained from scratch, test accuracy", judge["test_accuracy"], lo=0.5)


def test_forecast_scales_by_calibration_then_by_observation():
    forecast = Forecast("default", calibration=2 * REFERENCE_CALIBRATION)
    steps = list(REFERENCE_SECONDS["default"])
    assert forecast.left(steps) == pytest.approx(2 * sum(REFERENCE_SECONDS["default"].values()))
    forecast.observe("fae", 3 * REFERENCE_SECONDS["default"]["fae"])  # the real work ran 3x slower
    assert forecast.left(["dit"]) == pytest.approx(3 * REFERENCE_SECONDS["default"]["dit"])
    assert calibration_step_seconds(steps=1) > 0


def test_quick_flow_demo_adds_the_flow_comparison(finished_demo, tmp_path, monkeypatch, capsys):
    """`fae demo --flow` on a finished demo folder: its prerequisites are skipped, the two flows train and are sampled
    guided and unguided, and one report shows the DiT and the flow sections."""
    from fae.generators import load_generator
    from fae.io import read_bundle_config

    root, _ = finished_demo
    monkeypatch.setenv("FAE_CACHE", str(root / "cache"))
    out = tmp_path / "demo"
    shutil.copytree(root / "runs" / "demo", out)
    assert main(["demo", "--quick", "--flow", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before") == 6 and "[demo 10/10] flow sampling" in printed
    flow = json.loads((out / "flow" / "done.json").read_text())
    assert flow["rows"] == 64 and flow["bpd_last"] < flow["bpd_first"]
    samples = json.loads((out / "flow-samples" / "done.json").read_text())
    # score step + FAE decoder, and STARFlow's default path: no score step, the decoder noise-tuned for this flow
    for key in ("fae/no_guidance", "fae/guidance", "fae-noise-tuned/no_guidance", "fae-noise-tuned/guidance",
                "raw/no_guidance", "raw/guidance"):
        assert 0 <= samples[key]["class_agreement"] <= 1 and samples[key]["fd_encoder"] > 0
        assert Path(samples[key]["grid"]).is_file() and samples[key]["sample_seconds_per_image"] > 0
    assert samples["fae-noise-tuned/guidance"]["fd_encoder"] != samples["fae/guidance"]["fd_encoder"]
    tuned = read_bundle_config(out / "flow-decoder" / "fae")
    assert tuned["latent_noise"]["noise_std"] == load_generator(out / "flow").noise_std == 0.3
    html = (out / "index.html").read_text()
    assert "STARFlow on FAE latents" in html and "DiT on FAE latents" in html
    assert html.count("no score step, noise-tuned FAE decoder") == 2
    for src in referenced_images(html):
        assert (out / src).is_file(), src


def test_quick_compare_demo_puts_a_kl_vae_beside_fae_and_raw_features(finished_demo, tmp_path, monkeypatch, capsys):
    """`fae demo --compare --flow` on a finished demo folder: the main steps are skipped; a KL autoencoder (SD-VAE's
    architecture) trains, its latents are cached through the tokenizer interface, the same DiT (and STARFlow) trains
    on them, and the report holds one table row per latent space (reconstruction, generation, probe), the agreement
    curve and the flow table."""
    from fae.generators import load_generator
    from fae.tokenizers import load_tokenizer

    root, _ = finished_demo
    monkeypatch.setenv("FAE_CACHE", str(root / "cache"))
    out = tmp_path / "demo"
    shutil.copytree(root / "runs" / "demo", out)
    assert main(["demo", "--quick", "--compare", "--flow", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before") == 10 and "[demo 14/20] the three latent spaces side by side" in printed
    assert "[demo 20/20] the three latent spaces under STARFlow" in printed
    cache = json.loads((out / "latents" / "kl" / "cache.json").read_text())
    kl = load_tokenizer(f"sd-vae:{out / 'kl-vae' / 'kl-vae'}")
    assert cache["source"] == "tokenizer" and cache["tokenizer"]["kind"] == "sd-vae"
    assert cache["tokenizer"]["sha256"] == kl.identity and cache["channels"] == 8 and cache["grid"] == [8, 8]
    origin = load_generator(out / "dit-kl").record.latents
    assert origin is not None and origin.tokenizer == "sd-vae" and origin.tokenizer_sha256 == kl.identity
    c = json.loads((out / "compare" / "done.json").read_text())
    for space in ("fae", "kl", "raw"):
        assert c["reconstruction"][space]["psnr"] > 5 and c["reconstruction"][space]["fd"] > 0
        for g in ("no_guidance", "guidance"):
            assert 0 <= c["generation"][f"{space}/{g}"]["class_agreement"] <= 1
        assert 0 <= c["probe"][space]["top1"] <= 1
        assert [p["step"] for p in c["curves"][space]] == [30]
    flow = json.loads((out / "flow-compare" / "done.json").read_text())
    assert load_generator(out / "flow-kl").record.latents.tokenizer_sha256 == kl.identity
    for space in ("fae", "kl", "raw"):
        assert flow["heldout_bpd"][space] > 0 and 0 <= flow[f"{space}/guidance"]["class_agreement"] <= 1
    html = (out / "index.html").read_text()
    assert "Latent spaces side by side" in html and "KL-VAE latents" in html and "STARFlow on" in html
    for src in referenced_images(html):
        assert (out / src).is_file(), src


def python_examples() -> list[tuple[str, int, str]]:
    """Every ```python block of the README and docs/*.md as (file, line, code), except those announced by a
    `<!-- example: not run (reason) -->` line (they need the hub, weights or data this machine lacks)."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "```python":
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if not before.startswith("<!-- example: not run ("):
                found.append((str(doc.relative_to(REPO)), i + 1, "\n".join(lines[i + 1:end])))
    return found


def test_the_documented_python_examples_run_after_the_demo(finished_demo, monkeypatch):
    root, _ = finished_demo
    monkeypatch.chdir(root)
    monkeypatch.setenv("FAE_CACHE", str(root / "cache"))
    examples = python_examples()
    assert len(examples) >= 6 and any(doc == "README.md" for doc, _, _ in examples)
    for doc, line, code in examples:
        try:
            exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": "example"})
        except Exception as exc:  # name the example, not only the line inside it
            raise AssertionError(f"the Python example at {doc}:{line} fails: {type(exc).__name__}: {exc}") from exc


def test_import_fae_offers_the_public_surface():
    import subprocess
    import sys

    code = "import sys, fae; assert 'torch' not in sys.modules; help(fae); print(fae.GenerationPipeline.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("GenerationPipeline", "FAE", "load_generator", "SamplerConfig", "register_family", "encode_latents"):
        assert name in done.stdout
    assert done.stdout.strip().endswith("fae.pipeline")


def test_emoji_renders_are_framed_then_jittered_and_seeded():
    from fae.demo.text import emoji_glyphs, emoji_renders

    glyphs = emoji_glyphs(3)
    assert len(glyphs) == 3 and len({name for _, name in glyphs}) == 3
    renders = emoji_renders(glyphs, 32, copies=4, seed=0)
    assert [name for _, name in renders] == [name for _, name in glyphs for _ in range(4)]  # glyph-major
    assert all(img.shape == (32, 32, 3) and img.dtype.name == "uint8" for img, _ in renders)
    framed = renders[0][0]
    assert framed.std(axis=2).mean() > 2  # colour, not a grey or empty glyph
    assert all(not np.array_equal(framed, img) for img, _ in renders[1:4])  # each copy scaled and shifted anew
    again = emoji_renders(glyphs, 32, copies=4, seed=0)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(renders, again, strict=True))
    held_out = emoji_renders(glyphs, 32, copies=4, seed=1, framed_first=False)  # the judge's ceiling check
    assert not any(np.array_equal(a, b) for (a, _), (b, _) in zip(renders, held_out, strict=True))


def test_quick_text_demo_reports_emoji_agreement_against_chance_and_the_judge(tmp_path, monkeypatch, capsys):
    from html import unescape

    from fae.demo.text import TEXT_PROFILES

    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo-text"
    assert main(["demo", "--text", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    profile = TEXT_PROFILES["quick"]
    data = json.loads((out / "text-data" / "done.json").read_text())
    assert data["emoji"] == profile["emoji"] and data["emoji_images"] == profile["emoji"] * profile["copies"]
    assert len(list((out / "text-data" / "emoji").glob("*.png"))) == data["emoji_images"]
    s = json.loads((out / "text-samples" / "done.json").read_text())
    emoji_prompts = [p for p in s["prompts"] if not p.startswith("a photo of")]
    assert len(emoji_prompts) == profile["prompts"]["emoji"]
    judge = s["judge_on_real_emoji"]
    assert judge["images"] == len(emoji_prompts) * profile["held_out_copies"] and 0 <= judge["top1"] <= judge["top5"]
    for v in s["results"].values():
        for kind in ("emoji", "fashion"):
            assert 0 <= v[f"{kind}_top1"] <= v[f"{kind}_top5"] <= 1
            # chance: the share of the training images carrying a prompt (each emoji has `copies` renders)
            assert v[f"{kind}_chance_top1"] < v[f"{kind}_chance_top5"] < 1
        assert v["emoji_chance_top1"] == pytest.approx(profile["copies"] / s["real_images"])
        assert Path(v["grid"]).is_file()
    assert "[demo] text-image agreement" in printed and "emoji" in printed.split("text-image agreement")[1]
    html = (out / "index.html").read_text()
    assert "emoji top-5" in html and "the judge's ceiling" in unescape(html)
    for src in referenced_images(html):
        assert (out / src).is_file(), src
