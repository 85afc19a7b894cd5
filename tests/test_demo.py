"""`fae demo --quick` runs every step end to end, records what the report needs, skips finished steps on a re-run,
resumes after a step is lost, and its report references only files that exist."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from fae.cli import main
from fae.demo import STEPS
from fae.report import referenced_images


def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "report:" in capsys.readouterr().out
    results = {s.name: json.loads((out / s.name / "done.json").read_text()) for s in STEPS}

    # the frozen encoder was pretrained, cached, and is a folder FrozenEncoder loads
    assert results["encoder"]["from_cache"] is False
    assert (out / "encoder" / "encoder" / "config.json").is_file()
    assert results["fae"]["images"] == 200 and results["fae"]["cos"] > 0.5
    decoders = results["finetune"]["decoders"]
    assert set(decoders) == {"gaussian(x)", "gaussian(x_hat)", "finetuned(x_hat)"}
    assert results["latents"]["feature_cache"] is not None  # stage 1's features were reused, not recomputed
    for run in ("dit", "dit-raw"):
        assert results[run]["loss_last"] < results[run]["loss_first"]
    samples = results["samples"]
    for key in ("fae/no_guidance", "fae/guidance", "raw/no_guidance", "raw/guidance"):
        assert 0 <= samples[key]["class_agreement"] <= 1 and samples[key]["fd_encoder"] > 0
        assert Path(samples[key]["grid"]).is_file()
    inputs = [row["input"] for row in results["probe"]["rows"]]
    assert len(inputs) == 4 and inputs[-1].startswith("x at random")

    html = (out / "index.html").read_text()
    images = referenced_images(html)
    assert len(images) >= 8, images  # curves, reconstructions, four sample grids
    for src in images:
        assert (out / src).is_file(), src
    for needle in ("class-agreement", "raw features", "PSNR", "random initialisation"):
        assert needle in html

    # a re-run skips everything; losing one step's marker redoes only that step (the encoder from the cache)
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done before") == len(STEPS)
    shutil.rmtree(out / "encoder")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done before") == len(STEPS) - 1
    assert json.loads((out / "encoder" / "done.json").read_text())["from_cache"] is True
