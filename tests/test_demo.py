"""`fae demo --quick` runs end to end, skips finished steps on a re-run, and its report references only files
that exist."""
from __future__ import annotations

import json
from pathlib import Path

from fae.cli import main
from fae.report import referenced_images


def test_quick_demo_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    report = out / "index.html"
    assert report.is_file()
    html = report.read_text()
    images = referenced_images(html)
    assert images, "the report should show figures"
    for src in images:
        assert (out / src).is_file(), src
    scores = json.loads((out / "fae" / "done.json").read_text())
    assert scores["images"] == 200 and scores["cos"] > 0.5
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "done before" in capsys.readouterr().out
