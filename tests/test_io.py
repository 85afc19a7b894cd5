"""fae.io: atomic writes leave the old file or the new one, never half of one; a checkpoint manifest finds damage in
sub-folders as at the top (docs/reliability.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fae.io import atomic_write, manifest_problem, write_checkpoint_manifest


def test_atomic_write_leaves_no_half_file(tmp_path):
    target = tmp_path / "state.txt"
    target.write_text("old, complete")

    def write_half_then_fail(path: Path) -> None:
        path.write_text("new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write_half_then_fail)
    assert target.read_text() == "old, complete" and [p.name for p in tmp_path.iterdir()] == ["state.txt"]
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new"


def test_a_checkpoint_manifest_covers_files_in_sub_folders(tmp_path):
    """A sharded checkpoint keeps its shards under dcp/: damage there must be found like damage at the top."""
    ckpt = tmp_path / "step_00000002"
    (ckpt / "dcp").mkdir(parents=True)
    (ckpt / "training_state.pt").write_bytes(b"state" * 10)
    (ckpt / "dcp" / "__0_0.distcp").write_bytes(b"shard" * 10)
    write_checkpoint_manifest(ckpt)
    assert manifest_problem(ckpt) is None
    (ckpt / "dcp" / "__0_0.distcp").write_bytes(b"shard" * 9 + b"sharD")   # same size, one byte altered
    assert "__0_0.distcp" in manifest_problem(ckpt)
    (ckpt / "dcp" / "__0_0.distcp").unlink()
    assert "__0_0.distcp" in manifest_problem(ckpt)
