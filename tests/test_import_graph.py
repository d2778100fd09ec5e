"""The import graph of src/mtptune: data flows one way through the layers, and no module imports itself back.

Every `import` of an mtptune module counts, at module level or inside a function (a lazy import is still a
dependency: it only hides a cycle until the day both modules load at once). Imports from the standard library and
third parties are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mtptune

SRC = Path(mtptune.__file__).parent

# Lowest first. A module may import its own layer or a lower one. Within a layer, cycles are the only limit.
LAYERS: list[tuple[str, ...]] = [
    ("mtptune", "mtptune.errors", "mtptune.devices"),  # the version, the exception types, flag devices
    ("mtptune.families",),  # per-architecture knowledge: names, layouts, configs; reads no file
    ("mtptune.checkpoint",),  # files: safetensors I/O, head checkpoint formats, verifier access, atomic writes
    ("mtptune.modeling", "mtptune.metrics"),  # the head module and its loading; acceptance maths
    ("mtptune.convert", "mtptune.export", "mtptune.stitch"),  # head checkpoints in and out of a verifier
    ("mtptune.openai_http",),  # the one HTTP client for OpenAI-compatible servers (regenerate, hidden states)
    ("mtptune.data",),
    ("mtptune.serving",),
    ("mtptune.training",),
    ("mtptune.evaluation",),
    ("mtptune.testing",),  # real tiny verifiers and servers for tests and the demo
    ("mtptune.cli", "mtptune.demo"),  # the demo drives the CLI in-process, the CLI runs the demo
]

# Upward imports that exist and are not fixed yet (importer, imported). Each one is a debt: the test fails when
# one of them disappears, so the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported_modules(name: str, path: Path) -> set[str]:
    """The mtptune modules `name` imports (`from pkg import sub` resolves to the submodule `pkg.sub`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def layer(name: str) -> int:
    """The index in LAYERS of the longest prefix that covers `name` (the bare `mtptune` covers only itself)."""
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if name == prefix or (prefix != "mtptune" and name.startswith(prefix + "."))
    ]
    assert matches, f"{name} is in no layer: add it to LAYERS"
    return max(matches)[1]


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def test_no_upward_import():
    upward = {(a, b) for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a)}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "upward imports (lower layer imports a higher one):\n" + "\n".join(f"{a} -> {b}" for a, b in new)
    fixed = sorted(KNOWN_UPWARD - upward)
    assert not fixed, f"no longer imported, remove from KNOWN_UPWARD: {fixed}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    # A package's __init__ importing its own submodules is how packages re-export; a submodule importing the
    # package back is the cycle, and it is counted.
    graph = {
        a: {b for b in targets if not (MODULES[a].name == "__init__.py" and b.startswith(a + "."))}
        for a, targets in GRAPH.items()
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_lazy_imports_and_cycles():
    """The checks above can fail: a function-level import is an edge, and a two-module loop is a cycle."""
    assert "mtptune.cli.main" in GRAPH["mtptune.demo"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("mtptune.checkpoint.verifier") < layer("mtptune.modeling.head")
