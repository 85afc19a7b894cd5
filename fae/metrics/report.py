"""Evaluation reports: one JSON file per evaluation (numbers + everything needed to trust or repeat them) and a table.

Every report records the metrics, the feature network with its weights hash, the sample counts, the protocol
(resize, IS splits, k of precision/recall, probe grid, ...), the inputs, fae's version and the time.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fae.io import atomic_write_text


@dataclass
class EvalReport:
    kind: str                                   # "generation" | "reconstruction" | "probe" | "reference-stats"
    metrics: dict[str, float | int | None]
    network: dict[str, Any] | None = None
    num_samples: int | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] | None = None   # optional extra rows (e.g. the probe's raw / x̂ / z comparison)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "metrics": {k: _json_number(v) for k, v in self.metrics.items()},
                "feature_network": self.network, "num_samples": self.num_samples, "protocol": self.protocol,
                "inputs": self.inputs, "notes": self.notes, "table": self.table, "fae_version": _fae_version(),
                "python": platform.python_version(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    def format(self) -> str:
        return format_report(self)


def _fae_version() -> str:
    try:
        from fae import __version__
        return str(__version__)
    except ImportError:  # a broken editable install can leave `fae` as a namespace package
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("fae")
        except PackageNotFoundError:
            return "unknown"


def _json_number(v: Any) -> Any:
    # JSON has no inf/nan: write them as strings so the file stays valid JSON
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain aligned text table."""
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
              for row in cells]
    return "\n".join(lines)


def format_report(report: EvalReport) -> str:
    out = []
    net = report.network or {}
    head = f"{report.kind}"
    if net:
        head += f" | network {net.get('name')} (weights {str(net.get('weights_hash', ''))[:12]})"
    if report.num_samples is not None:
        head += f" | {report.num_samples} samples"
    out.append(head)
    if report.table:
        out.append(format_table(report.table))
    else:
        out.append(format_table([{"metric": k, "value": v} for k, v in report.metrics.items()]))
    out += [f"note: {n}" for n in report.notes]
    return "\n".join(out)
