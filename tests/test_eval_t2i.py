"""`fae eval t2i` end to end on tiny models of the real classes: a caption folder, a tiny MMDiT trained on it
(`fae train mmdit`), a tiny transformers CLIPModel saved with save_pretrained (CLIPTokenizer + CLIPImageProcessor).
FID machinery, CLIP score against transformers' own forward, the caption subset rule and the input errors."""
from __future__ import annotations

import json
import shutil
import string

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from fae.cli import main
from fae.config import ConfigError
from fae.evaluation import caption_pairs, choose_captions, t2i_reference_source
from fae.generators import load_generator
from fae.io import state_dict_sha256
from fae.metrics.clip_score import ClipScorer
from fae.transport import GuidanceSchedule, SamplerConfig

# a Fréchet distance of 3-6 samples in 32-d is rank deficient by design here; frechet.py says so each time
pytestmark = pytest.mark.filterwarnings("ignore:only .* samples for:UserWarning")

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (240, 230, 20),
           "white": (250, 250, 250), "black": (5, 5, 5)}


def save_tiny_clip(directory) -> None:
    """A CLIPModel of width 32 (one layer per tower, 32 px images in patches of 8), a CLIPTokenizer whose BPE
    vocabulary is single letters and digits (each also as a word end, `x</w>`), and a CLIPImageProcessor at 32 px:
    the three things a hub CLIP folder holds, loaded the same way."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(directory)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_latent_world, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("eval-t2i")
    pairs = root / "pairs"
    pairs.mkdir()
    for name, colour in COLOURS.items():
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(pairs / f"{name}.png")
        (pairs / f"{name}.txt").write_text(f"a {name} square")
    data = root / "data.yaml"
    data.write_text(f"data: {{kind: caption_folder, root: {pairs}, image_size: 16}}\n")
    assert main(["encode", "--fae", str(tiny_latent_world["fae"]), "--data", str(data), "--out", str(root / "cache"),
                 "--text-encoder", "minilm", "--text-max-length", "8", "--no-progress"]) == 0
    cfg = root / "mmdit.yaml"
    cfg.write_text(f"""
stage: mmdit
latents: {root / 'cache'}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, depth: 1, num_heads: 2, text_dim: 384, text_tokens: 8,
         caption_dropout: 0.2}}
optim: {{lr: 1.0e-2}}
train: {{steps: 3, batch_size: 6, checkpoint_every: 3, log_every: 3, ema_decay: 0.0, seed: 1}}
""")
    assert main(["train", "mmdit", "--config", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    save_tiny_clip(root / "clip")
    common = ["eval", "t2i", "--generator", str(root / "run"), "--fae", str(tiny_latent_world["pipeline"]),
              "--clip", str(root / "clip"), "--steps", "2", "--network", f"encoder:{tiny_encoder_dir}", "--no-cache",
              "--device", "cpu", "--no-progress"]
    return dict(root=root, pairs=pairs, common=common, pipeline=tiny_latent_world["pipeline"])


@pytest.fixture(scope="module")
def first(world, tmp_path_factory):
    """One run over the whole caption set, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("first")
    return {"out": out, "report": run_t2i(world, out)}


def run_t2i(world, out, *extra) -> dict:
    assert main([*world["common"], "--captions", str(world["pairs"]), "--out", str(out), *extra]) == 0
    return json.loads((out / "t2i.json").read_text())


def direct_clip_scores(clip_dir, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """The cosine of each pair through CLIPModel.forward and CLIPProcessor, as transformers documents it."""
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    processor = transformers.CLIPProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(clip_dir),
                                           tokenizer=transformers.AutoTokenizer.from_pretrained(clip_dir))
    with torch.no_grad():
        out = model(**processor(text=captions, images=list(images), return_tensors="pt", padding=True))
    return (out.image_embeds * out.text_embeds).sum(-1).double().numpy()


def test_t2i_writes_fid_and_clip_score_as_transformers_computes_it(world, first):
    report = first["report"]
    samples = np.load(first["out"] / "samples.npz")
    captions = [f"a {name} square" for name in sorted(COLOURS)]   # the folder's pairs in sorted order
    assert samples["arr_0"].shape == (6, 16, 16, 3) and samples["labels"].tolist() == list(range(6))
    assert (first["out"] / "grid.png").is_file() and not (first["out"] / ".chunks").exists()
    cos = direct_clip_scores(world["root"] / "clip", samples["arr_0"], captions)
    assert (cos < 0).any() and (cos > 0).any()   # so the clamp at 0 is exercised
    expected = 100 * np.clip(cos, 0, None)
    assert report["metrics"]["clip_score"] == pytest.approx(expected.mean(), rel=1e-5, abs=1e-6)
    assert report["metrics"]["clip_score_std"] == pytest.approx(expected.std(), rel=1e-5, abs=1e-6)
    assert report["metrics"]["fd_encoder"] > 0 and report["num_samples"] == 6
    clip = report["protocol"]["clip_score"]["model"]
    assert clip["class"] == "CLIPModel" and clip["name_or_path"] == str(world["root"] / "clip")
    assert clip["weights_sha256"] == state_dict_sha256(transformers.CLIPModel.from_pretrained(world["root"] / "clip"))
    sampling = report["protocol"]["sampling"]
    assert sampling["sampler"]["method"] == "euler" and sampling["sampler"]["steps"] == 2   # guidance on: the ODE
    assert sampling["sampler"]["guidance"]["intervals"] == [{"t_min": 0.0, "t_max": 0.9, "scale": 1.5}]
    assert len(report["inputs"]["generator"]["weights_sha256"]) == 64
    # the scorer per pair (batches of 4 and 2: padding differs between them) against the direct computation
    scorer = ClipScorer.load(str(world["root"] / "clip"))
    assert np.allclose(scorer.scores(samples["arr_0"], captions, batch_size=4), expected, atol=1e-4)


def test_samples_are_fae_samples_of_the_captions_and_the_prompt_cache_is_bounded(world, first, tmp_path):
    """Sample i is what `fae sample` makes from caption i with the same seed and settings (the per-sample noise
    rule); the generator keeps only its `prompt_cache_size` most recent prompts' encodings on the device, so 30K
    captions do not pile up there, and a cached prompt gives what a fresh encoding gives."""
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a {name} square" for name in sorted(COLOURS)) + "\n")
    assert main(["sample", "--generator", str(world["root"] / "run"), "--fae", str(world["pipeline"]), "--out",
                 str(tmp_path / "s"), "--prompts", str(captions), "-n", "6", "--steps", "2", "--guidance",
                 "paper-text", "--batch-size", "4", "--no-progress", "--no-pngs", "--device", "cpu"]) == 0
    plain = np.load(tmp_path / "s" / "samples.npz")["arr_0"].astype(int)
    ours = np.load(first["out"] / "samples.npz")["arr_0"].astype(int)
    # equal up to the last bit's rounding to uint8 (chunks of 4 there, one of 6 here; other noise differs in most
    # pixels, by up to 8 levels in this grey tiny model)
    assert np.abs(plain - ours).max() <= 1 and (plain != ours).mean() < 0.01
    gen = load_generator(world["root"] / "run")
    gen.prompt_cache_size = 2
    noise, prompts = torch.randn(2, 4, 4, 4), ["a red square", "a blue square"]
    sampler = SamplerConfig(steps=2, guidance=GuidanceSchedule.paper_text())
    fresh = gen.sample(noise, prompts, sampler)
    gen.sample(noise, ["a green square", "a red square"], sampler)   # red is used again, blue is the oldest
    assert list(gen._prompts) == ["a green square", "a red square"]
    assert torch.allclose(gen.sample(noise, prompts, sampler), fresh, atol=1e-5)   # red cached, blue encoded again


def test_samples_equal_to_their_references_give_zero_fid(world, first, tmp_path):
    """The caption set's images replaced by the very samples the generator makes for them: the Fréchet distance
    drops to ~0 (same features on both sides), while the original images are far away. A reference read at another
    size, from other files, or compared in another space would break this."""
    same = tmp_path / "same"
    shutil.copytree(world["pairs"], same)
    images = np.load(first["out"] / "samples.npz")["arr_0"]
    for name, image in zip(sorted(COLOURS), images, strict=True):
        Image.fromarray(image).save(same / f"{name}.png")
    assert main([*world["common"], "--captions", str(same), "--out", str(tmp_path / "b")]) == 0
    zero = json.loads((tmp_path / "b" / "t2i.json").read_text())["metrics"]["fd_encoder"]
    assert abs(zero) < 1e-3 * first["report"]["metrics"]["fd_encoder"]
    # N = 3 of a seeded permutation, against only those three references: samples 0..2 of the same noise
    subset = run_t2i(world, tmp_path / "c", "-n", "3", "--subset-seed", "5", "--reference-images", "chosen")
    assert subset["num_samples"] == 3 and subset["protocol"]["captions"]["selection"].startswith("first 3 of")
    captions = [f"a {name} square" for name in sorted(COLOURS)]
    prompts = json.loads((tmp_path / "c" / "samples.json").read_text())["prompts"]
    assert prompts == [captions[i] for i in choose_captions(6, 3, 5)] and prompts != captions[:3]
    assert subset["inputs"]["reference"]["num_samples_stats"] == 3   # only the chosen pairs' images


def test_a_siglip_model_scores_through_the_same_path(tmp_path):
    """AutoModel loads a SigLIP folder (Gemma tokenizer, as SigLIP2's) into the scorer; its text is padded to the
    full length without a mask, as SigLIP was trained, and the cosines equal SiglipModel.forward's on those inputs."""
    from fae.encoders.text import tiny_gemma_tokenizer

    tokenizer = tiny_gemma_tokenizer()
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, **special)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    scorer = ClipScorer.load(str(tmp_path))
    assert scorer.model_type == "siglip" and scorer.max_length == 16
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    captions = ["a red square", "b", "a much longer caption than sixteen tokens"]
    ids = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    pixels = scorer.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    expected = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()
    assert np.allclose(scorer.cosines(images, captions, batch_size=2), expected, atol=1e-5)
    assert np.array_equal(scorer.scores(images, captions), 100 * np.clip(scorer.cosines(images, captions), 0, None))


def test_caption_choice_is_first_n_or_a_seeded_prefix(world):
    assert choose_captions(10, 4, None) == [0, 1, 2, 3] and choose_captions(10, None, None) == list(range(10))
    big, small = choose_captions(100, 30, 7), choose_captions(100, 10, 7)
    assert small == big[:10] and len(set(big)) == 30 and big != list(range(30))
    assert choose_captions(100, 10, 8) != small
    with pytest.raises(ConfigError, match="has 10 pairs"):
        choose_captions(10, 11, None)
    red, blue = str(world["pairs"] / "red.png"), str(world["pairs"] / "blue.png")   # an image with two captions
    source = t2i_reference_source([(red, "a red square"), (blue, "blue"), (red, "red again")], 16, "coco-like")
    assert source.num_images == 2 and next(source.batches(4)).shape == (2, 3, 16, 16)   # counted once


def test_webdataset_shards_are_a_caption_set_and_a_reference(world, tmp_path):
    """Tar shards (told by the path) give the pairs in order, and their images as the reference, each image once."""
    import io

    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as sink:
        for name in ("red", "blue"):
            buf = io.BytesIO()
            Image.open(world["pairs"] / f"{name}.png").save(buf, format="PNG")
            sink.write({"__key__": name, "png": buf.getvalue(), "txt": f"a {name} square"})
    pairs = caption_pairs(tmp_path / "shard-000.tar")
    assert [c for _, c in pairs] == ["a red square", "a blue square"] and pairs[0][0][1] == "red"
    images = next(t2i_reference_source(pairs + pairs[:1], 16, "shards").batches(8))
    assert images.shape == (2, 3, 16, 16) and images[0, 0].min() == 230 and images[1, 2].min() == 230


def test_bad_inputs_are_named(world, tmp_path, capsys):
    common = [a for a in world["common"]]
    at = common.index("--clip")
    missing_clip = [*common[:at + 1], str(tmp_path / "no-clip"), *common[at + 2:]]
    assert main([*missing_clip, "--captions", str(world["pairs"]), "--out", str(tmp_path / "x")]) == 1
    assert f"CLIP model folder {tmp_path / 'no-clip'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    not_a_model = [*common[:at + 1], str(tmp_path / "empty"), *common[at + 2:]]
    assert main([*not_a_model, "--captions", str(world["pairs"]), "--out", str(tmp_path / "x")]) == 1
    assert "config.json is missing" in capsys.readouterr().err
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(json.dumps({"image": str(world["pairs"] / "red.png"), "caption": "a red square"}) + "\n"
                        + json.dumps({"image": "gone.png", "caption": "a lost square"}) + "\n")
    assert main([*common, "--captions", str(manifest), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"caption set {manifest} names 1 image(s) that do not exist: {tmp_path / 'gone.png'}" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "a.txt").write_text("a broken square")
    shutil.copy(world["pairs"] / "red.png", tmp_path / "broken" / "b.png")
    (tmp_path / "broken" / "b.txt").write_text("a red square")
    with pytest.warns(RuntimeWarning):
        assert main([*common, "--captions", str(tmp_path / "broken"), "--out", str(tmp_path / "x")]) == 1
    assert "1 of its 2 reference images could not be read" in capsys.readouterr().err
    assert not (tmp_path / "x" / "samples.npz").exists()   # refused before any sampling
    assert main([*common, "--captions", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    assert f"caption set {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
