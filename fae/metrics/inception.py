"""Inception-v3 as used for FID: the TensorFlow graph `inception-2015-12-05` in PyTorch.

This is our own module with the module/parameter names of torchvision's `Inception3` as patched by pytorch-fid
(`FIDInceptionA/C/E`) and torch-fidelity, so their converted weights file `pt_inception-2015-12-05-6726825d.pth`
loads with strict key matching. The FID variant differs from torchvision's ImageNet Inception in three places,
all reproduced here: average pools inside blocks A, C and E_1 exclude the zero padding (TF semantics), the last
block (Mixed_7c) uses a max pool in its pool branch, and the classifier has 1008 outputs.

Input pipeline (`resize="tf1"`, default, = the TF graph / ADM evaluator / torch-fidelity): images are quantised to
uint8 values, bilinearly resized to 299x299 with TensorFlow-1 semantics (source pixel = destination pixel x
in/out, no half-pixel offset, no antialiasing) and normalised as (x - 128) / 128. `resize="pytorch"` reproduces
pytorch-fid instead: [0, 1] floats, `F.interpolate(bilinear, align_corners=False)`, 2x - 1.

Outputs: `pool` (B, 2048) = pool_3 features for FID / precision / recall; `logits` (B, 1008) = pool @ W^T
*without* the bias, which is what the ADM evaluator and torch-fidelity feed to the softmax for the Inception
Score; `spatial` (B, 2023) = the first 7 channels of TF node `mixed_6/conv` (ReLU output of Mixed_6d.branch1x1,
17x17) flattened in TF's (h, w, c) order, the sFID feature of the ADM evaluator.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fae.grid import float_to_uint8

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
# torch-fidelity ships the same conversion under another name; either file is accepted
ALT_WEIGHTS_NAMES = ("weights-inception-2015-12-05-6726825d.pth",)
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_ENV = "FAE_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
ResizeMode = Literal["tf1", "pytorch"]


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's value) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 SAME average pool divides by the number of real (non-padded) pixels
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d: 35x35
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e: 17x17, factorised 7x7
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward_with_1x1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block output and its 1x1 branch (TF `mixed_N/conv`, used for sFID)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg_pool_tf(x))], 1), b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_1x1(x)[0]


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool branch) and Mixed_7c (max pool branch, a quirk of the TF graph)
    def __init__(self, cin: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """TensorFlow-1 `resize_bilinear(align_corners=False)`: src = dst * (in / out), clamped at the last pixel.

    Interpolates along the width, then the height, in float32, in the order TF's CPU kernel does.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size

    def along(t: torch.Tensor, out: int, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        src = torch.arange(out, device=t.device, dtype=torch.float32) * torch.tensor(n / out, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        shape = [1] * t.ndim
        shape[dim] = out
        frac = (src - lo.float()).view(shape).to(t.dtype)
        a, b = t.index_select(dim, lo), t.index_select(dim, hi)
        return a + (b - a) * frac

    return along(along(x, out_w, 3), out_h, 2)


class FIDInceptionV3(nn.Module):
    """The FID Inception network. `forward(images)` takes uint8 (B,3,H,W) in [0,255] or float in [0,1]."""

    def __init__(self, resize: ResizeMode = "tf1") -> None:
        super().__init__()
        if resize not in ("tf1", "pytorch"):
            raise ValueError(f"resize must be 'tf1' or 'pytorch', not {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        dtype = self.fc.weight.dtype
        if images.dtype == torch.uint8:
            x = images.to(dtype)
        elif images.is_floating_point():
            x = float_to_uint8(images).to(dtype)  # the uint8 a saved PNG would hold
        else:
            raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        if self.resize == "tf1":
            return (resize_bilinear_tf1(x, INPUT_SIZE) - 128.0) / 128.0
        x = F.interpolate(x / 255.0, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x, mixed_6_conv = self.Mixed_6d.forward_with_1x1(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # TF (h, w, c) order
        return {"pool": pool.float(), "logits": (pool @ self.fc.weight.T).float(), "spatial": spatial.float()}


def default_weights_locations() -> list[Path]:
    """Where `find_inception_weights` looks when no path is given, in order."""
    places = []
    if os.environ.get(WEIGHTS_ENV):
        places.append(Path(os.environ[WEIGHTS_ENV]).expanduser())
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    places += [hub / WEIGHTS_NAME] + [hub / name for name in ALT_WEIGHTS_NAMES]
    return places


def missing_weights_message(tried: list[Path]) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"FID Inception weights not found (looked at: {', '.join(str(p) for p in tried)}). "
            f"Download {WEIGHTS_NAME} from {WEIGHTS_URL} (the pytorch-fid port of TF inception-2015-12-05, 91 MB) "
            f"and pass it with --inception-weights PATH, or set {WEIGHTS_ENV}=PATH, or save it as "
            f"{hub / WEIGHTS_NAME}, e.g. `mkdir -p {hub} && curl -L -o {hub / WEIGHTS_NAME} {WEIGHTS_URL}`")


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file: `path` if given, else $FAE_INCEPTION_WEIGHTS, else the torch hub checkpoint folder."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(missing_weights_message([path]))
        return path
    tried = default_weights_locations()
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(missing_weights_message(tried))


def load_fid_inception(path: str | Path | None = None, resize: ResizeMode = "tf1",
                       device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the network and load the weights file with strict key matching (see `find_inception_weights`)."""
    file = find_inception_weights(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{file}: cannot be read as a PyTorch state dict ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = FIDInceptionV3(resize=resize)
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise ValueError(f"{file} is not the FID Inception state dict ({WEIGHTS_NAME}): "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:3]}")
    state = {k: v.float() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def _key_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    # the converted file predates BatchNorm's num_batches_tracked buffer, which load_state_dict fills in
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    return sorted(expected - given), sorted(given - expected)


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised FID Inception state dict with O(1) activations (tests, parity checks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = FIDInceptionV3()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight"):
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=g)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * torch.randn(tensor.shape, generator=g)
        elif name.endswith("bn.running_var"):
            value = 1.0 + 0.2 * torch.rand(tensor.shape, generator=g)
        elif name.startswith("fc."):
            value = torch.randn(tensor.shape, generator=g) * 2048 ** -0.5
        else:  # num_batches_tracked
            value = torch.zeros((), dtype=torch.long)
        state[name] = value
    return state
