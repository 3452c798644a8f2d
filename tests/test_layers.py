"""The package's import rule: imports only go down the layers, with no cycle (function-level included).

Layers, bottom to top, as docs/ARCHITECTURE.md draws them. A module may import from its own
layer or any below it; same-layer imports must not form a cycle. Every ``import`` statement is
read from the source with ``ast`` (those inside functions too), so an upward import cannot hide
behind a function-level import.

Run: pytest tests/test_layers.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradckpt"

# Bottom (0) to top. Keys are module paths relative to the package ("runtime" = every module
# under runtime/); the longest matching key wins.
LAYERS: dict[str, int] = {
    "errors": 0,
    "units": 0,
    "state": 0,
    "_optional": 0,
    "plans": 1,
    "policies": 1,
    "blocks": 1,
    "measure": 2,
    "runtime": 3,
    "guards": 3,
    "apply": 4,
    "planner": 5,
    "enable": 6,
    "_model_io": 1,
    "verify": 7,
    "bench": 7,
    "models": 7,
    "estimate": 7,
    "integrations": 7,
    "plot": 7,
    "cli": 8,
    "__init__": 9,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(mod: str) -> int:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(f"module {mod!r} has no layer: add it to LAYERS (and docs/ARCHITECTURE.md)")


def _is_package(mod: str) -> bool:
    return (SRC / Path(*mod.split(".")) / "__init__.py").exists() if mod != "__init__" else True


def _imports(path: Path) -> list[str]:
    """Package-relative names of the gradckpt modules ``path`` imports (anywhere in the file)."""
    return _imports_of(path.read_text(), _module_name(path))


def _imports_of(source: str, mod: str) -> list[str]:
    pkg = mod.split(".") if _is_package(mod) and mod != "__init__" else mod.split(".")[:-1]
    if mod == "__init__":
        pkg = []
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else list(pkg)
            elif node.module and node.module.split(".")[0] == "gradckpt":
                base, node_module = [], node.module.split(".", 1)[1:]
                out.extend(_targets(base + node_module, node))
                continue
            else:
                continue
            target = base + (node.module.split(".") if node.module else [])
            out.extend(_targets(target, node))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gradckpt."):
                    out.append(alias.name.split(".", 1)[1])
    return [m for m in out if m]


def _targets(target: list[str], node: ast.ImportFrom) -> list[str]:
    # `from . import offload` names a module; `from .plans import Plan` names the module .plan.
    base = ".".join(target)
    names = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        if (SRC / Path(*sub.split("."))).with_suffix(".py").exists() or (
            SRC / Path(*sub.split("."))
        ).is_dir():
            names.append(sub)
        else:
            names.append(base)
    return names


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        mod = _module_name(path)
        graph[mod] = {m for m in _imports(path) if m != mod}
    return graph


GRAPH = _graph()


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_no_upward_import(mod: str) -> None:
    up = [t for t in GRAPH[mod] if t != "__init__" and _layer(t) > _layer(mod)]
    assert not up, f"{mod} (layer {_layer(mod)}) imports upward: {up}"


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH:
                continue
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_private_name_imported_across_modules() -> None:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or "gradckpt" in (node.module or "")
            ):
                bad += [
                    f"{_module_name(path)}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    bad = [b for b in bad if b != "estimate.sweep: _policy_list"]  # moves to cli/_args.py
    assert not bad, bad


def test_checker_sees_function_level_imports() -> None:
    # The checker itself: an import inside a function, relative or absolute, is found.
    src = "def f():\n    from ..enable import enable\n    import gradckpt.apply\n"
    assert sorted(_imports_of(src, "runtime.checkpoint")) == ["apply", "enable"]
    assert _layer("enable") > _layer("runtime.checkpoint")


def test_plan_module_is_not_shadowed() -> None:
    # `import gradckpt.plan` used to yield the planner function, not the module holding Plan.
    import gradckpt
    import gradckpt.plans

    assert callable(gradckpt.plan) and gradckpt.plans.Plan is gradckpt.Plan
