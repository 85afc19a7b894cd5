"""Golden files for the metric networks: reference outputs of pytorch-fid's and torch-fidelity's Inception and of the
`lpips` package.

Both references need torchvision, which does not install beside the torch pinned for fae (environment.md), so this
script runs once, from a separate environment, and writes kilobyte fixtures to tests/data/; the suite
(tests/test_golden_metrics.py) then checks fae's networks against them offline:

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid torch-fidelity lpips safetensors scipy pyyaml
    PYTHONPATH=. /tmp/refenv/bin/python benchmarks/golden_metrics.py

Weights are random, rebuilt in the test from the seed recorded here (fae's `random_inception_state` and
`random_lpips_state`), so no 91 MB / 500 MB file is committed. The same state dict is loaded into each reference:
pytorch-fid's weight download is replaced by it, torch-fidelity reads it from a file, and lpips gets it as its
backbone (`pnet_rand=True`, then loaded by key) and its heads (`model_path`). Inputs are uint8 images chosen so
that outputs differ between them (asserted here and in the test: a parity check on constant features proves
nothing).
"""
from __future__ import annotations

import argparse
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fae.losses import random_lpips_state
from fae.metrics.inception import SPATIAL_CHANNELS, random_inception_state

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SEED = 0


def golden_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n,3,size,size): a mix of smooth colour fields and noise, so features spread across images."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bicubic", align_corners=False)
    noise = torch.rand(n, 3, size, size, generator=g)
    mix = torch.linspace(0.0, 1.0, n).view(n, 1, 1, 1)
    return ((1 - mix) * smooth + mix * noise).clamp(0, 1).mul(255).round().to(torch.uint8)


def lpips_pairs(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four uint8 pairs at increasing distance: light noise, heavy noise, two unrelated images, a mirror image."""
    g = torch.Generator().manual_seed(seed)
    base = golden_images(4, size, seed).float() / 255
    other = golden_images(4, size, seed + 1).float() / 255
    second = torch.stack([
        base[0] + 0.03 * torch.randn(base[0].shape, generator=g),
        base[1] + 0.25 * torch.randn(base[1].shape, generator=g),
        other[2],
        base[3].flip(-1),
    ]).clamp(0, 1)
    return (base * 255).round().to(torch.uint8), (second * 255).round().to(torch.uint8)


def pytorch_fid_reference(images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """pytorch-fid's pipeline (F.interpolate on [0, 1], 2x - 1) = fae's resize="pytorch"."""
    import pytorch_fid.inception as pfid

    state = random_inception_state(seed)
    pfid.load_state_dict_from_url = lambda *args, **kwargs: state  # the only download pytorch-fid makes
    pool_net = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                normalize_input=True, use_fid_inception=True).eval()
    full = pfid.fid_inception_v3().eval()
    x = images.float() / 255
    captured = []
    full.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        pool = pool_net(x)[0].flatten(1)
        logits = full(2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    return {"pool": pool, "logits": logits - full.fc.bias, "spatial": _spatial(captured[0])}


def torch_fidelity_reference(images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """torch-fidelity's `inception-v3-compat` (TF-1 resize from uint8, (x - 128) / 128) = fae's resize="tf1"."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        torch.save(random_inception_state(seed), path)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
    captured = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        pool, logits = net(images)
    return {"pool": pool, "logits": logits, "spatial": _spatial(captured[0])}


def _spatial(branch1x1: torch.Tensor) -> torch.Tensor:
    """TF node mixed_6/conv, first 7 channels, flattened in TF's (h, w, c) order: the ADM evaluator's sFID feature."""
    return branch1x1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


def lpips_reference(net: str, first: torch.Tensor, second: torch.Tensor, seed: int) -> torch.Tensor:
    import lpips

    state = random_lpips_state(net, seed)
    with tempfile.TemporaryDirectory() as tmp:
        heads = Path(tmp) / "heads.pth"
        torch.save({k: v for k, v in state.items() if k.startswith("lin")}, heads)
        ref = lpips.LPIPS(net=net, pnet_rand=True, model_path=str(heads), verbose=False).eval()
    backbone = {}
    for name, _ in ref.net.named_parameters():  # slice<k>.<i>.weight holds torchvision's features.<i>.weight
        backbone[name] = state["features." + name.split(".", 1)[1]]
    ref.net.load_state_dict(backbone, strict=True)
    with torch.no_grad():
        return ref(first.float() / 255, second.float() / 255, normalize=True).flatten()


def spread(x: torch.Tensor) -> float:
    """Smallest difference between two inputs' outputs, relative to the outputs' size."""
    rows = x.flatten(1) if x.ndim > 1 else x[:, None]
    gaps = [(rows[i] - rows[j]).abs().max() for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return float(min(gaps) / rows.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    meta = {"seed": str(SEED), "torch": torch.__version__, "torchvision": version("torchvision")}

    images = golden_images(3, 32, SEED)
    tensors = {"images": images}
    for resize, reference in (("pytorch", pytorch_fid_reference), ("tf1", torch_fidelity_reference)):
        for name, value in reference(images, SEED).items():
            assert spread(value) > 0.01, f"inception {resize} {name} barely differs between inputs"
            tensors[f"{resize}/{name}"] = value.contiguous()
    references = f"pytorch: pytorch-fid {version('pytorch-fid')}; tf1: torch-fidelity {version('torch-fidelity')}"
    save_file(tensors, str(args.out / "inception_golden.safetensors"), metadata={**meta, "reference": references})

    first, second = lpips_pairs(48, SEED)
    tensors = {"first": first, "second": second}
    for net in ("vgg", "alex"):
        tensors[f"distance_{net}"] = lpips_reference(net, first, second, SEED)
        assert spread(tensors[f"distance_{net}"]) > 0.01, f"lpips {net} distances barely differ"
        print(net, tensors[f"distance_{net}"].tolist())
    save_file(tensors, str(args.out / "lpips_golden.safetensors"),
              metadata={**meta, "reference": f"lpips {version('lpips')}"})
    for name in ("inception_golden.safetensors", "lpips_golden.safetensors"):
        print(name, (args.out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
