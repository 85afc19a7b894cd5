"""The benchmark scripts (vs_diffusers, throughput, gpu_check) run at tiny size and report what they should (no
timing is asserted), and the oneDNN linear that speeds up the DiT on CPU computes what F.linear computes, gradients included."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fae.nn import Linear, Mlp

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])  # both branches of the weight gradient
def test_onednn_linear_matches_f_linear_with_gradients(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    layer = Linear(*shape)
    x = torch.randn(4, 5, shape[0]).transpose(0, 1).requires_grad_()  # non-contiguous input, 3-D
    grad = torch.randn(5, 4, shape[1])
    layer(x).backward(grad)
    ours = (x.grad, layer.weight.grad, layer.bias.grad)
    x.grad = layer.weight.grad = layer.bias.grad = None
    expected = F.linear(x, layer.weight, layer.bias)
    expected.backward(grad)
    torch.testing.assert_close(layer(x), expected)
    for got, want in zip(ours, (x.grad, layer.weight.grad, layer.bias.grad), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_gelu_inference_matches_the_training_path(bf16: bool) -> None:
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    x = torch.randn(3, 7, 32)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        expected = mlp(x)  # grad enabled: linear, then a separate tanh-GELU
        with torch.no_grad():
            fused = mlp(x)
    assert fused.dtype == expected.dtype
    torch.testing.assert_close(fused.float(), expected.detach().float(), rtol=2e-2 if bf16 else 1e-5,
                               atol=2e-2 if bf16 else 1e-5)


def test_vs_diffusers_reports_ratio_and_flops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    import vs_diffusers

    out = tmp_path / "vs.json"
    report = vs_diffusers.main(["--tiny", "--precision", "fp32", "--threads", "1", "--ablate", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ratio diffusers/fae" in printed and "GFLOP/s" in printed and "CPU" in printed
    rows = json.loads(out.read_text())["results"]
    assert {r["op"] for r in rows} == {"train", "nfe", "nfe-cfg"}
    for r in rows:
        assert r["ratio"] == pytest.approx(r["diffusers_s"] / r["fae_s"])
        assert r["fae_gflops"] > 0 and r["peak_gflops"] > 0
        assert set(r["ablations"]) == set(vs_diffusers.ABLATIONS)  # one timed variant per difference
    assert "fae with one difference taken out" in printed
    # the count is the network's: the guided batch is twice the plain one, a train step about three forwards
    flops = report["flops"]
    assert flops["nfe-cfg"] == pytest.approx(2 * flops["nfe"], rel=0.01)
    assert 2.5 * flops["nfe"] < flops["train"] < 3.5 * flops["nfe"]
    # and it counts every linear: at least the 12 d^2 multiply-adds per token and block of qkv, proj and the MLP
    shape = vs_diffusers.Shape(**report["shape"])
    tokens = shape.batch * (shape.height // shape.patch) * (shape.width_px // shape.patch)
    assert flops["nfe"] >= 2 * tokens * 12 * shape.width ** 2 * shape.depth


def test_throughput_quick_run_writes_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import throughput

    out = tmp_path / "tp.json"
    throughput.main(["--quick", "--models", "dit", "fae", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [(r["model"], r["size"]) for r in report["train"]] == [("dit", "tiny"), ("fae", "tiny")]
    for r in report["train"] + report["sample"]:
        assert r["images_per_s"] > 0 and r["peak_mib"] >= r["baseline_mib"] > 0
    assert report["sample"][0]["sample_steps"] == 2
    assert "| dit | tiny |" in capsys.readouterr().out


def test_gpu_check_runs_tiny_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    import gpu_check

    report = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path),
                             "--sections", "pytest", "dit_train", "sampling", "paper_models"])
    sections = report["sections"]
    assert sections["pytest"] == {"skipped": "not on CUDA"}
    assert sections["dit_train"]["eager"]["mfu"] > 0
    assert sections["sampling"]["images_per_s"] > 0
    for name in gpu_check.MODELS:
        assert "train_step_s" in sections["paper_models"][name], sections["paper_models"][name]
    assert "fae" in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["tiny"] is True


def test_pipeline_vs_stock_tiny_run_computes_what_the_stock_path_computes(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """fae's encode, generate and train steps against plain PyTorch/transformers: both paths give the same latents,
    the same uint8 images from the same noise and the same weights (and EMA) after a step, so the ratio compares the
    same computation."""
    import pipeline_vs_stock

    out = tmp_path / "pipe.json"
    report = pipeline_vs_stock.main(["--tiny", "--precision", "fp32", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and report["threads"] == 1
    rows = {r["case"]: r for r in report["results"]}
    assert set(rows) == {"encode", "generate-2", "train-fae", "train-pixel-decoder"}
    for r in rows.values():
        assert r["precision"] == "fp32" and r["images"] == 4
        assert r["ratio"] == pytest.approx(r["stock_s"] / r["fae_s"])
        assert r["fae_images_per_s"] == pytest.approx(r["images"] / r["fae_s"])
    assert rows["encode"]["parity"]["latents_max_abs_diff"] < 1e-5
    assert rows["generate-2"]["parity"]["uint8_max_abs_diff"] <= 1   # one level of rounding at most
    for case in ("train-fae", "train-pixel-decoder"):
        assert rows[case]["parity"]["weights_max_abs_diff"] < 1e-6, rows[case]["parity"]
        assert rows[case]["parity"]["ema_max_abs_diff"] < 1e-6, rows[case]["parity"]
    assert "| fp32 | train-fae | 4 |" in capsys.readouterr().out
