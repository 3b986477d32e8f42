"""The source tree's structure: imports point one way (no circle, lazy imports included),
no module over 800 lines, every module opens with a docstring, lower layers never import
higher ones (see docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "pyfunctorch"
PKG = "pyfunctorch"

#: layer of each top-level module/package (docs/architecture.md); a module may import only
#: modules of its own layer or below
LAYERS = {
    "errors": 0, "_pytree": 0, "random": 0, "_traced_random": 0, "_compiler": 0, "_ops": 0, "_state": 0, "_patching": 0, "_compat": 0, "_saved_hooks": 0,
    "_core": 1, "_entries": 1, "_ownership": 1,
    "batching": 2, "_nested_decomp": 2,
    "batched": 3, "reverse": 3, "forward": 3,
    "jacobians": 4, "functional": 4, "control_flow": 4, "_autograd_compat": 4, "custom_function": 4,
    "compile": 4, "_coverage": 4,
    "patches": 5, "__init__": 5, "contrib": 5,
}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join([PKG] + parts), path


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = mod.split(".")
        if not is_pkg:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if not base.startswith(PKG):
        return []
    # `from . import x` names submodules; `from .m import name` names module m
    names = [f"{base}.{a.name}" for a in node.names]
    return names if node.module is None else [base]


def _graph():
    known = {m for m, _ in _modules()}
    graph: dict[str, set] = {}
    for mod, path in _modules():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):  # every import, also inside functions (lazy imports)
            targets = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PKG)]
            for t in targets:
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in known and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def _is_init(mod):
    return (SRC / pathlib.Path(*mod.split(".")[1:]) / "__init__.py").exists() if mod != PKG else True


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not an edge back up from them
    edges = {m: {d for d in ds if not (m.startswith(d + ".") and _is_init(d))} for m, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def _layer(mod):
    parts = mod.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_layers_point_down():
    bad = []
    for mod, deps in _graph().items():
        for d in deps:
            if d == PKG:
                bad.append(f"{mod} imports the package's __init__")
            elif _layer(d) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {d} (layer {_layer(d)})")
    assert not bad, "\n".join(bad)


def test_every_module_is_in_a_layer():
    missing = {m.split(".")[1] for m, _ in _modules() if "." in m} - set(LAYERS)
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


@pytest.mark.parametrize("mod,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_module_size_and_docstring(mod, path):
    text = path.read_text()
    assert len(text.splitlines()) <= 800, f"{path.name}: over 800 lines; split it along its jobs"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.strip(), f"{mod}: open the module with a one-line docstring saying what it holds"
