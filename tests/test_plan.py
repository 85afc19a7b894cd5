"""`fae plan` and fae.planning (docs/scaling.md): the memory arithmetic, the layout that keeps the global batch, the
clear errors, the CLI on paper configs, and the one-GPU recipes in docs/scaling.md being `fae plan`'s output.
Everything is counted on the meta device: no memory, no download."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fae.cli import main
from fae.planning import MODES, GiB, MemoryProfile, PlanError, format_plan, layout, make_plan, profile

ROOT = Path(__file__).resolve().parents[1]

# a DiT-XL-like profile, for the arithmetic (sizes of dit_sit_xl1, rounded)
TOY = MemoryProfile(config="toy", path="toy.yaml", stage="dit", batch=512, trainable=675_000_000, ema=675_000_000,
                    frozen=0, activation_per_sample=700e6, checkpointed_per_sample=37e6, blocks=28,
                    block_parameters=24_000_000)


@pytest.fixture(scope="module")
def dit() -> MemoryProfile:
    return profile("dit_sit_xl1")


def test_memory_grows_with_the_micro_batch_and_fsdp_needs_less_than_ddp() -> None:
    for gpus in (1, 2, 8, 64):
        for mode in MODES:
            need = [TOY.bytes_per_gpu(mode, m, gpus) for m in range(1, 40)]
            assert all(a < b for a, b in zip(need, need[1:], strict=False)), (mode, gpus)
        for micro in (1, 8, 64):
            ddp, ckpt, fsdp = (TOY.bytes_per_gpu(mode, micro, gpus) for mode in MODES)
            assert ckpt < ddp
            assert (fsdp < ckpt) if gpus > 1 else (fsdp == ckpt)   # one process: nothing to shard
    # the parts: DDP buckets only with several processes; FSDP holds 1/N of the state plus three blocks' fp32 copies
    state = 20 * TOY.trainable
    assert TOY.fixed_bytes("ddp", 1) == state and TOY.fixed_bytes("ddp", 8) == state + 4 * TOY.trainable
    assert TOY.fixed_bytes("fsdp+ckpt", 8) == state / 8 + 12 * TOY.block_parameters
    recompute = (TOY.activation_per_sample - TOY.checkpointed_per_sample) / TOY.blocks
    assert TOY.per_sample("ddp+ckpt") == TOY.checkpointed_per_sample + recompute


@pytest.mark.parametrize("gpus", [1, 2, 8, 64])
@pytest.mark.parametrize("memory", [24, 40, 80, 141])
def test_the_plan_keeps_the_global_batch_with_the_largest_micro_batch_that_fits(gpus: int, memory: int) -> None:
    plan = make_plan(TOY, gpus, memory)
    share = TOY.batch // gpus
    budget = (memory - plan.reserve_gib) * GiB
    for m in plan.modes:
        if m.fits:   # the largest: one more sample no longer fits
            assert TOY.bytes_per_gpu(m.mode, m.fits, gpus) <= budget < TOY.bytes_per_gpu(m.mode, m.fits + 1, gpus)
        if m.micro_batch:
            assert m.micro_batch * m.grad_accum * gpus == m.global_batch == TOY.batch   # 512 divides by these
            assert m.micro_batch <= m.fits and m.bytes_per_gpu <= budget
            # the largest divisor of the per-GPU share that fits
            assert share % m.micro_batch == 0
            assert not any(share % d == 0 for d in range(m.micro_batch + 1, min(m.fits, share) + 1))


def test_layout_rules() -> None:
    assert layout(512, 8, 100) == (64, 1)       # the whole share fits
    assert layout(512, 1, 100) == (64, 8)       # the largest divisor of the share that fits
    assert layout(1024, 4, 3) == (2, 128)
    assert layout(512, 1, 0) == (0, 0)
    assert layout(10, 3, 2) == (2, 2)           # 10 does not divide by 3: the nearest global batch, 12
    plan = make_plan(replace(TOY, batch=510), 4, 80)
    text = format_plan(plan)
    assert "(config: 510; set train.batch_size=" in text and "train.batch_size=" in text.splitlines()[-1]


def test_a_memory_just_below_the_micro_batch_1_need_is_a_clear_error() -> None:
    for gpus in (1, 8):
        need = min(TOY.bytes_per_gpu(mode, 1, gpus) for mode in MODES) / GiB + 2.0
        with pytest.raises(PlanError, match=r"micro-batch 1 needs .* GiB per GPU .* more than the"):
            make_plan(TOY, gpus, need - 0.01)
        plan = make_plan(TOY, gpus, need + 0.01)
        assert max(m.fits for m in plan.modes) == 1
        assert "does not fit" in format_plan(plan)   # DDP, which keeps every activation


def test_time_per_step_from_a_measured_rate() -> None:
    plan = make_plan(TOY, 8, 80, rate=50.0)
    by_mode = {m.mode: m for m in plan.modes}
    assert by_mode["ddp"].seconds_per_step == pytest.approx(512 / (50 * 8))
    assert by_mode["ddp+ckpt"].seconds_per_step == pytest.approx(512 / (50 * 8) * 4 / 3)   # one more forward
    assert make_plan(TOY, 8, 80).modes[0].seconds_per_step is None
    with pytest.raises(PlanError, match="--rate"):
        make_plan(TOY, 8, 80, rate=0)


def test_a_paper_config_is_profiled_from_its_networks(dit: MemoryProfile) -> None:
    from fae.models.dit import DiT
    from fae.nn import count_parameters
    from fae.stages import load_stage_config

    assert (dit.stage, dit.batch, dit.trainable, dit.frozen) == ("dit", 512, 675_148_064, 0)
    _, cfg = load_stage_config(ROOT / "configs/paper/dit_sit_xl1.yaml")
    with torch.device("meta"):
        model = DiT(cfg.model)
    assert dit.blocks == cfg.model.depth == 28 and dit.block_parameters == count_parameters(model.blocks[0])
    assert dit.checkpointed_per_sample < dit.activation_per_sample / 10   # block inputs only
    assert dit.path == "configs/paper/dit_sit_xl1.yaml"


def test_the_pixel_decoder_counts_its_loss_networks() -> None:
    """The ConvNeXt-S perceptual network (frozen, 50.2M) and the discriminator (trained) are part of a step."""
    from fae.losses import ConvNeXt
    from fae.nn import count_parameters

    with torch.device("meta"):
        convnext = count_parameters(ConvNeXt())
    small = ["decoder.depth=2"]
    full = profile("pixel_decoder_dinov2_g14", small)
    no_convnext = profile("pixel_decoder_dinov2_g14", [*small, "losses.perceptual=none"])
    plain = profile("pixel_decoder_dinov2_g14", [*small, "losses.perceptual=none", "losses.gan_weight=0"])
    assert full.frozen - plain.frozen == convnext and no_convnext.frozen == plain.frozen
    assert full.trainable - plain.trainable == 2_765_633 and full.ema == plain.ema == plain.trainable
    # ConvNeXt-S keeps the same bytes per sample in both modes (it is not checkpointed); the discriminator's too
    with_convnext = full.activation_per_sample - no_convnext.activation_per_sample
    assert with_convnext > 10 * 2**20
    assert full.checkpointed_per_sample - no_convnext.checkpointed_per_sample == with_convnext
    assert no_convnext.activation_per_sample > plain.activation_per_sample


def test_configs_it_cannot_plan_say_why(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no config 'nope'.*dit_lightningdit_xl1"):
        profile("nope")
    with pytest.raises(PlanError, match="Gaussian run"):
        profile("pixel_decoder_dinov2_g14_finetune", ["finetune_from=x", "fae=y"])
    from fae.config import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        profile(tmp_path / "missing.yaml")


def test_cli_plans_a_paper_config_as_the_docs_show(capsys: pytest.CaptureFixture[str]) -> None:
    """`fae plan` on the 512-px DiT at one 80 GB GPU prints the three modes, and its output is the recipe pasted in
    docs/scaling.md (the arithmetic changed? regenerate the docs' tables with the commands they show)."""
    assert main(["plan", "dit_lightningdit_xl1_512", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    for name in ("DDP", "DDP + checkpointing", "FSDP2 + checkpointing"):
        assert re.search(rf"^\| {re.escape(name)} \| \d+ \| \d+ x \d+ x 1 = 512 \| [\d.]+ GiB \| - \|$", out, re.M), name
    assert out.strip() in (ROOT / "docs/scaling.md").read_text()


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import fae.planning

    assert main(["plan", "nope", "--gpu-memory", "24"]) == 1
    assert "no config 'nope'" in capsys.readouterr().err
    monkeypatch.setattr(fae.planning, "profile", lambda config, overrides: TOY)
    assert main(["plan", "toy", "--gpu-memory", "14"]) == 1   # 12.6 GiB of state + 2 reserved
    err = capsys.readouterr().err
    assert err.startswith("fae: error: toy: micro-batch 1 needs 14.") and "Traceback" not in err
    assert main(["plan", "toy", "--gpu-memory", "14", "--reserve", "1"]) == 0


def test_the_multi_gpu_plan_says_how_to_launch(dit: MemoryProfile) -> None:
    text = format_plan(make_plan(dit, 8, 80, rate=50.0))
    assert "| 1.28 s |" in text   # 512 images / (50 images/s x 8 GPUs)
    assert text.splitlines()[-1] == ("run: torchrun --nproc_per_node=8 -m fae.cli train dit --config "
                                     "configs/paper/dit_sit_xl1.yaml --out RUN train.grad_accum=1")
