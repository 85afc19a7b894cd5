"""Config headers tell the truth: the numbers a config's leading comment block quotes agree with the file and, for
parameter counts, with the networks it builds (meta device: no memory, no download; the whole file runs in seconds).

The rules are deliberately narrow; a header states these only in these forms (anything else is prose, unchecked):

    count    `600.61M parameters`, `1,413,298,752 parameters`, `38.56M + 170.97M` (M with its printed decimals;
             exact with thousands commas): each equals one built component, or all of them but the discriminator
    patch    `patch 2`, `patch size 1`, `LightningDiT-XL/1`, `SiT-XL/2`: the model's (pixel decoder's) patch_size
    tokens   `16 tokens`, `576 image tokens` (a generator's image tokens, (h/p)(w/p)); `16 MiniLM text tokens`,
             `16 text tokens` (model.text_tokens); `24x24 tokens of width 1536` (the encoder grid and width the FAE,
             pixel decoder or pretrained encoder is built for)
    latent   `16x16x32` (h x w x channels of a generator's input, of an FAE's or a KL-VAE's latents); `24x24 x 1536`
             (the feature grid x width a pixel decoder reads)
    layout   `width 1536`, `depth 24`, `24 heads`, `heads of 64` (head dim) of a generator; `blocks 1-1-1-3` or
             `layers 2-2-2-2-2-18` and `6 flow blocks` of a flow; `4 layers` of the pretrained encoder
    pixels   `384 px`: the image size of a stage that reads images (data.image_size or encoder.input_size)

Text in double quotes is quoted from elsewhere (the paper, a reference) and is not checked. A rule whose quantity a
stage does not have (pixels of a generator, which reads latents) is not applied there.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fae.nn import count_parameters
from fae.stages import load_stage_config, stage_module

ROOT = Path(__file__).resolve().parents[1] / "fae" / "configs"   # configs/ in a checkout is a link to it
CONFIGS = sorted(ROOT.glob("*/*.yaml"))
GENERATORS = ("dit", "flow", "mmdit")


def header(path: Path) -> str:
    """The leading comment block as one line, with quoted text removed."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return re.sub(r'"[^"]*"', " ", " ".join(lines))


def _millions(text: str) -> tuple[float, int]:
    """'600.61M' -> (600.61e6, decimals 2 of millions)."""
    digits = text[:-1]
    return float(digits) * 1e6, len(digits.partition(".")[2])


def _count_matches(quoted: str, allowed: set[int]) -> bool:
    if quoted.endswith("M"):
        value, decimals = _millions(quoted)
        return any(round(n / 1e6, decimals) == round(value / 1e6, decimals) for n in allowed)
    return int(quoted.replace(",", "")) in allowed


COUNT = r"(\d{1,3}(?:,\d{3})+|\d+\.\d+M)"


def _facts(stage: str, cfg: Any) -> dict[str, Any]:
    """The quantities each rule checks, read from the config (a missing key: that rule does not apply)."""
    facts: dict[str, Any] = {}
    m = getattr(cfg, "model", None)
    if stage in GENERATORS:
        h, w = m.input_size
        facts.update(patch=m.patch_size, image_tokens=(h // m.patch_size) * (w // m.patch_size),
                     latent=(h, w, m.in_channels), width=m.hidden_size)
        if stage == "flow":
            facts.update(blocks=tuple(m.layers_per_block), n_blocks=len(m.layers_per_block), head_dim=m.head_dim,
                         heads=m.hidden_size // m.head_dim)
        else:
            facts.update(depth=m.depth, heads=m.num_heads, head_dim=m.hidden_size // m.num_heads)
        if stage == "mmdit":
            facts["text_tokens"] = m.text_tokens
    elif stage == "fae":
        facts.update(grid=(*m.grid, m.feature_dim), latent=(*m.grid, m.latent_channels))
    elif stage == "pixel-decoder" and cfg.decoder is not None:
        side = math.isqrt(cfg.decoder.num_tokens)
        facts.update(patch=cfg.decoder.patch_size, grid=(side, side, cfg.decoder.in_dim))
    elif stage == "encoder":
        side = cfg.data.image_size // m.patch_size
        facts.update(patch=m.patch_size, grid=(side, side, m.hidden_size), layers=m.num_layers)
    elif stage == "kl-vae":
        side = cfg.data.image_size // 2 ** (len(m.block_out_channels) - 1)
        facts["latent"] = (side, side, m.latent_channels)
    if getattr(cfg, "data", None) is not None:
        facts["px"] = {cfg.data.image_size} | ({cfg.encoder.input_size} if getattr(cfg, "encoder", None) else set())
    if not (stage == "pixel-decoder" and cfg.decoder is None):   # a fine-tune takes its decoder from a bundle
        with torch.device("meta"):
            parts = {k: count_parameters(v) for k, v in stage_module(stage).components(cfg).items()}
        facts["counts"] = set(parts.values()) | {sum(n for k, n in parts.items() if k != "discriminator")}
    return facts


# (name, pattern, fact, how a match becomes the claimed value)
Rule = tuple[str, str, str, Callable[[re.Match], Any]]
RULES: list[Rule] = [
    ("patch", r"\bpatch(?: size)? (\d+)\b", "patch", lambda g: int(g[1])),
    ("patch", r"(?:DiT|SiT)(?:-XL)?/(\d+)\b", "patch", lambda g: int(g[1])),
    ("tokens", r"(?<![\dx])(\d+) (?:image )?tokens\b", "image_tokens", lambda g: int(g[1])),
    ("text tokens", r"\b(\d+) (?:[A-Za-z0-9-]+ )?text tokens\b", "text_tokens", lambda g: int(g[1])),
    ("token grid", r"\b(\d+)x(\d+) tokens of width (\d+)\b", "grid", lambda g: (int(g[1]), int(g[2]), int(g[3]))),
    ("latent", r"(?<![\dx])(\d+)x(\d+)x(\d+)(?![\dx])", "latent", lambda g: (int(g[1]), int(g[2]), int(g[3]))),
    ("feature grid", r"\b(\d+)x(\d+) x (\d+)\b", "grid", lambda g: (int(g[1]), int(g[2]), int(g[3]))),
    ("width", r"(?<!tokens of )\bwidth (\d+)\b", "width", lambda g: int(g[1])),
    ("depth", r"\bdepth (\d+)\b", "depth", lambda g: int(g[1])),
    ("heads", r"\b(\d+) heads\b", "heads", lambda g: int(g[1])),
    ("head dim", r"\bheads of (\d+)\b", "head_dim", lambda g: int(g[1])),
    ("blocks", r"\b(?:blocks|layers) (\d+(?:-\d+)+)\b", "blocks", lambda g: tuple(int(x) for x in g[1].split("-"))),
    ("flow blocks", r"\b(\d+) flow blocks\b", "n_blocks", lambda g: int(g[1])),
    ("layers", r"(?<!-)\b(\d+) layers\b", "layers", lambda g: int(g[1])),
    ("pixels", r"\b(\d+) px\b", "px", lambda g: int(g[1])),
]
COUNT_RULES = [rf"{COUNT} \+ {COUNT}", rf"{COUNT} parameters\b"]


def claims(text: str, facts: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(rule, claimed, true) for every checked statement of a header."""
    found = []
    for name, pattern, fact, value in RULES:
        if fact in facts:
            found += [(name, value(g), facts[fact]) for g in re.finditer(pattern, text)]
    for pattern in COUNT_RULES:
        for g in re.finditer(pattern, text):
            if "counts" not in facts:
                raise AssertionError(f"quotes a parameter count ({g[0]}) but builds no network to check it against")
            found += [("count", q, facts["counts"]) for q in g.groups()]
    return found


def _agrees(name: str, claimed: Any, true: Any) -> bool:
    if name == "count":
        return _count_matches(claimed, true)
    return claimed in true if isinstance(true, set) else claimed == true


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_header_numbers_match_the_config(path: Path) -> None:
    overrides = ["finetune_from=x", "fae=y"] if "finetune" in path.name else []
    stage, cfg = load_stage_config(path, overrides)
    found = claims(header(path), _facts(stage, cfg))
    wrong = [f"{name}: header says {claimed}, the file gives {true}" for name, claimed, true in found
             if not _agrees(name, claimed, true)]
    assert not wrong, "\n".join(wrong)


def test_every_rule_is_exercised_by_some_header() -> None:
    """A rule no header triggers would be untested: each catches at least one real statement."""
    texts = [header(p) for p in CONFIGS]
    for name, pattern, _, _ in RULES:
        assert any(re.search(pattern, t) for t in texts), name
    for pattern in COUNT_RULES:
        assert any(re.search(pattern, t) for t in texts), pattern


def test_a_wrong_number_in_a_header_fails(tmp_path: Path) -> None:
    """The rules catch a wrong quote of each kind, and skip what is quoted from elsewhere."""
    source = (ROOT / "paper" / "mmdit_cc12m_384.yaml").read_text()
    for right, wrong in [("2027.55M parameters", "2027.56M parameters"), ("depth 24", "depth 23"),
                         ("patch 1,", "patch 2,"), ("576 image tokens", "577 image tokens"),
                         ("on 24x24x64 latents", "on 24x24x32 latents"), ("24 heads of 64", "24 heads of 32"),
                         ("width 1536", "width 1024")]:
        assert right in source, right
        bad = tmp_path / "bad.yaml"
        bad.write_text(source.replace(right, wrong, 1))
        with pytest.raises(AssertionError, match="header says"):
            test_header_numbers_match_the_config(bad)
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text('# "the reference uses patch 7"\n' + source)
    test_header_numbers_match_the_config(quoted)
