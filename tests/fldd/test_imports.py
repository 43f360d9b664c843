import ast
import subprocess
import sys
from pathlib import Path

import fldd

PACKAGE = Path(fldd.__file__).resolve().parent


def test_fldd_imports_no_ray_mlflow_or_fastapi():
    code = ("import sys, fldd, fldd.exact, fldd.sampler, fldd.train; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'fastapi')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(package: Path) -> dict[str, list[tuple[str, bool]]]:
    """{module: [(imported module of the package, inside a function?), ...]} for every module of
    `package`, from `import` and `from ... import` statements anywhere in its source."""
    files = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    root = package.name
    graph: dict[str, list[tuple[str, bool]]] = {}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: list[tuple[str, bool]] = []

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found.extend((a.name, inside) for a in child.names if a.name.split(".")[0] == root)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative: resolve against this module's package
                        anchor = here.rsplit(".", child.level - 1)[0] if child.level > 1 else here
                        base = f"{anchor}.{base}" if base else anchor
                    if base.split(".")[0] == root:
                        # `from fldd import sampler` imports a module; `from fldd import sample` the package
                        found.extend((f"{base}.{a.name}" if f"{base}.{a.name}" in files else base, inside)
                                     for a in child.names)
                visit(child, inside)

        visit(ast.parse(path.read_text(), str(path)), False)
        graph[module] = found
    return graph


def find_cycle(graph: dict[str, list[tuple[str, bool]]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"
    stack: list[str] = []

    def dfs(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target, _ in graph.get(module, []):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := dfs(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := dfs(module)):
            return cycle
    return None


def test_fldd_module_imports_are_acyclic():
    """A cycle only works through import order or function-level imports; shared pieces belong in
    their own module (fldd.token_table, fldd.tokens)."""
    graph = package_imports(PACKAGE)
    assert "fldd.data" in graph and "fldd.model" in graph  # the parse saw the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_fldd_modules_import_fldd_at_top_level_only():
    hidden = [(module, target) for module, imports in package_imports(PACKAGE).items()
              for target, in_function in imports if in_function]
    assert hidden == [], f"fldd imports inside functions (a hidden cycle?): {hidden}"
