"""FID Inception: strict loading of the standard weights layout, the clear missing-weights error, TF-1 resizing,
and the outputs (pool, unbiased logits, sFID spatial features). Weights are random, saved to a file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fae.metrics import inception as inc
from fae.metrics.inception import (
    FIDInceptionV3,
    find_inception_weights,
    load_fid_inception,
    random_inception_state,
    resize_bilinear_tf1,
)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_NAME
    # like the real converted file: plain tensors, no num_batches_tracked buffers
    state = {k: v for k, v in random_inception_state(0).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def net(weights_file: Path) -> FIDInceptionV3:
    return load_fid_inception(weights_file)


@pytest.fixture(scope="module")
def run(net: FIDInceptionV3) -> dict[str, object]:
    """One forward of two uint8 images (the full net at 299 px is the slow part), with Mixed_6d.branch1x1 captured."""
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captured: list[torch.Tensor] = []
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    out = net(images)
    handle.remove()
    return {"images": images, "out": out, "branch1x1": captured[0]}


def test_strict_load_and_output_shapes(net: FIDInceptionV3, weights_file: Path, run: dict) -> None:
    saved = torch.load(weights_file, weights_only=True)
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_6d.branch1x1.bn.running_var", "Mixed_7c.branch_pool.conv.weight",
                "fc.weight", "fc.bias"):
        assert torch.equal(net.state_dict()[key], saved[key])
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # torchvision Inception3, 1008 classes, no aux
    out = run["out"]
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, 2023)
    assert torch.isfinite(out["pool"]).all() and out["pool"].std() > 1e-3
    # IS logits are pool @ W^T without the bias (ADM / torch-fidelity "logits_unbiased")
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T)


def test_spatial_is_mixed_6d_branch1x1_first_7_channels(run: dict) -> None:
    b1 = run["branch1x1"]
    assert b1.shape == (2, 192, 17, 17)
    expected = b1[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC flattening
    torch.testing.assert_close(run["out"]["spatial"], expected)
    assert (expected >= 0).all()  # the ReLU output (TF node mixed_6/conv)


def test_float_input_equals_uint8_and_batch_independence(net: FIDInceptionV3, run: dict) -> None:
    images, ref = run["images"], run["out"]
    # float [0,1] input (here: the second image alone) is quantised to the same uint8 values
    single = net(images[1:].float() / 255.0)
    for kind in ("pool", "logits", "spatial"):
        torch.testing.assert_close(ref[kind][1:], single[kind], rtol=1e-4, atol=1e-5)


def test_wrong_keys_are_rejected(tmp_path: Path) -> None:
    state = random_inception_state(1)
    del state["fc.bias"]
    state["AuxLogits.conv0.conv.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"not the FID Inception state dict.*missing.*fc.bias.*unexpected.*AuxLogits"):
        load_fid_inception(bad)
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_fid_inception(bad)


def test_missing_weights_error_says_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        find_inception_weights()
    msg = str(err.value)
    assert inc.WEIGHTS_URL in msg and "--inception-weights" in msg and inc.WEIGHTS_ENV in msg
    assert str(tmp_path / "hub" / "checkpoints" / inc.WEIGHTS_NAME) in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        find_inception_weights(tmp_path / "nowhere.pth")
    # the torch hub cache location is found without a path; the env var wins over it
    hub_file = tmp_path / "hub" / "checkpoints" / inc.WEIGHTS_NAME
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert find_inception_weights() == hub_file
    env_file = tmp_path / "elsewhere.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(env_file))
    assert find_inception_weights() == env_file


def _tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF-1 ResizeBilinear(align_corners=False), written out pixel by pixel (float32 as TF)."""
    h, w = img.shape
    sy, sx = np.float32(h / out_h), np.float32(w / out_w)
    out = np.zeros((out_h, out_w), np.float32)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0 = int(np.floor(fy))
        y1, dy = min(y0 + 1, h - 1), np.float32(fy - y0)
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0 = int(np.floor(fx))
            x1, dx = min(x0 + 1, w - 1), np.float32(fx - x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[y, x] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("src,dst", [((5, 7), (9, 4)), ((16, 16), (29, 29)), ((33, 20), (11, 13))])
def test_tf1_resize_matches_the_tf_formula(src: tuple[int, int], dst: tuple[int, int]) -> None:
    img = np.random.default_rng(0).integers(0, 256, src).astype(np.float32)
    ours = resize_bilinear_tf1(torch.from_numpy(img)[None, None], dst)[0, 0].numpy()
    np.testing.assert_allclose(ours, _tf1_resize_reference(img, *dst), rtol=0, atol=1e-4)
    # and it is NOT PyTorch's half-pixel bilinear (the pytorch-fid resize)
    half_pixel = F.interpolate(torch.from_numpy(img)[None, None], size=dst, mode="bilinear", align_corners=False)
    assert not np.allclose(ours, half_pixel[0, 0].numpy(), atol=1e-2)


def test_resize_identity_and_pytorch_mode(net: FIDInceptionV3) -> None:
    x = torch.rand(1, 3, 299, 299)
    torch.testing.assert_close(resize_bilinear_tf1(x, 299), x)
    with torch.device("meta"):
        pt = FIDInceptionV3(resize="pytorch")
    small = torch.randint(0, 256, (1, 3, 10, 10), dtype=torch.uint8)
    expected = 2 * F.interpolate(small.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(pt.preprocess(small), expected)
    tf1 = (resize_bilinear_tf1(small.float(), 299) - 128) / 128  # TF graph: resize uint8 values, then (x-128)/128
    torch.testing.assert_close(net.preprocess(small), tf1)
    with pytest.raises(ValueError, match="resize"):
        FIDInceptionV3(resize="bicubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.zeros(2, 1, 8, 8))
