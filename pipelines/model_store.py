"""Reading the MLflow model registry: the lookups that promotion, aliases and listing share.

Registered models are named `fldd-<dataset>` by default and carry their data set's identity (data
set, vocabulary, sequence length) as tags; a version's step budget T is its `fldd.num_steps_T` tag.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fldd.config import FLDDConfig
from pipelines.tracking import dataset_name, tracking_uri
from pipelines.vocabulary import (ALIAS_LOCK_SUFFIX, DATASET_TAG, DECISION_TAG, PARAMETERIZATION_TAG, REGISTERED_MODEL_NAME,
                                  TEST_NELBO_TAG, TEST_SAMPLE_TAG_PREFIX, VALID_NELBO_TAG, VERSION_BUDGET_TAG)


class RegistryError(ValueError):
    """Bad input: no such run, sweep, model or budget; an impossible option. (CLI exit code 2.)"""


@dataclass
class ModelRow:
    """One row of `fldd models`."""

    name: str
    version: str
    aliases: list[str]
    budget: str
    parameterization: str
    dataset: str
    valid_bits: str
    test_bits: str
    decision: str
    run_id: str
    test_scores: str = "-"  # molecules: the validity and FCD the gate recorded


def as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def registry_client(client: MlflowClient | None) -> MlflowClient:
    return client or MlflowClient(tracking_uri())


def quoted(value: str, what: str) -> str:
    if "'" in value or "`" in value:
        raise RegistryError(f"{what}={value!r}: quotes are not allowed")
    return value


def is_not_found(error: MlflowException) -> bool:
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def default_model_name(cfg: FLDDConfig) -> str:
    return REGISTERED_MODEL_NAME.format(dataset=dataset_name(cfg))


def default_name_from_run(run: Run) -> str:
    """default_model_name from a run's tags and params, without loading its model."""
    params = run.data.params
    dataset = (run.data.tags.get(DATASET_TAG) or (Path(params["data.path"]).stem if params.get("data.path") else None)
               or params.get("data.name", "unknown"))
    return REGISTERED_MODEL_NAME.format(dataset=dataset)


def identity_of(cfg: FLDDConfig) -> dict[str, str]:
    return {"dataset": dataset_name(cfg), "vocab_size": str(cfg.vocab_size), "seq_len": str(cfg.seq_len)}


def get_registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if is_not_found(error):
            return None
        raise


def alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if is_not_found(error) or "alias" in str(error).lower():
            return None
        raise


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{quoted(name, 'model name')}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def list_models(name: str | None = None, client: MlflowClient | None = None) -> list[ModelRow]:
    """Rows for `fldd models [NAME]`: every version with its aliases, T, parameterization, test NELBO
    and gate decision. RegistryError when `name` is not registered."""
    client = registry_client(client)
    if name is not None:
        if get_registered_model(client, name) is None:
            raise RegistryError(f"no registered model {name!r} in {client.tracking_uri}")
        names = [name]
    else:
        names, token = [], None
        while True:
            page = client.search_registered_models(max_results=1000, page_token=token)
            names.extend(m.name for m in page if not m.name.endswith(ALIAS_LOCK_SUFFIX))  # a move in progress
            token = page.token
            if not token:
                break
        names.sort()
    rows = []
    for model_name in names:
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(model_name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in all_versions(client, model_name):
            t = v.tags
            rows.append(ModelRow(
                name=model_name, version=str(v.version), aliases=sorted(aliases.get(str(v.version), [])),
                budget=t.get(VERSION_BUDGET_TAG, "?"), parameterization=t.get(PARAMETERIZATION_TAG, "?"),
                dataset=t.get(DATASET_TAG, "?"), valid_bits=_short(t.get(VALID_NELBO_TAG)),
                test_bits=_short(t.get(TEST_NELBO_TAG)), decision=t.get(DECISION_TAG, "-"),
                run_id=v.run_id or "", test_scores=" ".join(
                    f"{name} {_short(t[TEST_SAMPLE_TAG_PREFIX + name])}" for name in ("validity", "fcd")
                    if TEST_SAMPLE_TAG_PREFIX + name in t) or "-"))
    return rows


def _short(value: str | None) -> str:
    number = as_float(value)
    return "-" if value is None else (f"{number:.4f}" if math.isfinite(number) else str(value))


def split_fingerprint(data: torch.Tensor) -> str:
    """A short hash of a token split: versions evaluated on the same test rows share it."""
    return hashlib.sha1(data.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]
