"""scripts/architecture.py reads rooms, imports, floors, lines and cycles right (on a tiny package), and
docs/architecture.md is what it generates from the code today."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# every import form the script must see: absolute, `from pkg import x`, relative, inside a function, TYPE_CHECKING
FILES = {
    "__init__.py": '__version__ = "1"\n',
    "__main__.py": "from pkg.cli import main\n\nmain()\n",
    "base.py": "import os\n\nX = os.sep\n",
    "extra.py": "import pkg.base\n",
    "mid/__init__.py": "from pkg import base\n",
    "mid/impl.py": "from . import helper\n\n\ndef f():\n    from ..base import X\n    return X\n",
    "mid/helper.py": "",
    "top.py": ("from typing import TYPE_CHECKING\n\nimport pkg.mid.impl\nfrom pkg import __version__\n\n"
               "if TYPE_CHECKING:\n    from pkg import extra\n"),
    "cli/__init__.py": "def main():\n    from pkg import top\n    return top\n",
}


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_rooms_edges_floors_and_lines(tmp_path: Path) -> None:
    arch_script = _script()
    arch = arch_script.analyse(_package(tmp_path, FILES), tmp_path)
    assert arch.edges == {"pkg": set(), "pkg.base": set(), "pkg.extra": {"pkg.base"}, "pkg.mid": {"pkg.base"},
                          "pkg.top": {"pkg.mid", "pkg"}, "pkg.cli": {"pkg.top"}}
    assert arch.type_only["pkg.top"] == {"pkg.extra"} and not any(arch.type_only[r] for r in arch.type_only if r != "pkg.top")
    assert arch_script.floors(arch.edges) == {"pkg": 0, "pkg.base": 0, "pkg.extra": 1, "pkg.mid": 1, "pkg.top": 2,
                                              "pkg.cli": 3}
    assert arch.files["pkg.cli"] == ["pkg/__main__.py", "pkg/cli/__init__.py"]  # python -m pkg is the cli's
    assert arch.lines == {"pkg": 1, "pkg.base": 3, "pkg.extra": 1, "pkg.mid": 1 + 6 + 0, "pkg.top": 7, "pkg.cli": 3 + 3}
    assert arch.largest == ("pkg/top.py", 7)
    assert arch_script.cycles(arch.edges) == []
    block = arch_script.render(arch)
    assert "floor 3  pkg.cli   → top\n" in block and "         pkg.mid   → base\n" in block
    assert "Imported only under `if TYPE_CHECKING:` (left out above): pkg.top → extra." in block
    assert "| pkg.top | 1 | 7 |" in block and "| **total** | **9** | **25** |" in block
    assert "    pkg_cli --> pkg_top\n" in block and "pkg_top --> pkg_base" not in block  # mermaid: reduced
    assert block == arch_script.render(arch_script.analyse(tmp_path / "pkg", tmp_path))  # deterministic


def test_cycles_are_found(tmp_path: Path) -> None:
    arch_script = _script()
    files = dict(FILES, **{"base.py": "def g():\n    from pkg.top import y\n    return y\n"})
    edges = arch_script.analyse(_package(tmp_path, files), tmp_path).edges
    assert arch_script.cycles(edges) == [["pkg.base", "pkg.top", "pkg.mid", "pkg.base"]]
    floor = arch_script.floors(edges)  # still drawable: the cycle shares a floor
    assert floor["pkg.base"] == floor["pkg.mid"] == floor["pkg.top"] == floor["pkg.cli"] - 1


def test_check_sees_a_stale_block(tmp_path: Path) -> None:
    arch_script = _script()
    pkg = _package(tmp_path, FILES)
    doc = tmp_path / "docs" / "architecture.md"
    doc.parent.mkdir()
    doc.write_text(f"# title\n\n{arch_script.BEGIN}\nold\n{arch_script.END}\n\nprose\n")
    assert not arch_script.check(tmp_path, "pkg")
    doc.write_text(arch_script.splice(doc.read_text(), arch_script.render(arch_script.analyse(pkg, tmp_path))))
    assert arch_script.check(tmp_path, "pkg") and doc.read_text().endswith(f"{arch_script.END}\n\nprose\n")


def test_docs_architecture_is_current() -> None:
    assert _script().check(ROOT), _script().STALE


def test_every_type_ignore_names_its_code_and_its_reason():
    """mypy runs over fae/ in CI; an ignore it needs says which error and why (`# type: ignore[code]  # reason`)."""
    import re

    bare = []
    for path in sorted((ROOT / "fae").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "type: ignore" in line and not re.search(r"# type: ignore\[[a-z, -]+\]  # \S", line):
                bare.append(f"{path.relative_to(ROOT)}:{number}")
    assert not bare, f"type: ignore without a code and a reason: {bare}"
