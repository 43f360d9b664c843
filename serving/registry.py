"""What the endpoint serves, read from the MLflow registry: per model, the version holding each
`champion-t<T>` alias and the default budget (the T of the `champion` alias's version); and the
default model loader (a registry version -> FLDDModel)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fldd.model import FLDDModel
from pipelines.registry import CHAMPION, DEFAULT_BUDGET_TAG
from pipelines.tracking import resolve_model

CHAMPION_PREFIX = f"{CHAMPION}-t"
INFO_TAGS = {"parameterization": "fldd.parameterization", "dataset": "fldd.dataset",
             "test_nelbo_bits": "fldd.test_nelbo_bits", "valid_nelbo_bits": "fldd.valid_nelbo_bits"}


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
        suffix = alias[len(CHAMPION_PREFIX):] if alias.startswith(CHAMPION_PREFIX) else ""
        if suffix.isdigit():
            budgets[int(suffix)] = version
    versions = {}
    for version in sorted(set(budgets.values()) | ({aliases[CHAMPION]} if CHAMPION in aliases else set())):
        v = client.get_model_version(name, version)
        tags = v.tags
        steps = tags.get("fldd.num_steps_T") or registered.tags.get(DEFAULT_BUDGET_TAG) or "0"
        versions[version] = VersionInfo(
            version=version, steps=int(steps),
            aliases=tuple(sorted(a for a, held in aliases.items() if held == version)),
            parameterization=tags.get(INFO_TAGS["parameterization"]), dataset=tags.get(INFO_TAGS["dataset"]),
            test_nelbo_bits=_float(tags.get(INFO_TAGS["test_nelbo_bits"])),
            valid_nelbo_bits=_float(tags.get(INFO_TAGS["valid_nelbo_bits"])), run_id=v.run_id)
    default = versions[aliases[CHAMPION]].steps if CHAMPION in aliases else None
    if default is not None and default not in budgets:  # a champion set by hand, without champion-t<T>
        budgets[default] = aliases[CHAMPION]
    return ModelSnapshot(name, True, budgets, default, versions)


def load_registered_model(tracking_uri: str, name: str, version: str, device: str = "cpu") -> FLDDModel:
    """The model.pt of a registry version, loaded on `device`; the download is removed afterwards."""
    location, _ = resolve_model(tracking_uri, f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory(prefix="fldd-serve-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        found = sorted(local.rglob("model.pt"))
        if not found:
            raise FileNotFoundError(f"models:/{name}/{version} holds no model.pt artifact")
        return FLDDModel.load(found[0], map_location=torch.device(device))
