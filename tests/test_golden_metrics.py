"""fae's FID Inception and LPIPS against golden outputs of the reference packages (torch-fidelity, pytorch-fid,
lpips).

The fixtures in tests/data/ were written by benchmarks/golden_metrics.py in a separate environment with torchvision;
the weights are random and rebuilt here from the recorded seed, so the same state dict feeds both implementations.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fae.losses import LPIPS, random_lpips_state
from fae.metrics.inception import FIDInceptionV3, random_inception_state

DATA = Path(__file__).parent / "data"


def _golden(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = DATA / name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def _assert_spread(x: torch.Tensor, at_least: float = 0.01) -> None:
    """Outputs differ between inputs by more than the parity tolerance: constant features would prove nothing."""
    rows = x.flatten(1) if x.ndim > 1 else x[:, None]
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            assert (rows[i] - rows[j]).abs().max() > at_least * rows.abs().max(), f"inputs {i} and {j} agree"


def _prefixed(what: str) -> Callable[[str], str]:
    """An assert_close `msg` that keeps torch's message behind `what`."""
    return lambda m: f"{what}: {m}"


@pytest.mark.pinned_seeds("the golden outputs were computed by the reference packages from weights at the recorded seed")
@pytest.mark.parametrize("resize", ["tf1", "pytorch"])  # vs torch-fidelity (= the ADM evaluator) and pytorch-fid
def test_inception_matches_the_reference(resize: str, one_thread) -> None:
    golden, meta = _golden("inception_golden.safetensors")
    net = FIDInceptionV3(resize=resize)
    net.load_state_dict(random_inception_state(int(meta["seed"])))
    out = net(golden["images"])
    for kind in ("pool", "logits", "spatial"):
        expected = golden[f"{resize}/{kind}"]
        _assert_spread(expected)
        torch.testing.assert_close(out[kind], expected, rtol=0, atol=2e-5 * expected.abs().max(),
                                   msg=_prefixed(f"{resize} {kind}"))


@pytest.mark.pinned_seeds("the golden outputs were computed by the lpips package from weights at the recorded seed")
@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_the_lpips_package(net: str, tmp_path: Path) -> None:
    golden, meta = _golden("lpips_golden.safetensors")
    weights = tmp_path / f"lpips-{net}.pth"
    torch.save(random_lpips_state(net, int(meta["seed"])), weights)  # the release's key layout, loaded by key
    metric = LPIPS(net, weights)
    expected = golden[f"distance_{net}"]
    _assert_spread(expected)
    got = metric(golden["first"].float() / 255, golden["second"].float() / 255)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
