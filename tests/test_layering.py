"""How the code is layered: the library stands alone below its tools, without import circles,
and the installed console scripts name entry functions that exist and work."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "bluelm_jax"


def library_modules() -> dict[str, str]:
    """Module name -> file of every module of the package ("bluelm_jax.hf.reader": ".../reader.py")."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[module] = path
    return modules


def imported_names(path: str) -> set[str]:
    """Every module an import statement of the file imports, at any depth (functions included):
    `import a.b` names "a.b"; `from a import b` names "a.b" when that is a module of the package,
    else "a" (b is a name defined in a); relative imports are resolved."""
    modules = library_modules()
    names: set[str] = set()
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module of the package -> the package's modules it imports."""
    modules = library_modules()
    return {module: {n for n in imported_names(path) if n in modules and n != module}
            for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_a_circle_through_a_function_level_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert imported_names(os.path.join(ROOT, PACKAGE, "hf", "cli.py")) >= {"bluelm_jax.hf.to_orbax"}  # in a function


def test_the_library_imports_no_tool_and_no_test():
    """Nothing in bluelm_jax imports convert/, tests/ or bench/: an installed package has none of them."""
    offenders = sorted(f"{module}: {name}" for module, path in library_modules().items()
                       for name in imported_names(path) if name.split(".")[0] in ("convert", "tests", "bench"))
    assert offenders == []


def test_the_library_has_no_import_circle():
    """Module-level and function-level imports alike: no module of the package imports itself
    through others (model <-> sharding and finetune_cli <-> train were such circles)."""
    graph = import_graph()
    assert "bluelm_jax.model" in graph["bluelm_jax.decode"]  # the graph sees the imports
    assert find_cycle(graph) == []


def test_bench_imports_no_test():
    """Benchmarks stand on the library (and bench/reference.py), never on the test suite."""
    bench = os.path.join(ROOT, "bench")
    offenders = [f"{name}: {imported}" for name in sorted(os.listdir(bench)) if name.endswith(".py")
                 for imported in sorted(imported_names(os.path.join(bench, name)))
                 if imported.split(".")[0] == "tests"]
    assert offenders == []


def console_scripts() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["bluelm_jax*"]  # convert/ not installed
    return project["project"]["scripts"]


def test_console_scripts_are_declared():
    assert set(console_scripts()) == {"bluelm-jax", "bluelm-convert", "bluelm-export"}


@pytest.mark.parametrize("script, wants", [("bluelm-jax", "generate"), ("bluelm-convert", "--hf-dir"),
                                           ("bluelm-export", "--adapter")])
def test_console_script_entry_points_run(script, wants):
    """What an installed script runs: import its entry function, call it as the script would
    (sys.argv = [script, "--help"]). The interrupt watcher is installed first, jax is not
    imported for --help, and the usage names the script."""
    module, function = console_scripts()[script].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    code = (f"import sys\nsys.argv = [{script!r}, '--help']\n"
            f"from {module} import {function}\n"
            "from bluelm_jax import interrupts\n"
            "try:\n"
            f"    status = {function}()\n"
            "except SystemExit as e:\n"
            "    status = e.code\n"
            "print('status', status, 'watcher', interrupts.is_installed(), 'jax', 'jax' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script} ") and wants in done.stdout, done.stdout
    assert done.stdout.splitlines()[-1] == "status 0 watcher True jax False"
