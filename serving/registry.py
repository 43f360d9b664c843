"""What the endpoint serves, read from the MLflow registry: per model, the version holding each
`champion-t<T>` alias and the default budget (the T of the `champion` alias's version); and the
default model loader (a registry version -> FLDDModel)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fldd.model import FLDDModel
from pipelines.tracking import download_weights, resolve_model
from pipelines.vocabulary import (CHAMPION, DATASET_TAG, DEFAULT_BUDGET_TAG, MOLECULE_SCORES, PARAMETERIZATION_TAG,
                                  TEST_NELBO_TAG, TEST_SAMPLE_TAG_PREFIX, TEST_STDERR_TAG, VALID_NELBO_TAG,
                                  VERSION_BUDGET_TAG, budget_of_alias)


@dataclass(frozen=True)
class VersionInfo:
    version: str
    steps: int
    aliases: tuple[str, ...]
    parameterization: str | None = None
    dataset: str | None = None
    test_nelbo_bits: float | None = None
    valid_nelbo_bits: float | None = None
    run_id: str | None = None
    test_nelbo_stderr: float | None = None
    test_sample_scores: dict[str, float] = field(default_factory=dict)  # molecules: validity, fcd, ...

    def recorded(self, metric: str) -> tuple[float, float | None] | None:
        """(value, standard error) of a test metric the gate recorded on this version (None: not recorded)."""
        if metric == "nelbo_bits":
            value, stderr = self.test_nelbo_bits, self.test_nelbo_stderr
        else:
            value, stderr = self.test_sample_scores.get(metric), None
        if value is None or not math.isfinite(value):
            return None
        return value, stderr


# the test metrics a request may route on, as the registry gate records them, and which way is better
QUALITY_METRICS = {"nelbo_bits": "lower", "validity": "higher", "fcd": "lower"}


class RoutingError(ValueError):
    """No served budget meets a quality target; the message names the best value available."""


@dataclass(frozen=True)
class Route:
    """The champion a quality target chose: the fewest steps whose recorded metric meets it."""

    steps: int
    version: str
    metric: str
    value: float
    stderr: float | None


@dataclass(frozen=True)
class ModelSnapshot:
    """One registered model as the endpoint sees it at one poll."""

    name: str
    registered: bool
    budgets: dict[int, str] = field(default_factory=dict)  # T -> version holding champion-t<T>
    default_steps: int | None = None  # T of the `champion` alias's version
    versions: dict[str, VersionInfo] = field(default_factory=dict)  # the served versions only

    def problem(self) -> str | None:
        """Why requests without `steps` cannot be served (None: they can)."""
        if not self.registered:
            return f"no registered model {self.name!r} in the registry yet: train and `fldd promote` one"
        if self.default_steps is None:
            return (f"model {self.name!r} has no {CHAMPION!r} alias yet: `fldd promote` a version"
                    + (f" (served budgets {sorted(self.budgets)}: give steps)" if self.budgets else ""))
        return None


def route_by_quality(snapshot: ModelSnapshot, metric: str, bound: float, bound_kind: str) -> Route:
    """The fewest-steps served champion of `snapshot` whose recorded test `metric` meets `bound`
    (`bound_kind` "max": value <= bound, "min": value >= bound). RoutingError when none does,
    naming the best value on offer; ValueError for a metric or bound kind that cannot be used."""
    better = QUALITY_METRICS.get(metric)
    if better is None:
        raise ValueError(f"metric {metric!r}: not recorded by the gate; known: {sorted(QUALITY_METRICS)}")
    if (better == "lower") != (bound_kind == "max"):
        raise ValueError(f"metric {metric!r}: {better} is better, so give "
                         f"{'max' if better == 'lower' else 'min'}, not {bound_kind}")
    offered = []
    for steps in sorted(snapshot.budgets):
        version = snapshot.budgets[steps]
        info = snapshot.versions.get(version)
        recorded = info.recorded(metric) if info is not None else None
        if recorded is None:
            continue
        value, stderr = recorded
        offered.append(Route(steps, version, metric, value, stderr))
        if (value <= bound) if bound_kind == "max" else (value >= bound):
            return offered[-1]
    if not offered:
        raise RoutingError(f"no served budget of {snapshot.name!r} has a recorded test {metric}: promote one "
                           "through the registry gate (fldd promote)")
    best = min(offered, key=lambda r: r.value) if better == "lower" else max(offered, key=lambda r: r.value)
    relation = "<=" if bound_kind == "max" else ">="
    raise RoutingError(f"no served budget of {snapshot.name!r} has test {metric} {relation} {bound}; the best is "
                       f"{best.value:.4f} (T={best.steps}, version {best.version})")


def model_id(name: str, version: str) -> str:
    """The multiplexing key of a registry version (Serve routes and caches models by it)."""
    return f"{name}/{version}"


def split_model_id(key: str) -> tuple[str, str]:
    name, _, version = key.rpartition("/")  # versions are numbers: the last slash separates
    return name, version


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def read_registry(tracking_uri: str, name: str) -> ModelSnapshot:
    """The served versions of `name`: aliases champion-t<T> (T from the alias) and champion."""
    client = MlflowClient(tracking_uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return ModelSnapshot(name, registered=False)
        raise
    aliases = {alias: str(version) for alias, version in (registered.aliases or {}).items()}
    budgets = {}
    for alias, version in aliases.items():
        budget = budget_of_alias(alias)
        if budget is not None:
            budgets[budget] = version
    versions = {}
    for version in sorted(set(budgets.values()) | ({aliases[CHAMPION]} if CHAMPION in aliases else set())):
        v = client.get_model_version(name, version)
        tags = v.tags
        steps = tags.get(VERSION_BUDGET_TAG) or registered.tags.get(DEFAULT_BUDGET_TAG) or "0"
        versions[version] = VersionInfo(
            version=version, steps=int(steps),
            aliases=tuple(sorted(a for a, held in aliases.items() if held == version)),
            parameterization=tags.get(PARAMETERIZATION_TAG), dataset=tags.get(DATASET_TAG),
            test_nelbo_bits=_float(tags.get(TEST_NELBO_TAG)), valid_nelbo_bits=_float(tags.get(VALID_NELBO_TAG)),
            run_id=v.run_id, test_nelbo_stderr=_float(tags.get(TEST_STDERR_TAG)),
            test_sample_scores={name: value for name in MOLECULE_SCORES
                                if (value := _float(tags.get(TEST_SAMPLE_TAG_PREFIX + name))) is not None
                                and math.isfinite(value)})
    default = versions[aliases[CHAMPION]].steps if CHAMPION in aliases else None
    if default is not None and default not in budgets:  # a champion set by hand, without champion-t<T>
        budgets[default] = aliases[CHAMPION]
    return ModelSnapshot(name, True, budgets, default, versions)


def load_registered_model(tracking_uri: str, name: str, version: str, device: str = "cpu") -> FLDDModel:
    """The model.pt of a registry version, loaded on `device`; the download is removed afterwards."""
    location, _ = resolve_model(tracking_uri, f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory(prefix="fldd-serve-") as tmp:
        return FLDDModel.load(download_weights(tracking_uri, location, dst=tmp), map_location=torch.device(device))
