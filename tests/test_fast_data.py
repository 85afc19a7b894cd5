"""Fast data paths: memory-mapped latent shards, DataLoader workers, `fae encode` batching, precision and
its split across torchrun processes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from seeding import subprocess_env
from torch.utils.data import DataLoader, Dataset

from fae.cli import main
from fae.data.latents import LatentCache, LatentDataset, shard_name
from fae.data.loading import loader_options
from fae.data.readable import collate_present
from fae.encoding import EncodeOptions, encode_dataset
from fae.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
CHANNELS, SIDE, ITEMS = 64, 32, 256        # 256 KiB per latent: one 64 MiB shard


class _Indices(Dataset):
    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": torch.tensor([float(index)]), "label": torch.tensor(index % 7)}


def _latents(batch: dict[str, torch.Tensor], with_flip: bool) -> dict[str, torch.Tensor]:
    """Latents that differ per item (seeded by the item), so a row read from the wrong place shows."""
    rows = [torch.randn(CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(int(i))) for i in batch["image"]]
    return {"latents": torch.stack(rows)}


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("big") / "cache"
    return encode_dataset(_latents, _Indices(), out, EncodeOptions(flip=False, shard_size=ITEMS, batch_size=64),
                          progress=False)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_rows_are_views_of_the_shard_file_mapping_and_equal_the_eager_read(big_cache):
    shard = big_cache / shard_name(0)
    cache = LatentCache(big_cache)
    eager = load_bytes(shard.read_bytes())["latents"]
    before = _rss_mib()
    rows = {i: cache.row(i, "latents") for i in (0, 17, 128, 255)}
    grown = _rss_mib() - before
    for i, row in rows.items():
        assert torch.equal(row, eager[i])
        # a view into the shard's mapped "latents" tensor, not a copy of the row (nor of the shard: RSS below)
        assert row.untyped_storage().nbytes() == ITEMS * CHANNELS * SIDE * SIDE * 4
    assert grown < 16, f"reading 4 rows grew the process by {grown:.0f} MiB (the shard is 64 MiB)"
    maps = Path("/proc/self/maps").read_text()
    assert str(shard) in maps                                       # the shard is memory-mapped
    rows[17].mul_(0)                                                # copy-on-write: the file never changes
    assert cache.verify() == [] and torch.equal(load_bytes(shard.read_bytes())["latents"][17], eager[17])


def test_workers_read_the_same_items_as_the_main_process(big_cache):
    dataset = LatentDataset(big_cache, hflip=False, normalize=False)
    keys = [(i, 0) for i in (3, 200, 17, 255, 0, 128, 64, 9)]

    def batches(workers: int) -> list[dict[str, torch.Tensor]]:
        loader = DataLoader(dataset, batch_size=4, sampler=keys, collate_fn=collate_present,
                            **loader_options(workers, "cpu"))
        return [batch for _ in range(2) for batch in loader]           # two passes: persistent workers reused

    direct, workers = batches(0), batches(2)
    assert len(direct) == len(workers) == 4
    for a, b in zip(direct, workers, strict=True):
        assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["label"], b["label"])
    expected = torch.stack([_latents({"image": torch.tensor([float(i)])}, False)["latents"][0] for i, _ in keys[:4]])
    assert torch.equal(direct[0]["latent"], expected)


def test_loader_options():
    assert loader_options(0, "cpu") == {"num_workers": 0, "pin_memory": False}
    assert loader_options(3, "cuda") == {"num_workers": 3, "pin_memory": True, "persistent_workers": True,
                                         "prefetch_factor": 4}
    assert loader_options(2)["persistent_workers"] and not loader_options(2)["pin_memory"]
    with pytest.raises(ValueError, match="num_workers"):
        loader_options(-1)


def test_encode_batches_stop_at_shard_boundaries_with_flips_beside_them(tiny_latent_world, tmp_path):
    """Batches never cross a shard; on a CPU the flipped half is its own encoder call (one 2B call is a GPU's
    choice: 0.8x the speed here); the FAE encoder runs in the precision `auto` picks."""
    from fae.data import DataConfig
    from fae.encoders import FrozenEncoder
    from fae.encoding import encode_latents
    from fae.io import read_bundle_config

    w = tiny_latent_world
    encoder = FrozenEncoder.from_reference(read_bundle_config(w["fae"])["encoder"])
    calls: list[int] = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    data = DataConfig(kind="fashion_mnist", split="test", image_size=16, limit=10)
    out = encode_latents(data, tmp_path / "c", fae=w["fae"], encoder=encoder,
                         options=EncodeOptions(batch_size=4, shard_size=6), progress=False)
    assert calls == [4, 4, 2, 2, 4, 4]                       # shards [0,6) and [6,10), batches of 4, plain + flip
    assert LatentCache(out).manifest["fae_precision"] == resolve_precision("auto").name


def test_two_processes_write_the_same_cache_byte_for_byte(tiny_latent_world, tmp_path, one_thread):
    w = tiny_latent_world
    args = ["encode", "--fae", str(w["fae"]), "--data", str(w["root"] / "data.yaml"), "--shard-size", "8",
            "--batch-size", "3", "--no-progress"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fae.cli"]
    done = subprocess.run(cmd + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(args + ["--out", str(tmp_path / "one"), "--num-workers", "2"]) == 0   # one process, two loaders
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(one) == 7   # 5 shards, stats, manifest
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize("as_dict", [False, True])
def test_plain_and_flipped_halves_give_the_same_results_together_or_apart(as_dict):
    """`batched_halves`: the GPU's one call on the concatenation and the CPU's call per half agree, for tensor and
    dict outputs, and the halves come back in order."""
    from fae.data.features import batched_halves

    calls = []

    def fn(x):
        calls.append(len(x))
        y = x.pow(2).sum(-1)   # row by row, like an encoder
        return {"a": y, "b": -y} if as_dict else y

    plain = torch.randn(3, 4, 5)
    halves = [plain, plain.flip(-1) + 1]
    apart = batched_halves(fn, halves, together=False)
    assert calls == [3, 3]
    together = batched_halves(fn, halves, together=True)
    assert calls == [3, 3, 6]
    assert batched_halves(fn, halves) is not None and calls[-2:] == [3, 3]   # on a CPU: apart
    for one, two in zip(apart, together, strict=True):
        for key in (("a", "b") if as_dict else (None,)):
            torch.testing.assert_close(two[key] if key else two, one[key] if key else one)
    assert not torch.allclose(apart[0]["a"] if as_dict else apart[0], apart[1]["a"] if as_dict else apart[1])
