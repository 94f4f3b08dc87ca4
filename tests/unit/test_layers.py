"""The import structure of app/: no module imports from a layer above its own, and no cycles.

Layers, lowest first: ``app.engine`` (pure PyTorch) <- ``app.config`` <- ``app.serving`` <-
``app.api`` <- ``app.main``. ``app.eval`` (evaluation and training) and ``app.cli`` sit beside the
server: they use the engine and serving's rendering, and the server never uses them, except that
the command lines share ``app.cli``'s argument helpers. Every ``import`` statement counts: at module
level, inside functions and under ``TYPE_CHECKING``, since each is a dependency of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"

# module prefix -> prefixes it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "app.engine": ("app.config", "app.serving", "app.api", "app.eval", "app.main", "app.cli"),
    "app.config": ("app.serving", "app.api", "app.eval", "app.main", "app.cli"),
    "app.serving": ("app.api", "app.eval", "app.main"),
    "app.api": ("app.eval", "app.main", "app.cli"),
    "app.eval": ("app.api", "app.main"),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (file ``path``) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # "from pkg import mod" imports the submodule when there is one, else a name of pkg
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # "import a.b.c" depends on the deepest known module it names
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = APP) -> dict[str, set[str]]:
    modules = _modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        for layer, banned in FORBIDDEN.items():
            if not _within(module, layer):
                continue
            for target in sorted(targets):
                if any(_within(target, prefix) for prefix in banned):
                    found.append(f"{module} imports {target}")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None; depth-first search with three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


def test_no_module_imports_from_a_higher_layer():
    graph = import_graph()
    assert "app.engine.reciprocam" in graph and graph["app.serving.pipeline"], "the import scan found nothing"
    violations = layer_violations(graph)
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "app"


def test_the_scan_sees_imports_in_functions_under_type_checking_and_relative(tmp_path):
    app = _write(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/engine/__init__.py": "from app.engine.core import run\n",
            "app/engine/core.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from app.serving import batcher\n"
                "def run():\n    from .helpers import helper\n    return helper()\n"
            ),
            "app/engine/helpers.py": "def helper():\n    import app.engine.core\n",
            "app/serving/__init__.py": "",
            "app/serving/batcher.py": "import app.api.v1\n",
            "app/api/__init__.py": "",
            "app/api/v1.py": "from app.engine import run\n",
        },
    )
    graph = import_graph(app)
    assert graph["app.engine.core"] == {"app.serving.batcher", "app.engine.helpers"}
    assert graph["app.engine.helpers"] == {"app.engine.core"}
    assert graph["app.api.v1"] == {"app.engine"}
    assert layer_violations(graph) == [
        "app.engine.core imports app.serving.batcher",
        "app.serving.batcher imports app.api.v1",
    ]
    assert find_cycle(graph) == ["app.engine.core", "app.engine.helpers", "app.engine.core"]


def test_an_acyclic_graph_has_no_cycle():
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
