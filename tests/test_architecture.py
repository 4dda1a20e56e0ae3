"""The package's import graph: one direction, low to high, no cycles, no hidden imports.

Every `import llamaworks...` / `from llamaworks... import` in src/llamaworks is read with
`ast`, including those inside functions. Internal imports sit at module level (the CLI's
command table and the package's lazy exports resolve names with importlib, not imports),
no module imports a `_private` name from another, the graph has no cycle, and no module
imports one of a higher layer (docs/architecture.md draws the layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llamaworks"

# Low to high; a module may import its own layer or lower ones. The longest prefix decides.
LAYERS: list[tuple[str, ...]] = [
    ("llamaworks", "llamaworks.args", "llamaworks.atomic", "llamaworks.configfile", "llamaworks.carbon",
     "llamaworks.paths", "llamaworks.rope", "llamaworks.presets", "llamaworks.kvcache"),
    ("llamaworks.model", "llamaworks.plan", "llamaworks.device"),
    ("llamaworks.tokenizer",),
    ("llamaworks.weights",),
    ("llamaworks.modeldir",),
    ("llamaworks.convert",),
    ("llamaworks.parallel",),
    ("llamaworks.inference",),
    ("llamaworks.data",),
    ("llamaworks.eval",),
    ("llamaworks.train",),
    ("llamaworks.serve",),
    ("llamaworks.demo", "llamaworks.cli", "llamaworks.__main__"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int, bool]]:
    """(imported module, imported name or '', line, inside a function) for each internal import."""
    tree = ast.parse(path.read_text(), str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                in_function.add(id(inner))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "llamaworks":
                    out.append((alias.name, "", node.lineno, id(node) in in_function))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "llamaworks":
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in MODULES:  # `from llamaworks.x import submodule`
                    out.append((sub, "", node.lineno, id(node) in in_function))
                else:
                    out.append((module, alias.name, node.lineno, id(node) in in_function))
    return out


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def layer(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            # The root package's entry is the package itself, not a prefix for every module.
            if (module == p or (p != "llamaworks" and module.startswith(p + "."))) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer of tests/test_architecture.py: add it"
    return rank


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def test_no_internal_import_inside_a_function():
    hidden = [f"{MODULES[m].relative_to(SRC.parent)}:{line} imports {target}"
              for m, edges in EDGES.items() for target, _, line, inside in edges if inside]
    assert not hidden, "move these imports to the top of their module:\n" + "\n".join(hidden)


def test_no_private_name_crosses_modules():
    private = [f"{MODULES[m].relative_to(SRC.parent)}:{line} imports {target}.{name}"
               for m, edges in EDGES.items() for target, name, line, _ in edges
               if name.startswith("_") and not name.startswith("__") and target != m]
    assert not private, "\n".join(private)


def test_imports_go_down_the_layers():
    upward = [f"{MODULES[m].relative_to(SRC.parent)}:{line}: {m} (layer {layer(m)}) imports {target} "
              f"(layer {layer(target)})"
              for m, edges in EDGES.items() for target, _, line, _ in edges if layer(target) > layer(m)]
    assert not upward, "\n".join(upward)


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m, edges in EDGES.items():
        for target, _, _, _ in edges:
            # Importing a.b.c runs a/__init__ and a/b/__init__ first.
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in MODULES and dep != m and not m.startswith(dep + "."):
                    graph[m].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("module", ["llamaworks.model", "llamaworks.weights", "llamaworks.tokenizer.base"])
def test_low_layers_stay_low(module):
    assert all(layer(target) <= layer(module) for target, *_ in EDGES[module])


def test_every_package_folder_is_a_regular_package():
    # A folder without __init__.py is a namespace package, which setuptools' find leaves out
    # of wheels: the installed package would miss it.
    missing = [str(d.relative_to(SRC.parent)) for d in SRC.rglob("*") if d.is_dir() and any(d.glob("*.py"))
               and not (d / "__init__.py").is_file()]
    assert not missing, missing
