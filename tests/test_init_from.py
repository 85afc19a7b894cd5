"""`init_from` (`fae train STAGE --init-from RUN`, fae.init_from.initialise_from): a new run of any stage starts from
another run's weights (bundle or newest checkpoint; EMA where kept) with a fresh optimizer, LR schedule and step 0;
a different class count or text width re-initialises just those tensors, another latent shape is refused; run.json
records the source; and a resumed init-from run resumes from its own checkpoint, never from the source again."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fae.cli import main
from fae.config import ConfigError
from fae.init_from import InitRule, load_init_weights
from fae.io import checkpoint_dirs, file_sha256
from fae.stages import load_stage_config, run_config, stage_module, train_stage
from fae.training import Trainer

DIT = """stage: dit
latents: {cache}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, depth: 1, num_heads: 2, num_classes: {classes}}}
optim: {{lr: 1.0e-3}}
train: {{steps: {steps}, batch_size: 8, checkpoint_every: 2, log_every: 1, ema_decay: 0.9, seed: {seed}}}
"""


def write(path: Path, text: str, **fields: Any) -> Path:
    path.write_text(text.format(**fields))
    return path


def started(config: Path, out: Path, overrides: list[str]) -> Trainer:
    """A Trainer built as `fae train` builds it, before its first step."""
    name, cfg = load_stage_config(config, overrides)
    stage = stage_module(name).build(cfg)
    return Trainer(stage, cfg.train, out, run_config=run_config(name, cfg), progress=False)


def assert_starts_from(trainer: Trainer, module: str, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Live weights and EMA equal the source's, and nothing else of the source came along (step 0, no optimizer
    state, the LR schedule at its start)."""
    for held in (trainer.raw[module], trainer.ema[module].module):
        state = held.state_dict()
        assert {prefix + k for k in weights} == set(state)
        assert all(torch.equal(state[prefix + k], v) for k, v in weights.items())
    assert trainer.step == 0 and all(not o.state for o in trainer.optimizers.values())
    assert all(s.last_epoch == 0 for s in trainer.schedulers.values())


@pytest.fixture(scope="module")
def dit_source(tiny_latent_world, tmp_path_factory):
    """A finished DiT run (10 classes, 3 steps) and an unfinished one (checkpoint at step 2, no bundle)."""
    root = tmp_path_factory.mktemp("init-from-dit")
    cfg = write(root / "source.yaml", DIT, cache=tiny_latent_world["cache"], classes=10, steps=3, seed=1)
    train_stage("dit", load_stage_config(cfg)[1], root / "finished", progress=False)
    train_stage("dit", load_stage_config(cfg, ["train.steps=4"])[1], root / "unfinished", progress=False, stop_at=2)
    return root


def test_rules_reinitialise_a_whole_group_keep_always_tensors_and_refuse_other_shapes():
    def net(classes: int, width: int = 4) -> nn.Module:
        m = nn.Module()
        m.table, m.proj = nn.Embedding(classes + 1, width), nn.Linear(3, width)
        m.register_buffer("null", torch.full((2,), float(classes)))
        return m

    source, target = net(10).state_dict(), net(12)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    rules = [InitRule(("table.*",), "class count differs"), InitRule(("null",), "this run's", always=True)]
    reinit, kept = load_init_weights(target, source, rules, "t")
    assert reinit == {"table.weight": "class count differs: source (11, 4), this run (13, 4)"} and kept == ["null"]
    assert torch.equal(target.table.weight, fresh["table.weight"]) and torch.equal(target.null, fresh["null"])
    assert torch.equal(target.proj.weight, source["proj.weight"]) and torch.equal(target.proj.bias, source["proj.bias"])
    # a group is all or nothing: the bias of a re-initialised projection is not the source's either
    wide = nn.Linear(5, 4).state_dict()
    reinit, _ = load_init_weights(proj := nn.Linear(3, 4), wide, [InitRule(("*",), "text width differs")], "t")
    assert set(reinit) == {"weight", "bias"} and not torch.equal(proj.bias, wide["bias"])
    # without a rule a different shape, or a tensor on one side only, refuses the load and leaves the module as it was
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConfigError, match=r"table.weight: source \(11, 4\), this run \(13, 4\)"):
        load_init_weights(target, source, [], "init_from=x (model)")
    with pytest.raises(ConfigError, match=r"extra: source \(1,\), this run absent"):
        load_init_weights(target, {**target.state_dict(), "extra": torch.zeros(1)}, [], "t")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("which", ["finished", "bundle", "unfinished"])
def test_dit_starts_from_the_source_weights_at_step_zero(dit_source, tiny_latent_world, tmp_path, which):
    """A finished run or its bundle gives the bundle (EMA) weights, an unfinished run its newest checkpoint's EMA."""
    from fae.models.dit import DiT

    path = {"finished": dit_source / "finished", "bundle": dit_source / "finished" / "dit",
            "unfinished": dit_source / "unfinished"}[which]
    weights_file = (dit_source / "unfinished" / "checkpoints" / "step_00000002" / "model.ema.safetensors"
                    if which == "unfinished" else dit_source / "finished" / "dit" / "model.safetensors")
    cfg = write(tmp_path / "new.yaml", DIT, cache=tiny_latent_world["cache"], classes=10, steps=4, seed=7)
    trainer = started(cfg, tmp_path / "run", [f"init_from={path}"])
    assert_starts_from(trainer, "model", load_file(str(weights_file)))
    assert trainer.init_record is not None and trainer.init_record["files"]["model"] == {
        "path": str(weights_file), "sha256": file_sha256(weights_file),
        "weights": "ema" if which == "unfinished" else "exported"}
    assert trainer.init_record["source"] == ("checkpoint" if which == "unfinished" else "bundle")
    if which == "bundle":   # the first forward is the source's
        source = DiT.from_pretrained(path).eval()
        x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 3])
        with torch.no_grad():
            assert torch.equal(trainer.raw["model"].eval()(x, t, y), source(x, t, y))


def test_init_from_run_records_the_source_and_resumes_exactly_without_it(dit_source, tiny_latent_world, tmp_path):
    """Through the CLI: run.json names the source and its weights' SHA-256; the step and the optimizer count from 0;
    a run stopped at step 2 and resumed after the source has gone ends bit-identical to an uninterrupted one."""
    source = tmp_path / "source"
    shutil.copytree(dit_source / "finished", source)
    cfg = write(tmp_path / "new.yaml", DIT, cache=tiny_latent_world["cache"], classes=10, steps=4, seed=7)
    assert main(["train", "dit", "--config", str(cfg), "--out", str(tmp_path / "straight"), "--init-from", str(source),
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "straight" / "run.json").read_text())["init_from"]
    assert record["path"] == str(source) and record["source"] == "bundle" and record["reinitialised"] == {}
    assert record["files"]["model"]["sha256"] == file_sha256(source / "dit" / "model.safetensors")
    first = torch.load(checkpoint_dirs(tmp_path / "straight")[0] / "training_state.pt", weights_only=True)
    assert first["step"] == 2 and first["optimizers"]["main"]["state"][0]["step"] == 2   # the source made 3 steps
    assert first["init_from"] == record

    _, new = load_stage_config(cfg, [f"init_from={source}"])
    train_stage("dit", new, tmp_path / "stopped", progress=False, stop_at=2)
    shutil.move(source, tmp_path / "gone")   # a resume that read the source again would fail here
    train_stage("dit", new, tmp_path / "stopped", progress=False)
    a = load_file(str(tmp_path / "straight" / "dit" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "dit" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "stopped" / "run.json").read_text())["init_from"] == record


def test_another_class_count_reinitialises_the_class_table(dit_source, tiny_latent_world, tmp_path):
    cfg = write(tmp_path / "new.yaml", DIT, cache=tiny_latent_world["cache"], classes=12, steps=4, seed=7)
    fresh = started(cfg, tmp_path / "fresh", []).raw["model"].state_dict()
    with pytest.warns(UserWarning, match=r"class count differs: model.y_embedder.table.weight re-initialised"):
        trainer = started(cfg, tmp_path / "run", [f"init_from={dit_source / 'finished'}"])
    state, source = trainer.raw["model"].state_dict(), load_file(str(dit_source / "finished" / "dit" /
                                                                     "model.safetensors"))
    assert torch.equal(state["y_embedder.table.weight"], fresh["y_embedder.table.weight"])   # 13 rows, this run's
    assert all(torch.equal(state[k], v) for k, v in source.items() if k != "y_embedder.table.weight")
    assert trainer.init_record["reinitialised"] == {
        "model.y_embedder.table.weight": "class count differs: source (11, 32), this run (13, 32)"}
    trainer.fit()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["init_from"] == trainer.init_record


def test_another_tokenizer_of_the_same_shape_loads_with_a_note(dit_source, tiny_latent_world, tmp_path):
    """The bundle's record names the tokenizer whose latents it learned: another one of the same shape loads (the
    tensors fit) but is warned about and noted in run.json; the same one gives no note."""
    bundle = shutil.copytree(dit_source / "finished" / "dit", tmp_path / "other" / "dit")
    record = json.loads((bundle / "config.json").read_text())
    assert started(write(tmp_path / "new.yaml", DIT, cache=tiny_latent_world["cache"], classes=10, steps=4, seed=7),
                   tmp_path / "same", [f"init_from={bundle}"]).init_record["notes"] == []
    record["latents"]["fae"] = {"weights_sha256": "f" * 64}
    record["latents"].get("tokenizer", {})["sha256"] = "f" * 64
    (bundle / "config.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="the source learned the latents of fae ffffffffffff, this run's cache holds"):
        trainer = started(tmp_path / "new.yaml", tmp_path / "other-run", [f"init_from={bundle}"])
    assert len(trainer.init_record["notes"]) == 1
    assert_starts_from(trainer, "model", load_file(str(bundle / "model.safetensors")))


def test_another_latent_shape_or_width_is_refused(tiny_latent_world, tmp_path):
    """Another latent channel count or grid is another latent space (refused before any tensor is compared, since
    with RoPE a new grid would load silently); another hidden width is refused by the tensor shapes."""
    from fae.models.dit import DiT, DiTConfig

    cfg = write(tmp_path / "new.yaml", DIT, cache=tiny_latent_world["cache"], classes=10, steps=4, seed=7)
    base = dict(input_size=(4, 4), in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    for name, change, message in [("channels", dict(in_channels=8), "its latents are 8x4x4, this run's 4x4x4"),
                                  ("grid", dict(input_size=(8, 8), rope=True), "its latents are 4x8x8, this run's 4x4x4"),
                                  ("width", dict(hidden_size=64), r"blocks.0.attn.proj.weight: source \(64, 64\), "
                                                                  r"this run \(32, 32\).*\(and 17 more\)")]:
        bundle = DiT(DiTConfig(**{**base, **change})).save_pretrained(tmp_path / name / "dit")
        with pytest.raises(ConfigError, match=message):
            started(cfg, tmp_path / f"run-{name}", [f"init_from={bundle}"])
        assert not (tmp_path / f"run-{name}").exists()


def test_flow_starts_from_a_flow_run_and_reinitialises_its_class_tables(tiny_latent_world, tmp_path):
    flow = """stage: flow
latents: {cache}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, layers_per_block: [1, 1], head_dim: 16,
        num_classes: {classes}, class_conditioning: {cond}}}
noise_std: 0.2
optim: {{lr: 1.0e-3}}
train: {{steps: 2, batch_size: 8, checkpoint_every: 2, log_every: 1, ema_decay: 0.9, seed: 1}}
"""
    for cond in ("add", "prefix"):
        cfg = write(tmp_path / f"{cond}.yaml", flow, cache=tiny_latent_world["cache"], classes=10, cond=cond)
        train_stage("flow", load_stage_config(cfg)[1], tmp_path / cond, progress=False)
        source = load_file(str(tmp_path / cond / "flow" / "model.safetensors"))
        assert_starts_from(started(cfg, tmp_path / f"same-{cond}", [f"init_from={tmp_path / cond}"]), "model", source)
        more = write(tmp_path / f"{cond}12.yaml", flow, cache=tiny_latent_world["cache"], classes=12, cond=cond)
        with pytest.warns(UserWarning, match="class count differs"):
            trainer = started(more, tmp_path / f"more-{cond}", [f"init_from={tmp_path / cond}"])
        tables = set(trainer.init_record["reinitialised"])
        assert tables and all(("y_embedder" if cond == "add" else "class_prefix") in k for k in tables)
        state = trainer.raw["model"].state_dict()
        assert all(torch.equal(state[k], v) for k, v in source.items() if f"model.{k}" not in tables)
    with pytest.raises(ConfigError, match="a 'flow' run, not a 'dit' one"):   # the family is checked too
        started(write(tmp_path / "dit.yaml", DIT, cache=tiny_latent_world["cache"], classes=10, steps=2, seed=1),
                tmp_path / "dit", [f"init_from={tmp_path / 'add'}"])


def test_mmdit_another_text_width_reinitialises_the_text_projections(tiny_latent_world, tmp_path):
    """The text projections are re-learned for another text encoder's width; the joint blocks come from the source;
    the empty prompt's embedding is always this run's cache's."""
    from PIL import Image

    from fae.data import DataConfig
    from fae.data.latents import LatentCache
    from fae.encoders import TextEncoder, TextEncoderConfig, save_tiny_text_encoder
    from fae.encoding import EncodeOptions, encode_latents
    from fae.models.mmdit import MMDiT, MMDiTConfig

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i, name in enumerate(["red", "green", "blue", "grey"]):
        Image.new("RGB", (16, 16), (60 * i, 200 - 40 * i, 90)).save(pairs / f"{name}.png")
        (pairs / f"{name}.txt").write_text(f"a {name} square")
    text = TextEncoder.from_config(TextEncoderConfig(kind="t5", name_or_path=str(
        save_tiny_text_encoder("t5", tmp_path / "t5", hidden_size=32)), max_length=6))
    encode_latents(DataConfig(kind="caption_folder", root=str(pairs), image_size=16), tmp_path / "cache",
                   fae=tiny_latent_world["fae"], options=EncodeOptions(shard_size=4), progress=False, text_encoder=text)
    cfg = tmp_path / "mmdit.yaml"
    cfg.write_text(f"""stage: mmdit
latents: {tmp_path / 'cache'}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, depth: 2, num_heads: 2, text_dim: 32, text_tokens: 6}}
train: {{steps: 2, batch_size: 4, checkpoint_every: 2, ema_decay: 0.5}}
""")
    null = LatentCache(tmp_path / "cache").text_null()["text_tokens"].reshape(6, 32)
    for width in (16, 32):
        model = MMDiT(MMDiTConfig(input_size=(4, 4), in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                  text_dim=width, text_tokens=6))
        model.null_tokens.normal_()   # another cache's empty prompt
        bundle = model.save_pretrained(tmp_path / f"w{width}" / "mmdit")
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            trainer = started(cfg, tmp_path / f"run{width}", [f"init_from={bundle}"])
        assert [str(w.message).split(": ")[1] for w in said] == (["text width differs"] if width == 16 else [])
        state, source = trainer.raw["model"].state_dict(), load_file(str(bundle / "model.safetensors"))
        reinit = set(trainer.init_record["reinitialised"])
        assert trainer.init_record["from_this_run"] == ["model.null_mask", "model.null_pooled", "model.null_tokens"]
        assert torch.equal(state["null_tokens"], null)
        text_projections = {k for k in state if k.startswith(("context_embedder.", "pooled_embedder."))}
        assert reinit == ({f"model.{k}" for k in text_projections} if width == 16 else set())
        assert all(torch.equal(state[k], v) for k, v in source.items()
                   if not k.startswith("null_") and f"model.{k}" not in reinit)


@pytest.fixture
def fae_config(tmp_path, tiny_encoder_dir):
    cfg = tmp_path / "fae.yaml"
    cfg.write_text(f"""stage: fae
encoder: {{kind: dinov2, name_or_path: {tiny_encoder_dir}}}
model: {{feature_dim: 32, grid: [4, 4], latent_channels: 4, encoder_heads: 2, encoder_head_dim: 8, decoder_depth: 1,
        decoder_heads: 2}}
data: {{kind: fashion_mnist, image_size: 16, limit: 16, hflip: false}}
train: {{steps: 2, batch_size: 8, checkpoint_every: 2, ema_decay: 0.5}}
eval: {{limit: 0}}
""")
    return cfg


def test_fae_stage_starts_from_a_bundle_and_refuses_other_latent_channels(fae_config, tiny_latent_world, tmp_path):
    bundle = tiny_latent_world["fae"]
    trainer = started(fae_config, tmp_path / "run", [f"init_from={bundle}"])
    assert_starts_from(trainer, "model", load_file(str(bundle / "model.safetensors")))
    with pytest.raises(ConfigError, match=r"decoder.proj_in.weight: source \(32, 4\), this run \(32, 8\)"):
        started(fae_config, tmp_path / "wide", [f"init_from={bundle}", "model.latent_channels=8"])


def test_pixel_decoder_init_from_carries_decoder_discriminator_and_lecam(tmp_path, tiny_encoder_dir):
    """`init_from` is finetune_from's general name: without an FAE it fine-tunes a decoder on new data in the
    Gaussian phase; the two keys may not name different sources."""
    from test_pixel_decoder import write_config

    cfg = write_config(tmp_path / "g.yaml", tiny_encoder_dir, steps=2, eval_limit=0)
    train_stage(*load_stage_config(cfg), tmp_path / "g", progress=False)
    new = write_config(tmp_path / "new.yaml", tiny_encoder_dir, steps=3, eval_limit=0, decoder=False)
    trainer = started(new, tmp_path / "run", [f"init_from={tmp_path / 'g'}"])
    assert_starts_from(trainer, "decoder", load_file(str(tmp_path / "g" / "pixel_decoder" / "model.safetensors")))
    disc = load_file(str(tmp_path / "g" / "discriminator.safetensors"))
    assert all(torch.equal(trainer.raw["disc"].state_dict()[k], v) for k, v in disc.items())
    lecam = load_file(str(tmp_path / "g" / "lecam.safetensors"))
    assert all(torch.equal(trainer.stage.pixel_loss.lecam.state_dict()[k], v) for k, v in lecam.items())
    assert set(trainer.init_record["files"]) == {"decoder", "disc"}
    with pytest.raises(ConfigError, match="one key names the starting decoder"):
        load_stage_config(new, [f"init_from={tmp_path / 'g'}", f"finetune_from={tmp_path}", "fae=x"])


def test_kl_vae_starts_from_its_diffusers_folder(tmp_path):
    from test_kl_vae_stage import write_config

    cfg = write_config(tmp_path / "kl.yaml", steps=2)
    train_stage(*load_stage_config(cfg), tmp_path / "src", progress=False)
    trainer = started(cfg, tmp_path / "run", [f"init_from={tmp_path / 'src'}"])
    weights = load_file(str(tmp_path / "src" / "kl-vae" / "diffusion_pytorch_model.safetensors"))
    assert_starts_from(trainer, "model", weights, prefix="vae.")
    with pytest.raises(ConfigError, match=r"vae.decoder.conv_in.weight: source \(16, 4, 3, 3\), this run \(16, 8, 3, 3\)"):
        started(cfg, tmp_path / "wide", [f"init_from={tmp_path / 'src'}", "model.latent_channels=8"])


def test_cli_refuses_init_from_where_a_stage_has_none(tmp_path, capsys):
    assert main(["train", "encoder", "--config", str(tmp_path / "x.yaml"), "--init-from", str(tmp_path)]) != 0
    assert "has no --init-from" in capsys.readouterr().err
