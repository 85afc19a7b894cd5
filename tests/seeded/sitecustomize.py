"""Loaded by the `python -m fae.cli` children of a test run with FAE_TEST_SEED_OFFSET set (tests/seeding.py): the
child shifts its seeds as the test process does, so a killed-and-resumed run still matches the straight one."""
import os
import sys

if os.environ.get("FAE_TEST_SEED_OFFSET", "0") not in ("", "0"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import seeding

    seeding.install()
