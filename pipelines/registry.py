"""Gated promotion in the MLflow model registry: `fldd promote`.

One registered model per data set (default name `fldd-<dataset>`), one champion per step budget T
(aliases `champion-t<T>` and `champion`, moved and rolled back by `pipelines/aliases.py`).

A candidate run (the best finished trial of a sweep at a budget, by validation NELBO; or a given
run) is refused before anything is registered when its final validation metrics are missing or
not finite, its learned forward collapsed, or its data set, vocabulary or sequence length differ
from the registered model's. Otherwise it is registered as a new version and evaluated on the test
split together with the current holder of `champion-t<T>`, same examples, same seeds; the rule
that decides is `pipelines/gate.py:judge` (paired difference against a margin). Every decision and
its numbers are kept as version tags, written before any alias moves.
"""

from __future__ import annotations

import json
import math

import torch
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from fldd.config import FLDDConfig
from fldd.data import load_test_split
from fldd.model import FLDDModel
from fldd.service import model_codec
from pipelines.aliases import alias_lock, move_champion_aliases, uninterrupted
from pipelines.gate import PROMOTED, REFUSED, UNCHANGED, Decision, Scores, judge, number_tag
from pipelines.model_store import (RegistryError, alias_holder, all_versions, as_float, default_model_name, default_name_from_run,
                                   get_registered_model, identity_of, quoted, registry_client,
                                   split_fingerprint)
from pipelines.reports import molecule_scores, nelbo_with_progress
from pipelines.tracking import download_model_file, download_weights
from pipelines.vocabulary import (COLLAPSED_TAG, EVAL_PASSES_TAG, EVAL_SEED_TAG, EXPERIMENT,
                                  FINAL_VALID_NELBO_METRIC, FINAL_VALID_STDERR_METRIC, GIT_COMMIT_TAG, IDENTITY_KEYS,
                                  IDENTITY_TAGS, KIND_TAG, KIND_TRIAL, MODEL_NAME, MODEL_VERSIONS_TAG, NUM_STEPS_TAG,
                                  PARAMETERIZATION_TAG, RUN_NAME_TAG, SOURCE_RUN, SOURCE_SWEEP, SOURCE_TAG, SWEEP_TAG,
                                  TEST_SPLIT_TAG, VALID_NELBO_TAG, VALID_STDERR_TAG, VERSION_BUDGET_TAG,
                                  VERSION_GIT_COMMIT_TAG, VERSION_METHOD_TAG, champion_alias)

__all__ = ["PROMOTED", "REFUSED", "UNCHANGED", "Decision", "RegistryError", "find_candidate", "find_candidates",
           "promote", "promote_run"]


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
    client = registry_client(client)
    filters = f"tags.`{SWEEP_TAG}` = '{quoted(sweep, 'sweep')}' and tags.`{KIND_TAG}` = '{KIND_TRIAL}'"
    if budget is not None:
        filters += f" and tags.`{NUM_STEPS_TAG}` = '{int(budget)}'"
    trials = _search_runs(client, filters)
    if not trials:
        at = f" at budget T={budget}" if budget is not None else ""
        raise RegistryError(f"sweep {sweep!r} has no trial runs{at} (runs tagged {SWEEP_TAG}={sweep!r}, "
                            f"{KIND_TAG}={KIND_TRIAL}) in experiment {EXPERIMENT!r} of {client.tracking_uri}")
    by_budget: dict[int, list[Run]] = {}
    for run in trials:
        try:
            # T as the trainer wrote it from the trial's config: the one record of a trial's budget
            by_budget.setdefault(int(run.data.tags[NUM_STEPS_TAG]), []).append(run)
        except (KeyError, ValueError):
            continue  # a trial without a T tag is not a candidate at any budget
    if not by_budget:
        raise RegistryError(f"sweep {sweep!r}: no trial carries a {NUM_STEPS_TAG} tag")
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
    client = registry_client(client)
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
    registered = get_registered_model(client, name)
    if registered is None:
        return None
    expected = {k: registered.tags.get(IDENTITY_TAGS[k]) for k in IDENTITY_KEYS}
    if any(v is None for v in expected.values()):  # a model registered by other means: ask its versions
        for version in all_versions(client, name):
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
    if get_registered_model(client, name) is None:
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
        VALID_NELBO_TAG: number_tag(run.data.metrics[FINAL_VALID_NELBO_METRIC]),
        VALID_STDERR_TAG: number_tag(run.data.metrics[FINAL_VALID_STDERR_METRIC]),
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


def promote_run(run: Run, *, model_name: str | None = None, margin: float | None = None, passes: int = 10,
                seed: int = 0, sweep: str | None = None, client: MlflowClient | None = None) -> Decision:
    """Gate one candidate run into `model_name` (default fldd-<dataset>) and return the decision."""
    client = registry_client(client)
    if margin is not None and not (math.isfinite(margin) and margin >= 0):  # before any model is loaded
        raise RegistryError(f"margin={margin!r}: must be a finite number >= 0 (bits/token)")
    if passes < 1:
        raise RegistryError(f"passes={passes!r}: must be >= 1")
    run_id = run.info.run_id
    source, _ = _model_source(client, run)
    try:
        candidate = FLDDModel.load(download_weights(client.tracking_uri, source))
    except (FileNotFoundError, MlflowException, OSError) as error:
        raise RegistryError(f"run {run_id} has no loadable logged model at runs:/{run_id}/model: {error}") from error
    cfg = candidate.config
    T = cfg.process.num_steps
    name = model_name or default_model_name(cfg)
    valid_bits = as_float(run.data.metrics.get(FINAL_VALID_NELBO_METRIC))
    base = {"model_name": name, "budget": T, "run_id": run_id, "valid_bits": valid_bits}

    reason = _static_refusal(run, cfg, candidate) or _identity_refusal(client, name, identity_of(cfg))
    if reason:
        return Decision(decision=REFUSED, reason=reason, **base)

    test = load_test_split(cfg)  # DataError (bad input) before anything is registered
    alias = champion_alias(T)
    holder = alias_holder(client, name, alias)
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
    # molecules: scored before the version exists, so a scoring failure (a missing package) leaves no
    # version without a decision; reported beside the NELBO, the gate's rule stays on the NELBO
    codec = model_codec(cfg, candidate.codec)
    is_molecules = codec is not None and codec.kind == "smiles"
    sample_scores = molecule_scores(candidate, test, codec, seed=seed) if is_molecules else {}
    # every attempt is a new version with its own decision tags: a refusal is never overwritten, so
    # retrying with other evaluation seeds until one passes stays visible in the registry
    version = _register(client, name, run, cfg, candidate, sweep)
    version_number = str(version.version)
    decision = Decision(decision=REFUSED, reason="", version=version_number,
                        holder_version=str(holder.version) if holder is not None else None,
                        test_examples=int(test.shape[0]), test_split=fingerprint, sample_scores=sample_scores,
                        **base)

    estimate = _evaluate(candidate, test, passes, seed, f"test NELBO of run {run_id[:8]}, T={T}")
    decision.candidate_test_bits = estimate.bits_per_token
    decision.candidate_test_stderr = estimate.stderr_bits_per_token
    held = None
    if holder_model is not None:
        holder_estimate = _evaluate(holder_model, test, passes, seed, f"test NELBO of holder v{holder.version}")
        held = Scores(holder_estimate.bits_per_token, holder_estimate.per_example_bits)
    verdict = judge(Scores(estimate.bits_per_token, estimate.per_example_bits), held, margin=margin,
                    holder_version=decision.holder_version, first_reason=f"first version at T={T} under {name!r}")
    decision.apply(verdict)

    def record() -> None:  # the record first: an alias never points at a version whose decision is not written down
        for key, value in {**decision.tags(), EVAL_SEED_TAG: str(seed), EVAL_PASSES_TAG: str(passes)}.items():
            client.set_model_version_tag(name, version_number, key, value)

    if not decision.promoted:
        record()
        return decision
    with alias_lock(client, name):  # one alias move at a time for this model, across processes
        now = alias_holder(client, name, alias)
        if (str(now.version) if now is not None else None) != decision.holder_version:
            # another promotion (or rollback) moved the alias while this one was judged against its holder
            decision.decision = REFUSED
            decision.reason = (f"{alias} moved to version {now.version if now is not None else '(none)'} while this "
                               f"candidate was judged against {decision.holder_version or 'no holder'}: run the "
                               "promotion again to judge it against the new holder")
            record()
            return decision
        with uninterrupted():
            record()
            decision.aliases_moved = move_champion_aliases(client, name, T, version_number)
    return decision


def promote(*, sweep: str | None = None, budget: int | None = None, run_id: str | None = None,
            model_name: str | None = None, margin: float | None = None, passes: int = 10, seed: int = 0,
            client: MlflowClient | None = None) -> list[Decision]:
    """`fldd promote`: one decision for a run, or one per budget of a sweep (only `budget` if given)."""
    client = registry_client(client)
    if (sweep is None) == (run_id is None):
        raise RegistryError("give exactly one of --sweep or --run")
    if run_id is not None:
        run = find_candidate(run_id=run_id, budget=budget, client=client)
        return [promote_run(run, model_name=model_name, margin=margin, passes=passes, seed=seed, client=client)]
    decisions = []
    for T, found in find_candidates(sweep, budget, client).items():
        if isinstance(found, str):
            any_trial = _search_runs(client, f"tags.`{SWEEP_TAG}` = '{quoted(sweep, 'sweep')}' and "
                                     f"tags.`{NUM_STEPS_TAG}` = '{T}'")[0]
            decisions.append(Decision(model_name=model_name or default_name_from_run(any_trial), budget=T,
                                      run_id=None, decision=REFUSED,
                                      reason=f"sweep {sweep!r}: {found}"))
            continue
        decisions.append(promote_run(found, model_name=model_name, margin=margin, passes=passes, seed=seed,
                                     sweep=sweep, client=client))
    return decisions
