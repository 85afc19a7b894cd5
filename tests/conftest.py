import os

# Tests never touch the network: a hub id fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# tiny BLAS calls in tests are much slower multi-threaded when the cores are shared
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import random

import numpy as np
import pytest
import seeding
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
seeding.install()   # FAE_TEST_SEED_OFFSET=k shifts every seed (tests/seeding.py); 0 in CI
if seeding.requested:  # subprocesses that inherit os.environ (spawned workers) shift theirs too
    os.environ["PYTHONPATH"] = seeding.subprocess_env()["PYTHONPATH"]

ORDER_ENV = "FAE_TEST_ORDER_SEED"


def pytest_report_header(config: pytest.Config) -> list[str]:
    order = os.environ.get(ORDER_ENV, "")
    return [f"fae: seed offset {seeding.requested}, order {'shuffled with seed ' + order if order else 'as written'}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}"]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """FAE_TEST_ORDER_SEED=n runs the suite in a shuffled order: the files in a random order and the tests of each
    file in a random order (a file's tests stay together, so its module fixtures are built once)."""
    order = os.environ.get(ORDER_ENV, "")
    if not order:
        return
    rng = random.Random(int(order))
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(files.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    items[:] = [item for group in groups for item in group]


def _process_state() -> dict[str, object]:
    """The process-wide settings a test (or the code it calls) may change and must put back."""
    from fae import nn as fae_nn
    from fae.precision import _FP32_BACKENDS, _fp32_backends, cpu_matmul_timing

    state: dict[str, object] = {
        "torch threads": torch.get_num_threads(),
        "grad enabled": torch.is_grad_enabled(),
        "default dtype": torch.get_default_dtype(),
        "cpu autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "attention backend": fae_nn._DEFAULT_BACKEND,
        "mkldnn enabled": torch.backends.mkldnn.enabled,
        # torch's compiler notes its own cache folder and bookkeeping in the environment on first use
        "environment": {k: v for k, v in os.environ.items()
                        if k != "PYTEST_CURRENT_TEST" and not k.lstrip("_").startswith("TORCHINDUCTOR_")},
    }
    # the fp32 precision flags fae's own switches set (TF32 on CUDA, bf16 in oneDNN), found as fae.precision finds them
    state[f"fp32_precision of {', '.join(_FP32_BACKENDS)}"] = [b.fp32_precision for b in _fp32_backends(_FP32_BACKENDS)]
    # the precision verdict: a cached one must stay (clearing or replacing it changes later tests' precision)
    state["precision verdict"] = cpu_matmul_timing() if cpu_matmul_timing.cache_info().currsize else None
    return state


@pytest.fixture(autouse=True)
def _restored_process_state(request: pytest.FixtureRequest):
    """After every test, the process-wide settings are as before it: threads, autocast, TF32/oneDNN precision flags,
    fae's attention backend, the precision verdict and the environment. A test that leaks one fails by name."""
    before = _process_state()
    yield
    after = _process_state()
    if before["precision verdict"] is None:   # computed for the first time during the test: that is allowed
        after["precision verdict"] = None
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if "environment" in changed:
        old, new = changed["environment"]
        changed["environment"] = {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys()  # type: ignore[union-attr]
                                  if old.get(k) != new.get(k)}  # type: ignore[union-attr]
    if changed:
        pytest.fail(f"{request.node.nodeid} left process-wide settings changed (before, after): {changed}",
                    pytrace=False)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest):
    pinned = request.node.get_closest_marker("pinned_seeds") is not None
    seeding.active = 0 if pinned else seeding.requested
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    seeding.active = seeding.requested


@pytest.fixture
def one_thread():
    """Tiny tensor ops: a second thread only adds synchronisation (80x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Kernel verdicts (fae.kernels): none known to this process, an empty machine cache, no override in force."""
    import fae.kernels

    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "cache"))
    for variable in set(fae.kernels.OVERRIDES.values()) | {"FAE_KERNEL_CACHE"}:
        monkeypatch.delenv(variable, raising=False)
    fae.kernels.reset()
    yield tmp_path
    fae.kernels.reset()


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """The suite's one tiny frozen encoder: a DINOv2 of width 32, one layer, two heads, patch 4 at 16 px (4x4 tokens),
    saved as the hub holds one, so tests load it through the same path a hub id takes. (tests/test_encoders.py
    builds every other kind itself: that is what it tests.)"""
    from fae.encoders import save_tiny_encoder

    return save_tiny_encoder("dinov2", tmp_path_factory.mktemp("tiny-encoder") / "dinov2", hidden_size=32,
                             num_layers=1, num_heads=2, patch_size=4, image_size=16)


@pytest.fixture(scope="session")
def tiny_latent_world(tmp_path_factory, tiny_encoder_dir):
    """A tiny FAE (4x4x4 latents) on the tiny encoder, its pipeline bundle (with a pixel decoder) and a latent cache
    of 40 Fashion-MNIST test images: what a generator stage trains on and `fae sample` decodes with."""
    from tiny import tiny_fae_config

    from fae.cli import main
    from fae.encoders import EncoderConfig, FrozenEncoder
    from fae.models.autoencoder import FeatureAutoEncoder
    from fae.models.pixel_decoder import PixelDecoder, PixelDecoderConfig
    from fae.tokenizers import FAE

    root = tmp_path_factory.mktemp("latent-world")
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir)))
    torch.manual_seed(0)
    fae = FeatureAutoEncoder(tiny_fae_config())
    fae_bundle = fae.save_pretrained(root / "fae", extra={"encoder": encoder.reference()})
    pd = PixelDecoder(PixelDecoderConfig(in_dim=32, num_tokens=16, patch_size=4, width=32, depth=1, num_heads=2,
                                         refine_channels=0))
    pipeline = FAE(encoder, fae, pd).save_pretrained(root / "pipeline")
    (root / "data.yaml").write_text("data: {kind: fashion_mnist, split: test, image_size: 16, limit: 40}\n")
    assert main(["encode", "--fae", str(fae_bundle), "--data", str(root / "data.yaml"), "--out", str(root / "cache"),
                 "--shard-size", "16", "--no-progress"]) == 0
    return {"root": root, "fae": fae_bundle, "pipeline": pipeline, "cache": root / "cache"}
