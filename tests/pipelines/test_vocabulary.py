"""pipelines.vocabulary names every MLflow tag, metric and alias once: the alias and its inverse agree,
and no module spells a name the vocabulary defines by hand."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import vocabulary
from pipelines.vocabulary import CHAMPION, CHAMPION_PREFIX, budget_of_alias, champion_alias

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("commands", "pipelines", "tune", "serving", "benchmarks")


@pytest.mark.parametrize("T", [1, 2, 4, 8, 10, 16, 64, 1000])
def test_budget_of_alias_inverts_champion_alias(T):
    assert champion_alias(T) == f"champion-t{T}"
    assert budget_of_alias(champion_alias(T)) == T


@pytest.mark.parametrize("alias", ["champion", "champion-t", "champion-tx", "champion-t4x", "champion-t-4",
                                   "champion-t0", "champion-t04", "champion-t 4", "champion-t\u00b2",
                                   "champion-t\u0664", "other-t4", "Champion-t4", "champion-T4", "xchampion-t4", ""])
def test_budget_of_alias_refuses_other_aliases(alias):
    assert budget_of_alias(alias) is None


def test_the_vocabulary_imports_neither_ray_nor_mlflow():
    code = ("import sys, pipelines.vocabulary; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# no hand-written spellings
# ------------------------------------------------------------------------------------------------

def _names(suffix: str) -> dict[str, str]:
    return {name: value for name, value in vars(vocabulary).items()
            if name.endswith(suffix) and isinstance(value, str)}


TAGS = {**_names("_TAG"), **{f"IDENTITY_TAGS[{k!r}]": v for k, v in vocabulary.IDENTITY_TAGS.items()}}
METRICS = _names("_METRIC")
# name patterns (values with {fields}): an f-string with the same shape spells one by hand
PATTERNS = {name: re.sub(r"\{\w+\}", "{}", value) for name, value in vars(vocabulary).items()
            if isinstance(value, str) and "{" in value}
TAG_CALLS = {"set_tag", "set_tags", "delete_tag", "set_model_version_tag", "delete_model_version_tag",
             "set_registered_model_tag", "delete_registered_model_tag", "set_logged_model_tags"}


def _unparsed(node: ast.AST) -> str:
    return ast.unparse(node).rsplit(".", 1)[-1]


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def hand_spelled(source: str) -> list[tuple[int, str, str]]:
    """(line, literal, vocabulary name) for each string literal that spells a vocabulary name.

    A namespaced tag key ("fldd.num_steps_T", "mlflow.parentRunId") is flagged wherever it is a whole
    literal. Other tag and metric keys ("num_steps_T", "collapsed", "final_valid_nelbo_bits"), which
    benchmarks also use as their own field names, where they are used as tags or metrics: a key read
    from or written to something named *tag(s) / *metric(s), a key of a dict literal given to one, an
    argument of a tag-setting or metric call. Aliases: a literal "champion-t" or "champion-t<digits>",
    an f-string that builds one ("...champion-t{T}", "{CHAMPION}-t{T}"), and "champion" used as a tag.
    Name patterns: an f-string of the same shape as one (f"{sweep}-T{budget}-{trial_id}"). Not seen: a name
    inside a longer string, such as an MLflow filter written out by hand.
    """
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    context: dict[int, str] = {}  # id(constant) -> "tags" | "metrics"

    def mark(node: ast.AST | None, kind: str) -> None:
        if isinstance(node, ast.Constant):
            context[id(node)] = kind
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                mark(key, kind)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for element in node.elts:
                mark(element, kind)

    def kind_of(node: ast.AST) -> str | None:
        name = _unparsed(node).lower()
        return "tags" if name.endswith(("tag", "tags")) else "metrics" if name.endswith(("metric", "metrics")) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and kind_of(node.value):
            mark(node.slice, kind_of(node.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if method in ("get", "pop", "setdefault", "update") and kind_of(node.func.value):
                for arg in node.args[:1]:
                    mark(arg, kind_of(node.func.value))
            elif method in TAG_CALLS:
                for arg in node.args:
                    mark(arg, "tags")
            elif method in ("log_metrics", "log_metric", "get_metric_history"):
                for arg in node.args:
                    mark(arg, "metrics")
            for keyword in node.keywords:
                if keyword.arg and (keyword.arg.endswith("tags") or keyword.arg.endswith("metrics")):
                    mark(keyword.value, "tags" if keyword.arg.endswith("tags") else "metrics")
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            kind = next((kind_of(c) for c in node.comparators if kind_of(c)), None)
            if kind:
                mark(node.left, kind)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            kind = next((kind_of(t) for t in targets if kind_of(t)), None)
            if kind:
                mark(node.value, kind)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and kind_of(ast.Name(node.name)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return):
                    mark(inner.value, kind_of(ast.Name(node.name)))

    problems = []
    in_fstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            shape = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
            by_hand = re.search(re.escape(CHAMPION_PREFIX) + r"\{\}", shape) or any(
                isinstance(part, ast.FormattedValue) and _unparsed(part.value) == "CHAMPION"
                and isinstance(following, ast.Constant) and following.value.startswith("-t")
                for part, following in zip(node.values, node.values[1:]))
            if by_hand:
                problems.append((node.lineno, shape, "champion_alias"))
            problems.extend((node.lineno, shape, name) for name, pattern in PATTERNS.items() if shape == pattern)
            in_fstrings.update(id(part) for part in node.values)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        text, where = node.value, context.get(id(node))
        if id(node) not in in_fstrings and re.fullmatch(re.escape(CHAMPION_PREFIX) + r"\d*", text):
            problems.append((node.lineno, text, "champion_alias / budget_of_alias"))
        if text == CHAMPION and where:
            problems.append((node.lineno, text, "CHAMPION"))
        for names, kind in ((TAGS, "tags"), (METRICS, "metrics")):
            for name, value in names.items():
                if text == value and (where == kind or "." in value):
                    problems.append((node.lineno, text, name))
    return sorted(set(problems))


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py") if p.name != "vocabulary.py")


def test_no_module_spells_a_vocabulary_name_by_hand():
    found = {str(path.relative_to(REPO)): hand_spelled(path.read_text()) for path in sources()}
    found = {path: problems for path, problems in found.items() if problems}
    assert not found, "use pipelines.vocabulary instead of these literals: " + "; ".join(
        f"{path}:{line} {text!r} ({name})" for path, problems in found.items() for line, text, name in problems)


@pytest.mark.parametrize("snippet", [
    'tags = {"fldd.num_steps_T": str(T)}',
    'steps = version.tags.get("fldd.num_steps_T")',
    'tracker.set_tags({"num_steps_T": T})',
    'if run.data.tags.get("collapsed") == "True": pass',
    'client.delete_tag(run_id, "fldd.error")',
    'if "fldd.decision" in v.tags: pass',
    'alias = f"champion-t{steps}"',
    'prefix = "champion-t"',
    'uri = f"models:/{name}@champion-t{T}"',
    'value = run.data.metrics.get("final_valid_nelbo_bits")',
    'metrics["collapsed"] = report.collapsed',
    'experiment_tags = {"mlflow.parentRunId": parent}',
    'prefix = f"{CHAMPION}-t"; alias = f"{CHAMPION}-t{T}"',
    'name = f"{sweep}-T{budget}-{trial_id}"',
    'name = (f"{dataset}-{p}-T{T}-seed{seed}" f"-{digest}")',
    'parent.set_tags({f"best_run_T{T}": run_id for T, run_id in best.items()})',
])
def test_the_check_catches_hand_spelled_names(snippet):
    """Each of these spells by hand a name the vocabulary defines."""
    assert hand_spelled(snippet), snippet


@pytest.mark.parametrize("snippet", [
    'row.status = "collapsed"',
    'statuses = ("finished", "stopped", "error", "collapsed")',
    'result = {"storage": 1, "method": "x"}',
    'help_text = "moves alias champion-t<T> to it"',
    'help_text = "a registered model with a champion-t4"',
    'payload = {"git_commit": commit, "valid_nelbo_bits": bits}',
    'if alias.startswith(CHAMPION): pass',
])
def test_the_check_leaves_other_uses_of_the_same_words(snippet):
    assert not hand_spelled(snippet), snippet
