"""Gated promotion in the MLflow model registry: `fldd promote`, `fldd models`.

One registered model per data set (default name `fldd-<dataset>`), one champion per step budget T:

- alias `champion-t<T>`: the best version at T on the held-out *test* split, as judged by the gate;
- alias `champion`: follows `champion-t<T>` for the model's default budget (registered-model tag
  `fldd.default_budget`, the T of the first version ever registered under the name).

The gate (`promote_run`): a candidate run (the best finished trial of a sweep at a budget, by
validation NELBO; or a given run) is refused before anything is registered when its final
validation metrics are missing or not finite, its learned forward collapsed, or its data set,
vocabulary or sequence length differ from the registered model's. Otherwise it is registered as a
new version and evaluated on the test split together with the current holder of `champion-t<T>`,
same examples, same seeds: the per-example NELBO differences are paired, so their mean has a
standard error. The alias moves only when holder_mean - candidate_mean > margin (default: 2 x the
standard error of the paired difference). The first version at a budget is accepted when its
numbers are finite. Every decision and its numbers are kept as version tags.

Alias history (registered-model tag `fldd.history.champion-t<T>`, a JSON list of versions in the
order they held the alias) makes `rollback` possible, one step per call.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from fldd.config import FLDDConfig
from fldd.data import load_test_split
from fldd.model import FLDDModel
from pipelines.reports import nelbo_with_progress
from pipelines.tracking import dataset_name, download_model_file, tracking_uri
from pipelines.vocabulary import (BUDGET_TAG, CHAMPION, COLLAPSED_TAG, DATASET_TAG, DECIDED_AT_TAG, DECISION_REASON_TAG,
                                  DECISION_TAG, DEFAULT_BUDGET_TAG, EVAL_PASSES_TAG, EVAL_SEED_TAG, EXPERIMENT,
                                  FINAL_VALID_NELBO_METRIC, FINAL_VALID_STDERR_METRIC, GIT_COMMIT_TAG,
                                  HOLDER_TEST_NELBO_TAG, HOLDER_VERSION_TAG, IDENTITY_KEYS, IDENTITY_TAGS, KIND_TAG,
                                  KIND_TRIAL, MARGIN_RULE_TAG, MARGIN_TAG, MODEL_NAME, MODEL_VERSIONS_TAG,
                                  PAIRED_DIFFERENCE_TAG, PAIRED_STDERR_TAG, PARAMETERIZATION_TAG, REGISTERED_MODEL_NAME,
                                  ROLLED_BACK_AT_TAG, RUN_NAME_TAG, SOURCE_RUN, SOURCE_SWEEP, SOURCE_TAG, SWEEP_TAG,
                                  TEST_EXAMPLES_TAG, TEST_NELBO_TAG, TEST_SPLIT_TAG, TEST_STDERR_TAG, VALID_NELBO_TAG,
                                  VALID_STDERR_TAG, VERSION_BUDGET_TAG, VERSION_GIT_COMMIT_TAG, VERSION_METHOD_TAG,
                                  champion_alias, history_tag)

PROMOTED, REFUSED, UNCHANGED = "promoted", "refused", "unchanged"


class RegistryError(ValueError):
    """Bad input: no such run, sweep, model or budget; an impossible option. (CLI exit code 2.)"""


class RollbackError(RuntimeError):
    """A rollback that cannot be done: no previous holder, or an alias history out of step. (exit 1)"""


@dataclass
class Decision:
    """One promotion decision. `decision`: promoted | refused | unchanged (the run already holds it)."""

    model_name: str
    budget: int | None
    run_id: str | None
    decision: str
    reason: str
    version: str | None = None  # the candidate's model version (None: refused before registering)
    holder_version: str | None = None  # who held champion-t<T> when the decision was taken
    candidate_test_bits: float = math.nan
    candidate_test_stderr: float = math.nan
    holder_test_bits: float = math.nan
    difference_bits: float = math.nan  # holder - candidate, paired, mean over test examples (> 0: better)
    difference_stderr: float = math.nan
    margin_bits: float = math.nan
    margin_rule: str = ""
    test_examples: int = 0
    test_split: str = ""  # split_fingerprint of the test rows both models were evaluated on
    valid_bits: float = math.nan  # the run's final validation NELBO (what chose it)
    aliases_moved: list[str] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def tags(self) -> dict[str, str]:
        """The version tags that record this decision."""
        tags = {DECISION_TAG: self.decision, DECISION_REASON_TAG: self.reason[:4900],
                DECIDED_AT_TAG: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                TEST_NELBO_TAG: _number(self.candidate_test_bits),
                TEST_STDERR_TAG: _number(self.candidate_test_stderr),
                TEST_EXAMPLES_TAG: str(self.test_examples), TEST_SPLIT_TAG: self.test_split,
                HOLDER_VERSION_TAG: self.holder_version or "none"}
        if self.holder_version is not None:
            tags.update({HOLDER_TEST_NELBO_TAG: _number(self.holder_test_bits),
                         PAIRED_DIFFERENCE_TAG: _number(self.difference_bits),
                         PAIRED_STDERR_TAG: _number(self.difference_stderr),
                         MARGIN_TAG: _number(self.margin_bits), MARGIN_RULE_TAG: self.margin_rule})
        return tags

    def __str__(self) -> str:
        where = f"{self.model_name} version {self.version}" if self.version else f"{self.model_name} (not registered)"
        lines = [f"{self.decision.upper()}: run {self.run_id} at T={self.budget} -> {where}",
                 f"  reason: {self.reason}"]
        if math.isfinite(self.valid_bits):
            lines.append(f"  validation NELBO (run):  {self.valid_bits:.4f} bits/token")
        if self.test_examples:
            lines.append(f"  test NELBO, candidate:   {self.candidate_test_bits:.4f} +- "
                         f"{self.candidate_test_stderr:.4f}"
                         f" bits/token ({self.test_examples} examples)")
        if self.holder_version is not None and self.test_examples:
            lines.append(f"  test NELBO, holder v{self.holder_version}: {self.holder_test_bits:.4f} bits/token")
            lines.append(f"  paired difference (holder - candidate): {self.difference_bits:+.4f} +- "
                         f"{self.difference_stderr:.4f}; margin {self.margin_bits:.4f} ({self.margin_rule})")
        if self.aliases_moved:
            lines.append(f"  aliases moved: {', '.join(self.aliases_moved)}")
        return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _number(value: float) -> str:
    return repr(float(value))


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _client(client: MlflowClient | None) -> MlflowClient:
    return client or MlflowClient(tracking_uri())


def _quoted(value: str, what: str) -> str:
    if "'" in value or "`" in value:
        raise RegistryError(f"{what}={value!r}: quotes are not allowed")
    return value


def _not_found(error: MlflowException) -> bool:
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def default_model_name(cfg: FLDDConfig) -> str:
    return REGISTERED_MODEL_NAME.format(dataset=dataset_name(cfg))


def _default_name_from_run(run: Run) -> str:
    """default_model_name from a run's tags and params, without loading its model."""
    params = run.data.params
    dataset = (run.data.tags.get(DATASET_TAG) or (Path(params["data.path"]).stem if params.get("data.path") else None)
               or params.get("data.name", "unknown"))
    return REGISTERED_MODEL_NAME.format(dataset=dataset)


def identity_of(cfg: FLDDConfig) -> dict[str, str]:
    return {"dataset": dataset_name(cfg), "vocab_size": str(cfg.vocab_size), "seq_len": str(cfg.seq_len)}


def _get_registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if _not_found(error):
            return None
        raise


def _alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if _not_found(error) or "alias" in str(error).lower():
            return None
        raise


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{_quoted(name, 'model name')}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def _history(model: RegisteredModel, alias: str) -> list[str]:
    raw = model.tags.get(history_tag(alias))
    return [str(v) for v in json.loads(raw)] if raw else []


def _set_history(client: MlflowClient, name: str, alias: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(history))


# ---------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------

def _search_runs(client: MlflowClient, filter_string: str) -> list[Run]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _eligible(run: Run) -> str | None:
    """Why a run cannot be a candidate (None: it can)."""
    if run.info.status != "FINISHED":
        return f"status {run.info.status}"
    value = run.data.metrics.get(FINAL_VALID_NELBO_METRIC)
    if value is None:
        return (f"no {FINAL_VALID_NELBO_METRIC} metric (training logs only finite values: it was NaN or inf, "
                "or never logged)")
    if not math.isfinite(value):
        return f"{FINAL_VALID_NELBO_METRIC}={value}"
    if run.data.tags.get(COLLAPSED_TAG) == "True":
        return f"collapsed forward (tag {COLLAPSED_TAG}=True)"
    return None


def find_candidates(sweep: str, budget: int | None = None, client: MlflowClient | None = None) -> dict[int, Run | str]:
    """The candidate of a sweep at each budget (or only at `budget`): the FINISHED trial with the
    lowest final validation NELBO, skipping non-finite values and collapsed runs. Budgets whose
    trials are all ineligible map to a string saying why. RegistryError: no trials at all."""
    client = _client(client)
    filters = f"tags.`{SWEEP_TAG}` = '{_quoted(sweep, 'sweep')}' and tags.`{KIND_TAG}` = '{KIND_TRIAL}'"
    if budget is not None:
        filters += f" and tags.`{BUDGET_TAG}` = '{int(budget)}'"
    trials = _search_runs(client, filters)
    if not trials:
        at = f" at budget T={budget}" if budget is not None else ""
        raise RegistryError(f"sweep {sweep!r} has no trial runs{at} (runs tagged {SWEEP_TAG}={sweep!r}, "
                            f"{KIND_TAG}={KIND_TRIAL}) in experiment {EXPERIMENT!r} of {client.tracking_uri}")
    by_budget: dict[int, list[Run]] = {}
    for run in trials:
        try:
            by_budget.setdefault(int(run.data.tags[BUDGET_TAG]), []).append(run)
        except (KeyError, ValueError):
            continue  # a trial without a budget tag is not a candidate at any budget
    if not by_budget:
        raise RegistryError(f"sweep {sweep!r}: no trial carries a {BUDGET_TAG} tag")
    result: dict[int, Run | str] = {}
    for T, runs in sorted(by_budget.items()):
        eligible = [r for r in runs if _eligible(r) is None]
        if eligible:
            result[T] = min(eligible, key=lambda r: (r.data.metrics[FINAL_VALID_NELBO_METRIC], r.info.start_time))
        else:
            reasons = sorted({_eligible(r) for r in runs})
            result[T] = f"no eligible trial among {len(runs)} at T={T}: " + "; ".join(reasons)
    return result


def find_candidate(*, sweep: str | None = None, budget: int | None = None, run_id: str | None = None,
                   client: MlflowClient | None = None) -> Run:
    """One candidate run: by run id, or the best eligible trial of `sweep` at `budget` (budget may be
    left out when the sweep has a single budget; `find_candidates` gives one per budget)."""
    client = _client(client)
    if (sweep is None) == (run_id is None):
        raise RegistryError("give exactly one of sweep= or run_id=")
    if run_id is not None:
        if budget is not None:
            raise RegistryError("budget= goes with sweep=; a run has its own T")
        try:
            return client.get_run(run_id)
        except MlflowException as error:
            raise RegistryError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from error
    candidates = find_candidates(sweep, budget, client)
    if len(candidates) > 1:
        raise RegistryError(f"sweep {sweep!r} has budgets {sorted(candidates)}: give budget=")
    (found,) = candidates.values()
    if isinstance(found, str):
        raise RegistryError(f"sweep {sweep!r}: {found}")
    return found


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------

def _model_source(client: MlflowClient, run: Run) -> tuple[str, str | None]:
    """(source URI, logged-model id) for registering `runs:/RUN_ID/model`, resolved the way
    pipelines.tracking.resolve_model reads it: the run's newest LoggedModel named `model`, else (a
    model logged before LoggedModels) the run's own `model/` artifacts.

    Resolved with this client only, and the source is the LoggedModel's storage location, not
    `models:/m-...`: MlflowClient.list_artifacts on a runs:/ path, and the SQL registry store given
    a models:/ source, look LoggedModels up through the process-wide tracking URI (a default
    ./mlflow.db) whatever the client's URI (MLflow 3.17).
    """
    run_id = run.info.run_id
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    if models:
        newest = max(models, key=lambda m: m.creation_timestamp)
        return newest.artifact_location, newest.model_id
    location = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_NAME}"
    if not any(a.path.endswith("MLmodel") for a in get_artifact_repository(location).list_artifacts()):
        raise RegistryError(f"run {run_id} has no logged model at runs:/{run_id}/model")
    return location, None


def _download_weights(client: MlflowClient, location: str) -> Path:
    """model.pt under a model's storage location (what _model_source returns)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=client.tracking_uri))
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise FileNotFoundError(f"{location} holds no model.pt")
    return found[0]


def _static_refusal(run: Run, cfg: FLDDConfig, model: FLDDModel) -> str | None:
    """Reasons to refuse before registering anything."""
    if run.info.status != "FINISHED":
        return f"run {run.info.run_id} is {run.info.status}, not FINISHED"
    for key in (FINAL_VALID_NELBO_METRIC, FINAL_VALID_STDERR_METRIC):
        value = run.data.metrics.get(key)
        if value is None:
            return (f"the run has no {key} metric: its final validation metrics are missing "
                    "(training logs only finite values, so it was NaN or inf, or the run never finished)")
        if not math.isfinite(value):
            return f"non-finite validation metric {key}={value}"
    if run.data.tags.get(COLLAPSED_TAG) == "True" or bool(model.collapsed):
        return (f"collapsed forward process (run tag {COLLAPSED_TAG}=True): no interior step carries information "
                "about x, so this T-step model samples like a 1-step model")
    return None


def _identity_refusal(client: MlflowClient, name: str, identity: dict[str, str]) -> str | None:
    registered = _get_registered_model(client, name)
    if registered is None:
        return None
    expected = {k: registered.tags.get(IDENTITY_TAGS[k]) for k in IDENTITY_KEYS}
    if any(v is None for v in expected.values()):  # a model registered by other means: ask its versions
        for version in _versions(client, name):
            for k in IDENTITY_KEYS:
                expected[k] = expected[k] or version.tags.get(IDENTITY_TAGS[k])
    differences = [f"{k} {identity[k]!r} (model has {expected[k]!r})" for k in IDENTITY_KEYS
                   if expected[k] is not None and expected[k] != identity[k]]
    if differences:
        return (f"registered model {name!r} is for another data set: candidate has " + ", ".join(differences)
                + "; use --model-name for a model of its own")
    return None


def _evaluate(model: FLDDModel, data: torch.Tensor, passes: int, seed: int, label: str = "test NELBO"):
    return nelbo_with_progress(model.eval(), data, passes, seed, label)


def _register(client: MlflowClient, name: str, run: Run, cfg: FLDDConfig, model: FLDDModel,
              sweep: str | None) -> ModelVersion:
    identity = identity_of(cfg)
    T = cfg.process.num_steps
    if _get_registered_model(client, name) is None:
        try:
            client.create_registered_model(
                name, tags={IDENTITY_TAGS[k]: v for k, v in identity.items()},
                description=f"FLDD samplers for {identity['dataset']} (fldd promote). Aliases: champion-t<T> "
                "per step budget T; champion follows champion-t<default budget>.")
        except MlflowException as error:
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
    registered = client.get_registered_model(name)
    for key, value in identity.items():  # a model created by other means: adopt the identity
        if IDENTITY_TAGS[key] not in registered.tags:
            client.set_registered_model_tag(name, IDENTITY_TAGS[key], value)
    tags = run.data.tags
    version_tags = {
        VERSION_BUDGET_TAG: str(T), PARAMETERIZATION_TAG: tags.get(PARAMETERIZATION_TAG) or cfg.parameterization,
        VERSION_METHOD_TAG: cfg.process.method, **{IDENTITY_TAGS[k]: v for k, v in identity.items()},
        VALID_NELBO_TAG: _number(run.data.metrics[FINAL_VALID_NELBO_METRIC]),
        VALID_STDERR_TAG: _number(run.data.metrics[FINAL_VALID_STDERR_METRIC]),
        VERSION_GIT_COMMIT_TAG: tags.get(GIT_COMMIT_TAG, "unknown"),
        RUN_NAME_TAG: tags.get(RUN_NAME_TAG, run.info.run_name),
        SOURCE_TAG: SOURCE_SWEEP if sweep else SOURCE_RUN, **({SWEEP_TAG: sweep} if sweep else {}),
    }
    source, model_id = _model_source(client, run)
    version = client.create_model_version(name, source, run_id=run.info.run_id, tags=version_tags,
                                          description=f"run {run.info.run_id} ({version_tags[RUN_NAME_TAG]})",
                                          model_id=model_id)
    if model_id:  # the LoggedModel lists its registered versions, as mlflow.register_model records it
        listed = json.loads(client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
        listed.append({"name": name, "version": str(version.version)})
        client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(listed)})
    return version


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then take effect, so a signal never leaves the
    aliases of one decision and their history tags half-moved. (An MLflow error in between still
    can: the registry has no transactions. Signals reach only the main thread.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in watched}
    for s in watched:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])  # delivered now, to the handler that was in place


def _move_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    registered = client.get_registered_model(name)
    history = _history(registered, alias)
    current = _alias_holder(client, name, alias)
    if current is not None and (not history or history[-1] != str(current.version)):
        history.append(str(current.version))  # set outside fldd promote: keep it so rollback can return to it
    client.set_registered_model_alias(name, alias, version)
    _set_history(client, name, alias, history + [str(version)])


def promote_run(run: Run, *, model_name: str | None = None, margin: float | None = None, passes: int = 10,
                seed: int = 0, sweep: str | None = None, budget: int | None = None,
                client: MlflowClient | None = None) -> Decision:
    """Gate one candidate run into `model_name` (default fldd-<dataset>) and return the decision."""
    client = _client(client)
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise RegistryError(f"margin={margin!r}: must be a finite number >= 0 (bits/token)")
    if passes < 1:
        raise RegistryError(f"passes={passes!r}: must be >= 1")
    run_id = run.info.run_id
    source, _ = _model_source(client, run)
    try:
        candidate = FLDDModel.load(_download_weights(client, source))
    except (FileNotFoundError, MlflowException, OSError) as error:
        raise RegistryError(f"run {run_id} has no loadable logged model at runs:/{run_id}/model: {error}") from error
    cfg = candidate.config
    T = cfg.process.num_steps
    name = model_name or default_model_name(cfg)
    valid_bits = _float(run.data.metrics.get(FINAL_VALID_NELBO_METRIC))
    base = {"model_name": name, "budget": T, "run_id": run_id, "valid_bits": valid_bits}
    if budget is not None and int(budget) != T:
        raise RegistryError(f"run {run_id} is tagged for budget T={budget} but its model has T={T}")

    reason = _static_refusal(run, cfg, candidate) or _identity_refusal(client, name, identity_of(cfg))
    if reason:
        return Decision(decision=REFUSED, reason=reason, **base)

    test = load_test_split(cfg)  # DataError (bad input) before anything is registered
    alias = champion_alias(T)
    holder = _alias_holder(client, name, alias)
    if holder is not None and holder.run_id == run_id:
        return Decision(decision=UNCHANGED, reason=f"version {holder.version} (this run) already holds {alias}",
                        version=str(holder.version), holder_version=str(holder.version), **base)
    holder_model = None
    if holder is not None:
        holder_path, _ = download_model_file(client.tracking_uri, f"models:/{name}/{holder.version}")
        holder_model = FLDDModel.load(holder_path)
        if identity_of(holder_model.config) != identity_of(cfg):  # aliases set by other means
            raise RegistryError(f"holder version {holder.version} of {name!r} is for "
                                f"{identity_of(holder_model.config)}, the candidate for {identity_of(cfg)}: "
                                "fix the registered model's aliases first")
    fingerprint = split_fingerprint(test)
    judged_on = holder.tags.get(TEST_SPLIT_TAG) if holder is not None else None
    if judged_on and judged_on != fingerprint:  # the two test NELBOs would not be comparable
        return Decision(decision=REFUSED, reason=f"the candidate's test split ({fingerprint}) is not the one holder "
                        f"version {holder.version} was judged on ({judged_on}): its data settings (data.seed, "
                        "data.num_valid, data.path) differ; train it on the registered model's data", **base)
    # every attempt is a new version with its own decision tags: a refusal is never overwritten, so
    # retrying with other evaluation seeds until one passes stays visible in the registry
    version = _register(client, name, run, cfg, candidate, sweep)
    version_number = str(version.version)
    decision = Decision(decision=REFUSED, reason="", version=version_number,
                        holder_version=str(holder.version) if holder is not None else None,
                        test_examples=int(test.shape[0]), test_split=fingerprint, **base)

    estimate = _evaluate(candidate, test, passes, seed, f"test NELBO of run {run_id[:8]}, T={T}")
    decision.candidate_test_bits = estimate.bits_per_token
    decision.candidate_test_stderr = estimate.stderr_bits_per_token
    if holder_model is None:
        if math.isfinite(estimate.bits_per_token):
            decision.decision, decision.reason = PROMOTED, f"first version at T={T} under {name!r}; test NELBO finite"
        else:
            decision.reason = f"non-finite test NELBO {estimate.bits_per_token}"
    else:
        held = _evaluate(holder_model, test, passes, seed, f"test NELBO of holder v{holder.version}")
        diff = held.per_example_bits - estimate.per_example_bits  # > 0 where the candidate is better
        n = diff.numel()
        decision.holder_test_bits = held.bits_per_token
        decision.difference_bits = diff.mean().item()
        decision.difference_stderr = (diff.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else math.nan
        if margin is None:
            decision.margin_bits, decision.margin_rule = 2.0 * decision.difference_stderr, "2 x paired stderr"
        else:
            decision.margin_bits, decision.margin_rule = float(margin), "absolute (--margin)"
        if not math.isfinite(estimate.bits_per_token):
            decision.reason = f"non-finite test NELBO of the candidate: {estimate.bits_per_token}"
        elif not (math.isfinite(held.bits_per_token) and math.isfinite(decision.margin_bits)):
            decision.reason = (f"non-finite test NELBO of holder version {holder.version} ({held.bits_per_token}) "
                               "or of the margin: investigate the holder, or roll it back")
        elif decision.difference_bits > decision.margin_bits:
            decision.decision = PROMOTED
            decision.reason = (f"better than holder version {holder.version} by {decision.difference_bits:.4f} "
                               f"bits/token > margin {decision.margin_bits:.4f}")
        elif decision.difference_bits <= 0:
            decision.reason = (f"not better than holder version {holder.version}: test NELBO "
                               f"{estimate.bits_per_token:.4f} vs {held.bits_per_token:.4f} bits/token")
        else:
            decision.reason = (f"within the margin of holder version {holder.version}: better by "
                               f"{decision.difference_bits:.4f} <= margin {decision.margin_bits:.4f} bits/token")

    # the record first: an alias never points at a version whose decision is not written down
    for key, value in {**decision.tags(), EVAL_SEED_TAG: str(seed), EVAL_PASSES_TAG: str(passes)}.items():
        client.set_model_version_tag(name, version_number, key, value)
    if decision.promoted:
        with uninterrupted():
            _move_champion_aliases(client, name, T, alias, version_number, decision)
    return decision


def _move_champion_aliases(client: MlflowClient, name: str, T: int, alias: str, version_number: str,
                           decision: Decision) -> None:
    if DEFAULT_BUDGET_TAG not in client.get_registered_model(name).tags:
        # the first budget ever promoted is the one `champion` follows (a refused first version sets nothing)
        client.set_registered_model_tag(name, DEFAULT_BUDGET_TAG, str(T))
    aliases = [alias]
    if str(T) == client.get_registered_model(name).tags.get(DEFAULT_BUDGET_TAG):
        aliases.append(CHAMPION)
    for moved in aliases:
        _move_alias(client, name, moved, version_number)
    decision.aliases_moved = aliases


def promote(*, sweep: str | None = None, budget: int | None = None, run_id: str | None = None,
            model_name: str | None = None, margin: float | None = None, passes: int = 10, seed: int = 0,
            client: MlflowClient | None = None) -> list[Decision]:
    """`fldd promote`: one decision for a run, or one per budget of a sweep (only `budget` if given)."""
    client = _client(client)
    if (sweep is None) == (run_id is None):
        raise RegistryError("give exactly one of --sweep or --run")
    if run_id is not None:
        run = find_candidate(run_id=run_id, budget=budget, client=client)
        return [promote_run(run, model_name=model_name, margin=margin, passes=passes, seed=seed, client=client)]
    decisions = []
    for T, found in find_candidates(sweep, budget, client).items():
        if isinstance(found, str):
            any_trial = _search_runs(client, f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{BUDGET_TAG}` = '{T}'")[0]
            decisions.append(Decision(model_name=model_name or _default_name_from_run(any_trial), budget=T,
                                      run_id=None, decision=REFUSED,
                                      reason=f"sweep {sweep!r}: {found}"))
            continue
        decisions.append(promote_run(found, model_name=model_name, margin=margin, passes=passes, seed=seed,
                                     sweep=sweep, budget=T, client=client))
    return decisions


def rollback(model_name: str, budget: int | None = None, client: MlflowClient | None = None) -> dict[str, str]:
    """Give `champion-t<T>` back to its previous holder (and `champion` when it held the same
    version), dropping the last entry of the alias history. Returns {alias: version now}."""
    client = _client(client)
    registered = _get_registered_model(client, model_name)
    if registered is None:
        raise RegistryError(f"no registered model {model_name!r} in {client.tracking_uri}")
    if budget is None:
        if DEFAULT_BUDGET_TAG not in registered.tags:
            raise RegistryError(f"model {model_name!r} has no {DEFAULT_BUDGET_TAG} tag: give --budget")
        budget = int(registered.tags[DEFAULT_BUDGET_TAG])
    alias = champion_alias(budget)
    current = _alias_holder(client, model_name, alias)
    if current is None:
        raise RollbackError(f"model {model_name!r} has no alias {alias}: nothing to roll back")
    history = _history(registered, alias)
    if not history or history[-1] != str(current.version):
        raise RollbackError(f"{alias} of {model_name!r} is at version {current.version} but its history "
                            f"{history} ends elsewhere (moved outside fldd promote?); set the alias by hand")
    if len(history) < 2:
        raise RollbackError(f"{alias} of {model_name!r} has no previous holder (version {current.version} is the "
                            "first): nothing to roll back to")
    previous = history[-2]
    moved = {alias: previous}
    champion = _alias_holder(client, model_name, CHAMPION)
    champion_follows = (champion is not None and str(champion.version) == str(current.version)
                        and str(budget) == registered.tags.get(DEFAULT_BUDGET_TAG))
    with uninterrupted():
        client.set_registered_model_alias(model_name, alias, previous)
        _set_history(client, model_name, alias, history[:-1])
        if champion_follows:
            champion_history = _history(registered, CHAMPION)
            client.set_registered_model_alias(model_name, CHAMPION, previous)
            if champion_history and champion_history[-1] == str(current.version):
                _set_history(client, model_name, CHAMPION, champion_history[:-1])
            moved[CHAMPION] = previous
    client.set_model_version_tag(model_name, str(current.version), ROLLED_BACK_AT_TAG,
                                 time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return moved


def list_models(name: str | None = None, client: MlflowClient | None = None) -> list[ModelRow]:
    """Rows for `fldd models [NAME]`: every version with its aliases, T, parameterization, test NELBO
    and gate decision. RegistryError when `name` is not registered."""
    client = _client(client)
    if name is not None:
        if _get_registered_model(client, name) is None:
            raise RegistryError(f"no registered model {name!r} in {client.tracking_uri}")
        names = [name]
    else:
        names, token = [], None
        while True:
            page = client.search_registered_models(max_results=1000, page_token=token)
            names.extend(m.name for m in page)
            token = page.token
            if not token:
                break
        names.sort()
    rows = []
    for model_name in names:
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(model_name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in _versions(client, model_name):
            t = v.tags
            rows.append(ModelRow(
                name=model_name, version=str(v.version), aliases=sorted(aliases.get(str(v.version), [])),
                budget=t.get(VERSION_BUDGET_TAG, "?"), parameterization=t.get(PARAMETERIZATION_TAG, "?"),
                dataset=t.get(DATASET_TAG, "?"), valid_bits=_short(t.get(VALID_NELBO_TAG)),
                test_bits=_short(t.get(TEST_NELBO_TAG)), decision=t.get(DECISION_TAG, "-"),
                run_id=v.run_id or ""))
    return rows


def _short(value: str | None) -> str:
    number = _float(value)
    return "-" if value is None else (f"{number:.4f}" if math.isfinite(number) else str(value))


def format_models(rows: list[ModelRow]) -> str:
    header = ("model", "ver", "aliases", "T", "parameterization", "dataset", "valid bits", "test bits", "decision",
              "run")
    table = [header] + [(r.name, r.version, ",".join(r.aliases) or "-", r.budget, r.parameterization, r.dataset,
                         r.valid_bits, r.test_bits, r.decision, r.run_id) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def split_fingerprint(data: torch.Tensor) -> str:
    """A short hash of a token split: versions evaluated on the same test rows share it."""
    return hashlib.sha1(data.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]
