"""The rooms of `harness/` and the imports between them, read from the code.

`python -m tools.layout` prints the picture of docs/architecture.md; `--write` puts it
there, between its two markers (tests/unit/test_layout.py fails when the page is stale).
Every import counts, at any depth (inside functions too)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "harness"
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- layout: begin -->", "<!-- layout: end -->"

# Rooms from the ground up: a room may import its own room and the rooms before it.
ROOMS = ("shared", "data", "extractors/engine", "extractors", "cknna", "study/report", "study",
         "wiring")
SHARED = {"harness", "harness.errors", "harness.io", "harness.provenance", "harness.progress",
          "harness.locks", "harness.ranks", "harness.threads"}
WIRING = ("harness.cli", "harness.__main__", "harness.commands")
# The extractors package's face (a docstring only) is what the registry walks to find the
# families, so it stands with the engine.
FACES = {"harness.extractors": "extractors/engine"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def room_of(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module in FACES:
        return FACES[module]
    if any(module == w or module.startswith(w + ".") for w in WIRING):
        return "wiring"
    for room in sorted(ROOMS, key=len, reverse=True):
        prefix = "harness." + room.replace("/", ".")
        if module == prefix or module.startswith(prefix + "."):
            return room
    raise KeyError(f"{module}: in no room of tools/layout.py")


def imports_of(module: str, source: str, known) -> set[str]:
    """The package modules `source` imports, at any depth; `from P import name` counts as
    P.name when that is a module, else as P."""
    package = module if module in known and known[module].name == "__init__.py" else \
        module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p.read_text(), known) for m, p in known.items()}


def _bound(source: str) -> set[str]:
    """Names a module binds at its top level (what `from it import name` may take)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def stale_imports(paths) -> list[str]:
    """Imports of harness names that this tree does not have (an old path after a move:
    an editable install elsewhere could still answer them)."""
    known = modules()
    bound = {m: _bound(p.read_text()) for m, p in known.items()}
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                missing = [a.name for a in node.names
                           if a.name.split(".")[0] == "harness" and a.name not in known]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                    node.module.split(".")[0] == "harness":
                missing = [node.module] if node.module not in known else \
                    [f"{node.module}.{a.name}" for a in node.names
                     if f"{node.module}.{a.name}" not in known and a.name not in bound[node.module]]
            else:
                continue
            found += [f"{path}:{node.lineno}: {m}" for m in missing]
    return found


def uphill(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a lower room to a higher one."""
    return [f"{a} ({room_of(a)}) imports {b} ({room_of(b)})" for a in sorted(edges)
            for b in sorted(edges[a]) if ROOMS.index(room_of(b)) > ROOMS.index(room_of(a))]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules that import each other in a loop (strongly connected, more than one)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def picture() -> str:
    """The rooms, top floor first: what each holds and which rooms it imports."""
    edges = graph()
    members: dict[str, list[str]] = {r: [] for r in ROOMS}
    for m in edges:
        members[room_of(m)].append(m)
    arrows = {r: set() for r in ROOMS}
    for a, targets in edges.items():
        arrows[room_of(a)] |= {room_of(b) for b in targets} - {room_of(a)}
    floor: dict[str, int] = {}
    for r in ROOMS:  # ground first, so every room below is known
        floor[r] = 1 + max((floor[t] for t in arrows[r]), default=0)
    lines = []
    for r in sorted(ROOMS, key=lambda r: (-floor[r], -ROOMS.index(r))):
        folder = "harness/" if r in ("shared", "wiring") else f"harness/{r}/"
        below = ", ".join(sorted(arrows[r], key=ROOMS.index, reverse=True)) or "-"
        lines.append(f"floor {floor[r]}  {r:<17} -> {below}")
        lines.extend(_wrap(f"{folder}: {_names(members[r], r)}", "           "))
    n_edges = sum(len(t) for t in edges.values())
    lines.append(f"({len(edges)} modules, {n_edges} imports, "
                 f"{sum(len(a) for a in arrows.values())} arrows between rooms)")
    return "\n".join(lines)


def _names(modules: list[str], room: str) -> str:
    """A room's modules under its folder; a sub-package's as pkg/{a, b}."""
    prefix = "harness" if room in ("shared", "wiring") else "harness." + room.replace("/", ".")
    groups: dict[str, list[str]] = {}
    for m in sorted(modules):
        if m in FACES:
            groups.setdefault(f"(face of {m.replace('.', '/')}/)", [])
            continue
        rest = m[len(prefix):].lstrip(".").split(".") if m != prefix else ["__init__"]
        groups.setdefault(rest[0], [])
        if len(rest) > 1 or (m != prefix and (PACKAGE.parent / m.replace(".", "/")).is_dir()):
            groups[rest[0]].append(rest[1] if len(rest) > 1 else "__init__")
    return ", ".join(f"{g}/{{{', '.join(sorted(sub))}}}" if sub else g
                     for g, sub in sorted(groups.items()))


def _wrap(text: str, indent: str, width: int = 92) -> list[str]:
    out, line = [], indent
    for word in text.split(" "):
        if len(line) + len(word) + 1 > width and line.strip():
            out.append(line.rstrip())
            line = indent + "  "
        line += word + " "
    out.append(line.rstrip())
    return out


def block() -> str:
    return f"{BEGIN}\n```\n{picture()}\n```\n{END}"


def main(argv: list[str]) -> int:
    if "--write" in argv:
        text = DOC.read_text()
        start, end = text.index(BEGIN), text.index(END) + len(END)
        DOC.write_text(text[:start] + block() + text[end:])
        print(f"wrote {DOC.relative_to(ROOT)}")
    else:
        print(picture())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
