"""The layers: commands > tune | serving > pipelines > fldd.

A package imports only the packages below it: `commands` (the CLI and the demo, which wire the jobs
together) may import everything, `tune` and `serving` only `pipelines` and `fldd` and never each
other, `pipelines` only `fldd`, and `fldd` none of them, nor Ray, MLflow or a web stack. Nothing
imports `commands`; the benchmarks neither. Every import statement counts, at module level or
inside a function: an import hidden in a function is still an edge. Such an import is there for
start-up time only, and says so with a `# lazy:` comment. Within each package the modules import
each other without a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each layer and the packages it may import (its own modules aside)
ALLOWED = {
    "commands": {"tune", "serving", "pipelines", "fldd"},
    "tune": {"pipelines", "fldd"},
    "serving": {"pipelines", "fldd"},
    "pipelines": {"fldd"},
    "fldd": set(),
}
# scripts beside the packages: anything but the command layer
BENCHMARKS_ALLOWED = {"tune", "serving", "pipelines", "fldd"}
# the library layer works without a cluster, a tracking store or a web server
FLDD_FORBIDDEN = {"ray", "mlflow", "fastapi", "starlette", "uvicorn"}
LAZY = "# lazy:"
# what `import commands.cli` (and so `fldd --help`) must not load
HEAVY = ("ray", "mlflow", "matplotlib", "fastapi", "tune", "serving", "pipelines.train", "pipelines.tracking")


@dataclass(frozen=True)
class Import:
    path: Path  # relative to ROOT
    line: int
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (`from a import b`: a.b when that is a module, else a)
    in_function: bool
    marked_lazy: bool  # a `# lazy:` comment on the statement or the line above it

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def imports_of(path: Path, known_modules: set[str]) -> list[Import]:
    """Every import statement of one file, with relative imports resolved."""
    text = path.read_text()
    lines = text.splitlines()
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def add(node: ast.stmt, target: str, in_function: bool) -> None:
        statement = lines[node.lineno - 1:node.end_lineno]
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        marked = any(LAZY in line for line in statement) or above.startswith(LAZY)
        found.append(Import(path.relative_to(ROOT), node.lineno, module, target, in_function, marked))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(child, alias.name, inside)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: against this module's package
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    add(child, full if full in known_modules else base, inside)
            visit(child, inside)

    visit(ast.parse(text, str(path)), False)
    return found


def all_imports(*packages: str) -> list[Import]:
    files = source_files(*packages)
    known = {module_name(path) for path in source_files(*ALLOWED)}
    return [found for path in files for found in imports_of(path, known)]


def top(name: str) -> str:
    return name.split(".")[0]


def layer_violations(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        source, target = top(imp.module), top(imp.target)
        if target in ALLOWED and target != source and target not in ALLOWED[source]:
            problems.append(f"{imp.where}: {source} -> {target} (import {imp.target}): {source} may import only "
                            f"{sorted(ALLOWED[source]) or 'none of the layers'}")
        if source == "fldd" and target in FLDD_FORBIDDEN:
            problems.append(f"{imp.where}: fldd -> {target} (import {imp.target}): the library imports no "
                            f"{sorted(FLDD_FORBIDDEN)}")
    return problems


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_scan_sees_every_layer_and_the_lazy_imports():
    """Guards the checks below against passing on an empty or partial scan."""
    imports = all_imports(*ALLOWED)
    assert {top(imp.module) for imp in imports} == set(ALLOWED)
    edges = {(top(imp.module), top(imp.target)) for imp in imports}
    assert {("commands", "tune"), ("commands", "serving"), ("tune", "pipelines"), ("serving", "pipelines"),
            ("pipelines", "fldd"), ("commands", "fldd")} <= edges
    assert any(imp.in_function and imp.module == "commands.cli" and top(imp.target) == "tune" for imp in imports)


def test_packages_import_only_the_layers_below_them():
    problems = layer_violations(all_imports(*ALLOWED))
    assert not problems, "imports against commands > tune | serving > pipelines > fldd:\n" + "\n".join(problems)


def test_a_back_edge_is_reported_with_file_line_and_edge():
    planted = [Import(Path("pipelines/train.py"), 1, "pipelines.train", "tune.sweep", True, True),
               Import(Path("serving/app.py"), 2, "serving.app", "tune", False, False),
               Import(Path("fldd/model.py"), 3, "fldd.model", "mlflow.tracking", False, False)]
    problems = layer_violations(planted)
    assert problems == ["pipelines/train.py:1: pipelines -> tune (import tune.sweep): pipelines may import only "
                        "['fldd']",
                        "serving/app.py:2: serving -> tune (import tune): serving may import only ['fldd', "
                        "'pipelines']",
                        "fldd/model.py:3: fldd -> mlflow (import mlflow.tracking): the library imports no "
                        "['fastapi', 'mlflow', 'ray', 'starlette', 'uvicorn']"]


def test_benchmarks_do_not_import_the_command_layer():
    problems = [f"{imp.where}: benchmarks -> {top(imp.target)} (import {imp.target})"
                for imp in all_imports("benchmarks")
                if top(imp.target) in ALLOWED and top(imp.target) not in BENCHMARKS_ALLOWED]
    assert not problems, "a benchmark imports the CLI or the demo: move what it needs down a layer\n" + \
        "\n".join(problems)


def test_imports_inside_functions_say_why():
    """An import in a function is there for start-up time, never to dodge a cycle: `# lazy: ...`."""
    hidden = [f"{imp.where}: {imp.module} imports {imp.target} inside a function without a '{LAZY}' comment"
              for imp in all_imports(*ALLOWED) if imp.in_function and not imp.marked_lazy]
    assert not hidden, "\n".join(hidden)


def test_modules_of_a_package_import_each_other_without_a_cycle():
    for package in ALLOWED:
        edges: dict[str, set[str]] = {}
        for imp in all_imports(package):
            if top(imp.target) == package and imp.target != imp.module:
                edges.setdefault(imp.module, set()).add(imp.target)
        cycle = find_cycle(edges)
        assert cycle is None, f"import cycle in {package}/: " + " -> ".join(cycle)


def test_the_cli_starts_without_ray_mlflow_tune_or_serving():
    code = ("import sys, commands.cli; "
            f"heavy = sorted(h for h in {HEAVY!r} if any(m == h or m.startswith(h + '.') for m in sys.modules)); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, "import commands.cli loaded: " + result.stdout + result.stderr
