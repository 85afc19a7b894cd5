"""benchmarks/mutation.py stays usable as the code moves: every mutation still applies to exactly one place, names
existing tests, and the list keeps its first table's rows (ddp-off, lr-flat, ...) and covers the core modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("mutation", ROOT / "benchmarks" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_once_and_names_existing_tests():
    mutation = _module()
    assert mutation.check(mutation.MUTATIONS) == []
    ids = {m.id for m in mutation.MUTATIONS}
    table = {"ddp-off", "generate-shift-1", "dit-default-transport", "lr-flat", "no-grad-clip", "inception-7c-avg",
             "inception-count-pad", "inception-bn-eps", "fae-no-pos-table"}
    assert table <= ids and len(ids) >= len(table) + 80
    files = {m.file for m in mutation.MUTATIONS}
    for core in ("fae/transport.py", "fae/training.py", "fae/io.py", "fae/stages/dit.py", "fae/metrics/inception.py",
                 "fae/metrics/frechet.py", "fae/models/dit.py", "fae/models/autoencoder.py",
                 # and the flow, the text-to-image model, the precision verdict, FSDP and the latent cache
                 "fae/models/starflow.py", "fae/models/mmdit.py", "fae/precision.py", "fae/sharding.py",
                 "fae/data/latents.py"):
        assert core in files, core
    per_file = {f: sum(m.file == f for m in mutation.MUTATIONS) for f in files}
    for module in ("fae/models/starflow.py", "fae/models/mmdit.py", "fae/precision.py", "fae/data/latents.py"):
        assert per_file[module] >= 2, module


def test_check_names_a_stale_mutation(tmp_path):
    mutation = _module()
    (tmp_path / "fae").mkdir()
    (tmp_path / "fae" / "x.py").write_text("a = 1\na = 1\n")
    stale = [mutation.Mutation("twice", "fae/x.py", "a = 1", "a = 2", ("tests/none.py",), ""),
             mutation.Mutation("gone", "fae/x.py", "b = 1", "b = 2", (), "")]
    problems = mutation.check(stale, root=tmp_path)
    assert any("twice" in p and "2 times" in p for p in problems) and any("none.py" in p for p in problems)
    assert any("gone" in p and "0 times" in p for p in problems)
