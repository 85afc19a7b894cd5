import os

# Tests never touch the network: a hub id fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# tiny BLAS calls in tests are much slower multi-threaded when the cores are shared
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """The suite's one tiny frozen encoder: a DINOv2 of width 32, one layer, two heads, patch 4 at 16 px (4x4 tokens),
    saved as the hub holds one, so tests load it through the same path a hub id takes. (tests/test_encoders.py
    builds every other kind itself: that is what it tests.)"""
    from fae.encoders import save_tiny_encoder

    return save_tiny_encoder("dinov2", tmp_path_factory.mktemp("tiny-encoder") / "dinov2", hidden_size=32,
                             num_layers=1, num_heads=2, patch_size=4, image_size=16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensor ops: a second thread only adds synchronisation (80x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_latent_world(tmp_path_factory, tiny_encoder_dir):
    """A tiny FAE (4x4x4 latents) on the tiny encoder, its pipeline bundle (with a pixel decoder) and a latent cache
    of 40 Fashion-MNIST test images: what a generator stage trains on and `fae sample` decodes with."""
    from fae.cli import main
    from fae.encoders import EncoderConfig, FrozenEncoder
    from fae.models.autoencoder import FAEConfig, FeatureAutoEncoder
    from fae.models.pixel_decoder import PixelDecoder, PixelDecoderConfig
    from fae.pipeline import FAE

    root = tmp_path_factory.mktemp("latent-world")
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir)))
    torch.manual_seed(0)
    fae = FeatureAutoEncoder(FAEConfig(feature_dim=32, grid=(4, 4), latent_channels=4, encoder_heads=2,
                                       encoder_head_dim=8, decoder_depth=1, decoder_heads=2))
    fae_bundle = fae.save_pretrained(root / "fae", extra={"encoder": encoder.reference()})
    pd = PixelDecoder(PixelDecoderConfig(in_dim=32, num_tokens=16, patch_size=4, width=32, depth=1, num_heads=2,
                                         refine_channels=0))
    pipeline = FAE(encoder, fae, pd).save_pretrained(root / "pipeline")
    (root / "data.yaml").write_text("data: {kind: fashion_mnist, split: test, image_size: 16, limit: 40}\n")
    assert main(["encode", "--fae", str(fae_bundle), "--data", str(root / "data.yaml"), "--out", str(root / "cache"),
                 "--shard-size", "16", "--no-progress"]) == 0
    return {"root": root, "fae": fae_bundle, "pipeline": pipeline, "cache": root / "cache"}
