"""Shaking the suite: `FAE_TEST_SEED_OFFSET=k` shifts every integer seed the tests and the code under test use.

A test's verdict should not hang on one random draw. With k != 0 every seed given to `torch.manual_seed`,
`torch.Generator().manual_seed`, `numpy.random.default_rng`, `numpy.random.seed` and `random.seed` becomes
seed + k, in this process and in the `python -m fae.cli` subprocesses the tests start (through `sitecustomize`
in tests/seeded/, which `subprocess_env` puts on their PYTHONPATH). Model initialisations, data orders, noise
and sampled classes therefore all move together, and two runs inside one test that share a seed still agree.

A test whose claim is about one specific draw (a stored golden value, say) is marked
`@pytest.mark.pinned_seeds("why")`: inside it the offset is 0. docs/testing.md lists them.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

ENV = "FAE_TEST_SEED_OFFSET"
ROOT = Path(__file__).resolve().parents[1]
HOOK_DIR = Path(__file__).resolve().parent / "seeded"

requested = int(os.environ.get(ENV, "0") or 0)
active = requested          # what the patched functions add right now (0 inside a pinned test)
_installed = False


def shifted(seed: object) -> object:
    """An integer seed moved by the active offset (kept in 0..2**63-1); anything else (None, arrays) unchanged."""
    if active and isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return (int(seed) + active) % (2 ** 63)
    return seed


def install() -> None:
    """Patch the seeding functions (once per process) when an offset was requested."""
    global _installed
    if _installed or not requested:
        return
    _installed = True
    torch_seed, np_seed, np_rng, py_seed = torch.manual_seed, np.random.seed, np.random.default_rng, random.seed

    class Generator(torch.Generator):
        def manual_seed(self, seed):  # noqa: ANN001 (torch's signature)
            return super().manual_seed(shifted(seed))

    torch.Generator = Generator  # type: ignore[misc]
    torch.manual_seed = lambda seed: torch_seed(shifted(seed))  # type: ignore[assignment]
    torch.random.manual_seed = torch.manual_seed  # type: ignore[assignment]
    np.random.seed = lambda seed=None: np_seed(shifted(seed))  # type: ignore[assignment]
    np.random.default_rng = lambda seed=None: np_rng(shifted(seed))  # type: ignore[assignment]
    random.seed = lambda a=None, version=2: py_seed(shifted(a), version)  # type: ignore[assignment]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m fae.cli` child: this checkout importable, and the same seed offset."""
    paths = [str(HOOK_DIR)] if requested else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT)]), **extra}
    return env
