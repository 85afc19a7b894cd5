"""Speed switches (fae.speed, docs/speed.md): graph-break-free training steps, activation checkpointing, the TF32
policy, torch.compile switches. Dynamo's `explain` traces without compiling, so the graph-break checks run on any
CPU in a few seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import tiny_fae_config
from torch.utils.data import Dataset

import fae.training
from fae.models.autoencoder import FeatureAutoEncoder, vae_loss
from fae.models.dit import DiT, dit_config
from fae.models.mmdit import MMDiT, TextCondition, mmdit_config
from fae.models.pixel_decoder import PixelDecoder, PixelDecoderConfig
from fae.models.starflow import StarFlow, bits_per_dim, starflow_config
from fae.nn import set_activation_checkpointing
from fae.precision import strict_fp32, training_tf32
from fae.speed import compile_wanted, is_compiled
from fae.training import OptimConfig, TrainConfig, Trainer, TrainStage
from fae.transport import TransportConfig, flow_matching_loss


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Small noise on every weight: the zero inits (adaLN-Zero, identity flows) would hide most of the graph."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _dit(name: str) -> DiT:
    return DiT(dit_config(name, input_size=(4, 4), in_channels=4, num_classes=5, rope=True, class_dropout=0.1))


def _mmdit() -> MMDiT:
    return MMDiT(mmdit_config("tiny", input_size=(4, 4), in_channels=4, text_dim=16, text_tokens=3))


def _text(batch: int, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, 3, 16, generator=g), torch.tensor([[True, True, False]] * batch),
                         torch.randn(batch, 16, generator=g))


def _starflow() -> StarFlow:
    return StarFlow(starflow_config("tiny", input_size=(4, 4), in_channels=4, num_classes=5))


def _fae() -> FeatureAutoEncoder:
    return FeatureAutoEncoder(tiny_fae_config(decoder_depth=2))


def _pixel_decoder() -> PixelDecoder:
    return PixelDecoder(PixelDecoderConfig(in_dim=32, num_tokens=16, patch_size=4, width=32, depth=2, num_heads=2,
                                           refine_channels=0))


def _graph_breaks(fn, *args) -> tuple[int, int, list[str]]:
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(*args)
    return report.graph_break_count, report.graph_count, [str(b.reason).splitlines()[0] for b in report.break_reasons]


# --------------------------------------------------------------------------------------------- no graph breaks
@pytest.mark.parametrize("name", ["SiT-tiny/1", "LightningDiT-tiny/2"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_dit_training_step_traces_as_one_graph(name, checkpointed):
    """The DiT stage's step: label dropout, shifted random times, noise, forward, loss and its logs. A host sync
    (the old `int(y.min())` label check, a `.item()` in the logs) or Python-side randomness would break it."""
    model = _dit(name).train()
    set_activation_checkpointing(model, checkpointed)
    transport = TransportConfig(time_shift=0.4, cosine_loss_weight=0.5)

    def step(x, y):
        loss, logs = flow_matching_loss(model, x, y, transport)
        return loss, logs

    breaks, graphs, reasons = _graph_breaks(step, torch.randn(2, 4, 4, 4), torch.tensor([1, 4]))
    assert (breaks, graphs) == (0, 1), reasons


def test_mmdit_starflow_and_fae_training_forwards_trace_as_one_graph():
    mmdit = _mmdit().train()
    breaks, graphs, reasons = _graph_breaks(lambda x, y: flow_matching_loss(mmdit, x, y, TransportConfig()),
                                            torch.randn(2, 4, 4, 4), _text(2))
    assert (breaks, graphs) == (0, 1), ("mmdit", reasons)

    flow = _starflow().train()

    def flow_step(x, y):  # the flow stage's loss: noise the latents, bits per dim
        z, logdet = flow(x + 0.3 * torch.randn_like(x), y)
        return bits_per_dim(z, logdet).mean()

    breaks, graphs, reasons = _graph_breaks(flow_step, torch.randn(2, 4, 4, 4), torch.tensor([0, 3]))
    assert (breaks, graphs) == (0, 1), ("starflow", reasons)

    autoencoder = _fae().train()
    breaks, graphs, reasons = _graph_breaks(lambda x: vae_loss(x, *autoencoder(x), 1e-4), torch.randn(2, 16, 32))
    assert (breaks, graphs) == (0, 1), ("fae", reasons)

    decoder = _pixel_decoder().train()
    breaks, graphs, reasons = _graph_breaks(decoder, torch.randn(2, 16, 32))
    assert (breaks, graphs) == (0, 1), ("pixel decoder", reasons)


@pytest.mark.slow  # ~30 s of inductor C++ compilation on 2 shared cores
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None, reason="inductor needs a C++ compiler")
def test_compiled_dit_matches_eager(one_thread, tmp_path, monkeypatch):
    # a private inductor cache: its key ignores ATEN_CPU_CAPABILITY, and kernels cached by a native-ISA run gave NaN
    # when reused in a run emulating AVX2 (a fresh cache passes both)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = _perturbed(DiT(dit_config("LightningDiT-tiny/1", input_size=(2, 2), in_channels=4, num_classes=5,
                                      depth=1))).eval()
    x, t, y = torch.randn(2, 4, 2, 2), torch.rand(2), torch.tensor([1, 5])
    with torch.no_grad():
        eager = model(x, t, y)
        torch._dynamo.reset()
        model.compile()
        try:
            compiled = model(x, t, y)
        finally:
            torch._dynamo.reset()
    assert is_compiled(model) and eager.abs().max() > 1e-3
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- activation checkpointing
def _saved_bytes_and_grads(model: torch.nn.Module, loss_fn) -> tuple[int, dict[str, torch.Tensor]]:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CHECKPOINTED_MODELS = {
    # name: (model, loss) — eval mode, so label/caption dropout draws nothing and both passes see the same inputs
    "dit": (lambda: _dit("LightningDiT-tiny/1"),
            lambda m, x: m(x, torch.tensor([0.3, 0.8]), torch.tensor([1, 5])).square().mean()),
    "mmdit": (_mmdit, lambda m, x: m(x, torch.tensor([0.3, 0.8]), _text(2, seed=3)).square().mean()),
    "starflow": (_starflow, lambda m, x: bits_per_dim(*m(x, torch.tensor([1, 5]))).mean()),
    "fae": (_fae, lambda m, x: m(x.flatten(2).transpose(1, 2).repeat(1, 1, 8), sample=False)[0].square().mean()),
    "pixel_decoder": (_pixel_decoder, lambda m, x: m(x.flatten(2).transpose(1, 2).repeat(1, 1, 8)).square().mean()),
}


@pytest.mark.parametrize("name", list(CHECKPOINTED_MODELS))
def test_activation_checkpointing_same_gradients_less_saved_memory(name):
    build, loss = CHECKPOINTED_MODELS[name]
    torch.manual_seed(0)
    model = _perturbed(build()).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 4, 4, 4)
    plain_bytes, plain = _saved_bytes_and_grads(model, lambda: loss(model, x))
    assert set_activation_checkpointing(model, True)
    ckpt_bytes, ckpt = _saved_bytes_and_grads(model, lambda: loss(model, x))
    assert list(model.state_dict()) == keys                      # a switch, not a weight: bundles stay the same
    assert plain.keys() == ckpt.keys() and len(plain) > 4
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    assert ckpt_bytes < 0.8 * plain_bytes, (ckpt_bytes, plain_bytes)
    with torch.no_grad():  # no gradients: nothing to recompute, the plain path runs
        loss(model, x)


# ------------------------------------------------------------------------------------------------------- TF32
def test_training_tf32_sets_and_restores_the_cuda_flags():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with training_tf32(True, "cuda"):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with strict_fp32():  # metric features inside a training run: IEEE fp32 wins
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with training_tf32(False, "cuda"):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    with training_tf32(True, "cpu"):  # TF32 is a CUDA format: a CPU run changes nothing
        assert (matmul.fp32_precision, conv.fp32_precision) == before
    assert (matmul.fp32_precision, conv.fp32_precision) == before


# ------------------------------------------------------------------------------------------ compile + trainer
def test_compile_modes():
    assert compile_wanted("auto", "cuda") and not compile_wanted("auto", "cpu")
    assert compile_wanted("on", "cpu") and not compile_wanted("off", "cuda")
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_wanted("yes", "cpu")
    with pytest.raises(ValueError, match="train.compile"):
        TrainConfig(compile="always").validate()  # type: ignore[arg-type]


class _Latents(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, key):
        g = torch.Generator().manual_seed(int(key[0]))
        return {"latent": torch.randn(4, 4, 4, generator=g), "label": torch.tensor(int(key[0]) % 5)}


class _DiTStage(TrainStage):
    def __init__(self) -> None:
        self.modules = {"model": _dit("LightningDiT-tiny/1")}
        self.optim = OptimConfig(lr=1e-3)
        self.fp32_precision_seen: set[str] = set()

    def train_dataset(self) -> Dataset:
        return _Latents()

    def loss(self, group, batch, step):
        self.fp32_precision_seen.add(torch.backends.cuda.matmul.fp32_precision)
        return flow_matching_loss(self.modules["model"], batch["latent"], batch["label"], TransportConfig())

    def export(self, out_dir: Path, modules) -> None:
        pass


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=2, batch_size=4, checkpoint_every=2, log_every=1, device="cpu"), **kw})


def test_trainer_switches_keep_checkpoints_interchangeable(tmp_path, monkeypatch):
    # the TF32 policy is CUDA-only; pretend this CPU run is on CUDA to see the trainer hold it for the whole fit
    monkeypatch.setattr(fae.training, "training_tf32", lambda enabled, device: training_tf32(enabled, "cuda"))
    before = torch.backends.cuda.matmul.fp32_precision
    stage = _DiTStage()
    Trainer(stage, _train_cfg(activation_checkpointing=True, compile="off"), tmp_path, progress=False).fit()
    assert stage.modules["model"].activation_checkpointing and stage.fp32_precision_seen == {"tf32"}
    assert torch.backends.cuda.matmul.fp32_precision == before
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["speed"] == {"compile": False, "compile_mode": "off", "activation_checkpointing": ["model"],
                            "tf32": False}   # (the run.json records the real device: a CPU has no TF32)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert set(saved) == set(_DiTStage().modules["model"].state_dict())


def test_trainer_compiles_in_place_after_the_ema_copy(tmp_path):
    stage = _DiTStage()
    trainer = Trainer(stage, _train_cfg(compile="on"), tmp_path, progress=False)
    model = stage.modules["model"]
    assert model is trainer.raw["model"] and is_compiled(model)            # same object, same state_dict keys
    assert not is_compiled(trainer.ema["model"].module)                     # EMA / exported weights stay plain
    assert trainer.speed["compile"] and not trainer.speed["activation_checkpointing"]
    assert set(model.state_dict()) == set(trainer.ema["model"].module.state_dict())
