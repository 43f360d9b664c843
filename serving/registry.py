"""What the endpoint serves, read from the MLflow registry: per model, the version holding each
`champion-t<T>` alias and the default budget (the T of the `champion` alias's version); and the
default model loader (a registry version -> FLDDModel)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fldd.model import FLDDModel
from pipelines.tracking import download_weights, resolve_model
from pipelines.vocabulary import (CHAMPION, DATASET_TAG, DEFAULT_BUDGET_TAG, PARAMETERIZATION_TAG, TEST_NELBO_TAG,
                                  VALID_NELBO_TAG, VERSION_BUDGET_TAG, budget_of_alias)


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
            run_id=v.run_id)
    default = versions[aliases[CHAMPION]].steps if CHAMPION in aliases else None
    if default is not None and default not in budgets:  # a champion set by hand, without champion-t<T>
        budgets[default] = aliases[CHAMPION]
    return ModelSnapshot(name, True, budgets, default, versions)


def load_registered_model(tracking_uri: str, name: str, version: str, device: str = "cpu") -> FLDDModel:
    """The model.pt of a registry version, loaded on `device`; the download is removed afterwards."""
    location, _ = resolve_model(tracking_uri, f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory(prefix="fldd-serve-") as tmp:
        return FLDDModel.load(download_weights(tracking_uri, location, dst=tmp), map_location=torch.device(device))
