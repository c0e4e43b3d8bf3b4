"""The layer rules of docs/architecture.md, checked on the source: no import cycle inside `accel/`, every module
importable alone, and the arrows between layers only where they are allowed."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("accel", "kernels", "server", "loadtests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, *, module_level_only: bool = False, project_only: bool = True) -> set[str]:
    """Modules `path` imports (anywhere in the file, or at module level only), the project's own unless
    `project_only` is False; TYPE_CHECKING blocks excluded."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if nested and module_level_only:
            return
        for child in ast.iter_child_nodes(node):
            visit(child, top and not nested)

    visit(tree, True)
    return {name for name in found if not project_only or name.split(".")[0] in LAYERS}


def graph(package: str) -> dict[str, set[str]]:
    known = modules(package)
    return {name: {dep for dep in imports(path) if dep in known and dep != name} for name, path in known.items()}


def test_accel_import_graph_has_no_cycle():
    try:
        order = list(TopologicalSorter(graph("accel")).static_order())
    except CycleError as exc:  # pragma: no cover - the failure message is the cycle
        raise AssertionError(f"import cycle in accel/: {' -> '.join(exc.args[1])}") from None
    assert "accel.session" in order and order.index("accel.session") < order.index("accel.apply")


def test_every_accel_module_imports_alone_in_dependency_order():
    """Each module imported with no other `accel` module loaded before it (third-party modules stay cached, which
    keeps this fast): a module that only worked because another had been imported first fails here."""
    order = [m for m in TopologicalSorter(graph("accel")).static_order() if m.startswith("accel")]
    script = (
        "import importlib, sys\n"
        f"for name in {order!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'accel' or m.startswith('accel.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(" + repr(order) + "))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_layers_import_only_downwards():
    for name, path in modules("accel").items():
        top = {dep.split(".")[0] for dep in imports(path, module_level_only=True, project_only=False)}
        assert not top & {"server", "loadtests", "fastapi", "uvicorn", "prometheus_client"}, name
    for name, path in modules("kernels").items():
        assert not {dep.split(".")[0] for dep in imports(path, project_only=False)} & {"accel", "server", "diffusers"}, name
    for name, path in modules("loadtests").items():
        assert not any(dep.split(".")[0] in ("accel", "server", "kernels") for dep in imports(path)), name


def test_accelerator_internals_stay_inside_accel():
    """The server talks to the library's front (spec, generate, loading, io, errors, presets), never to a method,
    the session or an adapter."""
    internal = ("accel.session", "accel.adapters", "accel.caching", "accel.attention", "accel.guidance",
                "accel.pruning", "accel.methods", "accel.base")
    for name, path in modules("server").items():
        reached = [dep for dep in imports(path) if dep.startswith(internal)]
        assert not reached, f"{name} imports {reached}"
