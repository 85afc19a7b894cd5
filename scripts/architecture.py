"""The package's rooms, read from the code: which room imports which, the floors, and the lines per room.

    .venv/bin/python scripts/architecture.py            # print the generated block
    .venv/bin/python scripts/architecture.py --write    # rewrite it inside docs/architecture.md
    .venv/bin/python scripts/architecture.py --check    # exit 1 when docs/architecture.md is stale (CI)

A room is a top-level module `fae/x.py` (`fae.x`) or a top-level subpackage `fae/x/` with all its modules (`fae.x`);
`fae/__init__.py` is the root room `fae` and `fae/__main__.py` belongs to `fae.cli`. Every `import` and `from ... import`
counts, at module level or inside a function, absolute or relative. Imports under `if TYPE_CHECKING:` never run, so
they are left out of the graph and the floors and listed on their own line instead (import-linter still counts them).
Imports spelled as strings (`importlib.import_module`) are not seen. A room's floor is 1 + the highest floor of the
rooms it imports (floor 0 imports no room). Any cycle is reported and the script exits 2.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = Path("docs/architecture.md")
BEGIN = "<!-- architecture:begin -->"
END = "<!-- architecture:end -->"
ENTRY_ROOM = "cli"  # the package's __main__.py belongs to this room
STALE = f"{DOC.as_posix()} is stale: run python scripts/architecture.py --write"


@dataclass
class Architecture:
    """What the code says: rooms with their files and lines, and who imports whom."""
    package: str
    files: dict[str, list[str]] = field(default_factory=dict)        # room -> its .py files (repo-relative, sorted)
    lines: dict[str, int] = field(default_factory=dict)              # room -> physical lines of its files
    edges: dict[str, set[str]] = field(default_factory=dict)         # room -> rooms it imports at run time
    type_only: dict[str, set[str]] = field(default_factory=dict)     # room -> rooms imported only under TYPE_CHECKING
    largest: tuple[str, int] = ("", 0)                               # (file, lines)


def _python_files(pkg_dir: Path) -> list[Path]:
    return sorted(p for p in pkg_dir.rglob("*.py") if "__pycache__" not in p.parts)


def room_of_file(path: Path, pkg_dir: Path) -> str:
    """`fae/x.py` and `fae/x/.../y.py` -> `fae.x`; `fae/__init__.py` -> `fae`; `fae/__main__.py` -> `fae.cli` when
    there is a cli room (`python -m fae` is the `fae` command)."""
    rel = path.relative_to(pkg_dir).parts
    if rel == ("__init__.py",):
        return pkg_dir.name
    if rel == ("__main__.py",) and ((pkg_dir / f"{ENTRY_ROOM}.py").is_file() or (pkg_dir / ENTRY_ROOM).is_dir()):
        return f"{pkg_dir.name}.{ENTRY_ROOM}"
    return f"{pkg_dir.name}.{rel[0].removesuffix('.py')}"


def module_name(path: Path, pkg_dir: Path) -> str:
    parts = [pkg_dir.name, *path.relative_to(pkg_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(source: str, module: str, is_package: bool) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """What a file imports, as (absolute module, name imported from it or ""): (at run time, only under
    `if TYPE_CHECKING:`). `from a import b` gives ("a", "b") since `b` may be a submodule of `a`."""
    runtime: set[tuple[str, str]] = set()
    type_only: set[tuple[str, str]] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, guarded)
            return
        found = type_only if guarded else runtime
        if isinstance(node, ast.Import):
            found.update((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            found.update((base, "" if alias.name == "*" else alias.name) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return runtime, type_only


def room_of_import(module: str, name: str, rooms: set[str], package: str) -> str | None:
    """The room an import lands in, or None outside the package. `from fae import x` lands in `fae.x` when that is a
    room and in the root room `fae` otherwise."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    if len(parts) == 1 and name:
        parts.append(name)
    if len(parts) > 1 and f"{package}.{parts[1]}" in rooms:
        return f"{package}.{parts[1]}"
    return package if package in rooms else None


def analyse(pkg_dir: Path, repo: Path | None = None) -> Architecture:
    """Read every .py file under `pkg_dir` (the package's folder; its name is the package's name)."""
    repo = repo or pkg_dir.parent
    package = pkg_dir.name
    arch = Architecture(package)
    files = _python_files(pkg_dir)
    for path in files:
        arch.files.setdefault(room_of_file(path, pkg_dir), []).append(path.relative_to(repo).as_posix())
    rooms = set(arch.files)
    for path in files:
        room = room_of_file(path, pkg_dir)
        text = path.read_text(encoding="utf-8")
        count, rel = len(text.splitlines()), path.relative_to(repo).as_posix()
        arch.lines[room] = arch.lines.get(room, 0) + count
        if count > arch.largest[1] or not arch.largest[0]:  # ties: the first path in sorted order
            arch.largest = (rel, count)
        runtime, guarded = imported_modules(text, module_name(path, pkg_dir), path.name == "__init__.py")
        for found, into in ((runtime, arch.edges), (guarded, arch.type_only)):
            landed = {room_of_import(module, name, rooms, package) for module, name in found}
            into.setdefault(room, set()).update(landed - {None, room})
    for room in rooms:
        arch.type_only[room] -= arch.edges[room]
    return arch


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Longest-path layering: 1 + the highest floor of what a room imports (0: imports no room). The rooms of a
    cycle share one floor, so that a drawing is still possible while the cycle is reported."""
    component = {room: tuple(c) for c in strongly_connected(edges) for room in c}
    memo: dict[tuple[str, ...], int] = {}

    def floor(comp: tuple[str, ...]) -> int:
        if comp not in memo:
            below = {component[t] for r in comp for t in edges[r]} - {comp}
            memo[comp] = 1 + max((floor(c) for c in below), default=-1)
        return memo[comp]

    return {room: floor(component[room]) for room in edges}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per group of rooms that import each other, as [a, b, ..., a]; empty when there is none."""
    found = []
    for comp in strongly_connected(edges):
        if len(comp) < 2:
            continue
        start, members = comp[0], set(comp)
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth first from `start` back to itself, inside the component
            v = queue.popleft()
            if start in edges[v]:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                found.append([start, *reversed(path[:-1]), start])
                break
            for w in sorted(edges[v] & members):
                if w not in previous and w != start:
                    previous[w] = v
                    queue.append(w)
    return sorted(found)


def reduced(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The edges that no longer path already implies (a transitive reduction), for a drawing that stays readable."""
    floor = floors(edges)
    reach: dict[str, set[str]] = {}
    for v in sorted(edges, key=lambda r: (floor[r], r)):  # a room's imports sit on lower floors, so come first
        reach[v] = set(edges[v]).union(*(reach.get(w, set()) for w in edges[v]))
    return {v: {w for w in ws if not any(w in reach.get(u, set()) for u in ws - {w})} for v, ws in edges.items()}


def _short(room: str, package: str) -> str:
    return room.removeprefix(f"{package}.")


def _order(rooms: set[str] | list[str], floor: dict[str, int]) -> list[str]:
    return sorted(rooms, key=lambda r: (-floor[r], r))


def _wrap(words: list[str], indent: int, width: int = 116) -> str:
    lines = [""]
    for word in words:
        piece = word if not lines[-1] else f" {word}"
        if lines[-1] and indent + len(lines[-1]) + len(piece) > width:
            lines.append(word)
        else:
            lines[-1] += piece
    return ("\n" + " " * indent).join(lines)


def render(arch: Architecture) -> str:
    """The generated Markdown block, markers included."""
    floor = floors(arch.edges)
    top = max(floor.values(), default=0)
    name_width = max((len(r) for r in arch.edges), default=0)
    label_width = len(f"floor {top}")
    diagram = []
    for level in range(top, -1, -1):
        for i, room in enumerate(sorted(r for r in arch.edges if floor[r] == level)):
            label = f"floor {level}" if i == 0 else ""
            head = f"{label:<{label_width}}  {room:<{name_width}}"
            targets = [f"{_short(r, arch.package)}," for r in _order(arch.edges[room], floor)]
            if targets:
                targets[-1] = targets[-1].rstrip(",")
                head += " → " + _wrap(targets, len(head) + 3)
            diagram.append(head.rstrip())
    out = [BEGIN, "<!-- generated by scripts/architecture.py from the imports in the code; do not edit by hand -->", "",
           "Floors from the top down; after each room, the rooms it imports (highest floor first):", "", "```",
           *diagram, "```", ""]
    guarded = [f"{room} → {', '.join(_short(r, arch.package) for r in _order(arch.type_only[room], floor))}"
               for room in sorted(arch.type_only) if arch.type_only[room]]
    if guarded:
        out += ["Imported only under `if TYPE_CHECKING:` (left out above): " + "; ".join(guarded) + ".", ""]
    out += ["The same graph without the arrows that a longer path already implies:", "", "```mermaid", "graph TD"]
    ids = {room: room.replace(".", "_") for room in arch.edges}
    lean = reduced(arch.edges)
    for room in _order(list(arch.edges), floor):
        out.append(f"    {ids[room]}[{room}]")
    for room in _order(list(arch.edges), floor):
        out += [f"    {ids[room]} --> {ids[t]}" for t in _order(lean[room], floor)]
    out += ["```", "", "| room | files | lines |", "|---|---:|---:|"]
    for room in sorted(arch.lines, key=lambda r: (-arch.lines[r], r)):
        out.append(f"| {room} | {len(arch.files[room])} | {arch.lines[room]:,} |")
    out.append(f"| **total** | **{sum(len(f) for f in arch.files.values())}** | **{sum(arch.lines.values()):,}** |")
    out += ["", f"The largest file is `{arch.largest[0]}` ({arch.largest[1]:,} lines).", END]
    return "\n".join(out)


def splice(doc: str, block: str) -> str:
    """`doc` with the text between the markers (markers included) replaced by `block`."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start or doc.count(BEGIN) != 1 or doc.count(END) != 1:
        raise ValueError(f"{DOC.as_posix()} needs one {BEGIN} line followed by one {END} line")
    return doc[:start] + block + doc[end + len(END):]


def check(repo: Path = REPO, package: str = "fae") -> bool:
    """Whether the block in the repository's docs/architecture.md is what the code gives."""
    doc = (repo / DOC).read_text(encoding="utf-8")
    try:
        return splice(doc, render(analyse(repo / package, repo))) == doc
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite the generated block in {DOC.as_posix()}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {DOC.as_posix()} is stale")
    args = parser.parse_args(argv)
    arch = analyse(REPO / "fae", REPO)
    loops = cycles(arch.edges)
    for loop in loops:
        print("rooms import each other: " + " → ".join(loop), file=sys.stderr)
    if loops:
        return 2
    if args.check:
        if not check(REPO):
            print(STALE, file=sys.stderr)
            return 1
        return 0
    block = render(arch)
    if args.write:
        path = REPO / DOC
        doc = path.read_text(encoding="utf-8")
        new = splice(doc, block)
        if new != doc:
            path.write_text(new, encoding="utf-8")
        print(f"{DOC.as_posix()}: {'rewritten' if new != doc else 'already current'}")
        return 0
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
