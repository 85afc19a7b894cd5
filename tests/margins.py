"""Thresholds on trained, sampled or estimated quantities, asserted and recorded in one call.

A test that bounds something random (a loss after training, an accuracy, an empirical rate) calls
`within("what", value, lo=..., hi=...)` instead of a bare `assert`. The assertion is the same; in addition, when
FAE_MARGINS_OUT names a file, the value and its bounds are appended there as one JSON line.
`benchmarks/test_margins.py` runs every test marked `margin` over seed offsets (tests/seeding.py) and CPU kernels
and reads those lines back: the worst value must clear its bound by at least 3x the measured spread
(docs/testing.md).
"""
from __future__ import annotations

import json
import os

OUT_ENV = "FAE_MARGINS_OUT"


def within(quantity: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Assert lo < value < hi (either side may be open) and record it for the margin table."""
    value = float(value)
    path = os.environ.get(OUT_ENV)
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "quantity": quantity, "value": value, "lo": lo, "hi": hi}) + "\n")
    assert value == value, f"{quantity} is NaN"
    assert lo is None or value > lo, f"{quantity} = {value:.6g}, not above {lo}"
    assert hi is None or value < hi, f"{quantity} = {value:.6g}, not below {hi}"
