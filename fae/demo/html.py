"""HTML reports, loss-curve plots and image grids for runs and the demo.

A report is a single `index.html` whose images sit beside it (relative links), so the folder can be zipped,
copied or opened from disk in any browser. Nothing here needs a network or a template engine.
"""
from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fae.io import atomic_write_text


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Figure:
    path: Path            # an image file inside (or below) the report folder
    caption: str = ""


@dataclass
class Section:
    title: str
    text: Sequence[str] = ()
    tables: Sequence[Table] = ()
    figures: Sequence[Figure] = ()
    extra_html: str = ""   # already-escaped HTML (e.g. a small list)


@dataclass
class Report:
    title: str
    intro: Sequence[str] = ()
    sections: list[Section] = field(default_factory=list)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; } caption { text-align: left; color: #555; padding: .3em 0; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: .6em 1em .6em 0; vertical-align: top; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9em; max-width: 520px; }
code { background: #f3f3f3; padding: 0 .25em; }
"""


def render_html(report: Report, out_dir: Path) -> str:
    parts = [f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(report.title)}</h1>"]
    parts += [f"<p>{html.escape(p)}</p>" for p in report.intro]
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.text]
        for table in section.tables:
            parts.append("<table>")
            if table.caption:
                parts.append(f"<caption>{html.escape(table.caption)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header) + "</tr>")
            for row in table.rows:
                parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
            parts.append("</table>")
        for fig in section.figures:
            rel = os.path.relpath(Path(fig.path).resolve(), out_dir.resolve())
            parts.append(f"<figure><img src='{html.escape(Path(rel).as_posix())}' alt='{html.escape(fig.caption)}'>"
                         f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
        parts.append(section.extra_html)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(report: Report, out_dir: str | Path, name: str = "index.html") -> Path:
    out_dir = Path(out_dir)
    for section in report.sections:
        for fig in section.figures:
            if not Path(fig.path).is_file():
                raise FileNotFoundError(f"report figure {fig.path} does not exist")
    path = out_dir / name
    atomic_write_text(path, render_html(report, out_dir))
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(series: dict[str, Sequence[dict[str, Any]]], keys: Sequence[str], path: str | Path,
                title: str = "", logy: bool = True) -> Path:
    """One panel per key; each entry of `series` (a run's metrics.jsonl rows) is a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, rows in series.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        if logy and all(r[key] > 0 for rows in series.values() for r in rows if key in r):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(series) > 1 and ax.get_lines():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def referenced_images(html_text: str) -> list[str]:
    """The `src` of every <img> in a page (used by tests to check a report is complete)."""
    from html.parser import HTMLParser

    found: list[str] = []

    class _Parser(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                found.extend(v for k, v in attrs if k == "src" and v)

    _Parser().feed(html_text)
    return found
