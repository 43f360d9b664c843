"""MLflow tracking: the store, one run per training run (a resumed run continues it), and the model.

Default store: SQLite under the project home (absolute paths, created by the driver before any
worker starts, so parallel processes never race to initialise it). MLFLOW_TRACKING_URI overrides.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import requests
from mlflow.entities import LoggedModel, Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from fldd.config import FLDDConfig
from pipelines.vocabulary import (ERROR_TAG, EXPERIMENT, MODEL_ID_TAG, MODEL_NAME, RESUMED_TAG, RUN_NAME_TAG,
                                  TRAIN_STEPS_TAG)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"
MODEL_PIP_REQUIREMENTS = ["torch==2.13.0", "numpy", "pyyaml", "pyarrow"]


def project_home() -> Path:
    return Path(os.environ.get("FLDD_HOME", ".fldd")).resolve()


def dataset_name(cfg: FLDDConfig) -> str:
    """The built-in data set's name, or a Parquet table's file/directory stem."""
    return Path(cfg.data.path).stem if cfg.data.path else cfg.data.name


def tracking_uri(home: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = (home or project_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"  # absolute path: sqlite:////abs/...


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not answer, through all of MLflow's own retries."""


def retry_window_s() -> float:
    """About how long MLflow's client keeps retrying a request that gets no answer (a stopped server
    refuses at once): its urllib3 Retry sleeps nothing before the first retry, then factor * 2**(n-1)
    s (at most 120) before the n-th. The defaults (7 retries, factor 2) give 244 s."""
    factor = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    return float(sum(min(120.0, factor * 2 ** (n - 1)) for n in range(2, MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() + 1)))


def unreachable_message(uri: str) -> str:
    return (f"the MLflow tracking server {uri} did not answer through about {retry_window_s():.0f} s of retries "
            f"(MLFLOW_HTTP_REQUEST_MAX_RETRIES={MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()}, "
            f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()} set how long)")


def tracking_outage(error: BaseException | None) -> BaseException | None:
    """The unanswered request behind `error`, following what it was raised from or during (MLflow
    raises its own exception while handling requests' ConnectionError or Timeout), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        # RetryError: a proxy in front of the server answered 502/503 through every retry
        if isinstance(error, (TrackingUnavailable, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              requests.exceptions.RetryError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def naming_an_outage(uri: str) -> Iterator[None]:
    """A request the server never answered becomes TrackingUnavailable naming the URI and the bound."""
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception as error:
        if tracking_outage(error) is None:
            raise
        raise TrackingUnavailable(unreachable_message(uri)) from error


class Tracker:
    """Explicit MLflow client calls for one run (no global active run, safe inside Ray workers).
    A server that stops answering is waited for by MLflow's own retries (`retry_window_s`); past
    them a call raises TrackingUnavailable."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        now = int(1000 * time.time())
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()
                   if isinstance(value, (int, float, np.floating)) and np.isfinite(value)]
        if entries:
            with naming_an_outage(self.uri):
                self.client.log_batch(self.run_id, metrics=entries)

    def last_logged_step(self, key: str) -> int:
        """The highest step `key` was logged at in this run, -1 if none: a resumed run logs only past
        it, so every step is in the history once."""
        with naming_an_outage(self.uri):
            return max((metric.step for metric in self.client.get_metric_history(self.run_id, key)), default=-1)

    def set_tags(self, tags: dict[str, Any]) -> None:
        with naming_an_outage(self.uri):
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
        with naming_an_outage(self.uri):
            for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=entries[start:start + 100])

    def log_text(self, name: str, text: str) -> None:
        with naming_an_outage(self.uri):
            self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with naming_an_outage(self.uri):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_json(self, name: str, payload: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2))
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        with naming_an_outage(self.uri):
            self.client.set_terminated(self.run_id, status)


def ensure_experiment(client: MlflowClient, home: Path, name: str = EXPERIMENT) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if client.tracking_uri.startswith("sqlite:"):  # local store: an absolute local artifact root
        location = (home / "mlartifacts").resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)
    return client.create_experiment(name)


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it: a result from uncommitted code says so."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{head}-dirty" if head and dirty else head or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(cfg: FLDDConfig, run_name: str, tags: dict[str, Any], home: Path | None = None) -> tuple[Tracker, bool]:
    """The MLflow run for `run_name`: the existing one (resume) or a new one. Returns (tracker, resumed)."""
    home = (home or project_home()).resolve()
    uri = tracking_uri(home)
    client = MlflowClient(uri)
    with naming_an_outage(uri):
        experiment_id = ensure_experiment(client, home)
        run_id, resumed = find_or_create_run(client, experiment_id, run_name, tags)
    tracker = Tracker(uri, run_id)
    if resumed:
        # params are immutable in MLflow; the settings a resume may change go in as tags
        tracker.set_tags({**tags, RESUMED_TAG: "true", TRAIN_STEPS_TAG: cfg.train.steps})
        with naming_an_outage(uri):
            if ERROR_TAG in client.get_run(run_id).data.tags:  # the failure this run resumes from is over
                client.delete_tag(run_id, ERROR_TAG)
        return tracker, True
    # what the optimizer uses, and what each "auto" stands for at this T
    resolved = cfg.resolved_flat_dict()  # None where a setting means nothing for this method
    derived = {f"{key}_resolved": resolved[key] for key in
               ("process.prior", "process.warm_start", "train.forward_freeze_fraction") if resolved[key] is not None}
    if cfg.learns_forward:
        derived["train.forward_lr_at_T"] = cfg.forward_lr
    tracker.log_params({**cfg.to_flat_dict(), **derived})
    return tracker, False


def find_or_create_run(client: MlflowClient, experiment_id: str, run_name: str,
                       tags: dict[str, Any]) -> tuple[str, bool]:
    """(run id, resumed): the newest run tagged with this name, set RUNNING again, or a new run.
    Names are the identity that makes reruns resume instead of duplicating runs."""
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
    if existing:
        client.update_run(existing[0].info.run_id, status="RUNNING")
        return existing[0].info.run_id, True
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={RUN_NAME_TAG: run_name, **{k: str(v) for k, v in tags.items()}})
    return run.info.run_id, False


def model_signature(seq_len: int, num_steps: int) -> ModelSignature:
    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype("int64"), (-1, seq_len), name="tokens")]),
        params=ParamSchema([ParamSpec("num_samples", "long", 16), ParamSpec("steps", "long", num_steps),
                            ParamSpec("seed", "long", 0)]),
    )


def log_sampler_model(tracker: Tracker, model_path: Path, cfg: FLDDConfig) -> str:
    """Log the sampler as an MLflow LoggedModel of the run and return `runs:/<run_id>/model`.

    Models-from-code: the code file, the `fldd` package and the weights + config (model.pt) are
    stored; nothing is pickled. The model is the run's output at step train.steps, the run's metrics
    at that step (final_*) are linked to it, it carries the run's params, and the run gets a
    `fldd.model_id` tag. The run's status is left alone: the caller finishes the run.
    """
    client, run_id = tracker.client, tracker.run_id
    run = client.get_run(run_id)
    # Created here, in the run's experiment: log_model would put it in the globally active
    # experiment (the Default one), where runs:/<run_id>/model does not look.
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        params=run.data.params)
    with global_tracking_uri(tracker.uri), warnings.catch_warnings():
        # the sampler takes no input data, only params: MLflow's input-example/type-hint advice does not apply
        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        # Model.log rather than mlflow.pyfunc.log_model, which only links the *active* run: a run
        # activated for it (start_run(run_id=...)) is marked FINISHED when its context exits.
        Model.log(None, flavor=mlflow.pyfunc, name=MODEL_NAME, model_id=logged.model_id, run_id=run_id,
                  step=cfg.train.steps, python_model=str(MODEL_CODE), artifacts={"model": str(model_path)},
                  code_paths=[str(PACKAGE_ROOT / "fldd")],
                  signature=model_signature(cfg.seq_len, cfg.process.num_steps),
                  pip_requirements=MODEL_PIP_REQUIREMENTS)
    tracker.set_tags({MODEL_ID_TAG: logged.model_id})
    return f"runs:/{run_id}/{MODEL_NAME}"


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for a block (Model.log and models:/ loading
    read no other), then put back: MLFLOW_TRACKING_URI as it was (set_tracking_uri writes it too),
    and the process-wide value unset again unless one was set apart from the environment. (A value
    equal to the environment's is left to the environment, so a later change of the variable counts.)"""
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    current = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    previous = None if current == environment else current
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if environment is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environment


def resolve_model(uri: str, reference: str) -> tuple[str, str | None]:
    """(artifact URI of the model's files, source run id) for `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `models:/MODEL_ID`, `runs:/RUN_ID/NAME`, or a bare run id.

    Resolved with a client on `uri` down to the LoggedModel's storage location: MLflow resolves
    `models:/` URIs through the process-wide tracking URI, whatever tracking_uri it is given.
    """
    client = MlflowClient(uri)
    if reference.startswith("models:/"):
        target = reference[len("models:/"):]
        name, _, alias = target.partition("@")
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in target:
            version = client.get_model_version(*target.split("/", 1))
        else:  # models:/m-...: a LoggedModel
            return _location(client.get_logged_model(target))
        if version.source.startswith("models:/"):  # MLflow 3 registers a LoggedModel: models:/m-...
            return resolve_model(uri, version.source)
        return version.source, version.run_id  # registered before LoggedModels
    run_id, _, name = reference.removeprefix("runs:/").partition("/")
    name = name or MODEL_NAME
    newest = client.search_logged_models(
        [client.get_run(run_id).info.experiment_id], max_results=1,
        filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}])  # a resumed run logs again
    if newest:
        return _location(newest[0])
    return f"runs:/{run_id}/{name}", run_id  # logged before LoggedModels: the run's own artifacts


def _location(model: LoggedModel) -> tuple[str, str | None]:
    return model.artifact_location, model.source_run_id


def download_weights(uri: str, artifact_uri: str, dst: str | Path | None = None) -> Path:
    """model.pt under a logged model's storage location, downloaded (into `dst`, else MLflow's temporary
    directory). The one download of model weights: the CLI, the registry gate and Serve replicas."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=uri,
                                                     dst_path=None if dst is None else str(dst)))
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise FileNotFoundError(f"{artifact_uri} holds no model.pt artifact")
    return found[0]


def download_model_file(uri: str, reference: str) -> tuple[Path, str | None]:
    """model.pt of a logged sampler (any reference resolve_model reads) and its source run id."""
    artifact_uri, run_id = resolve_model(uri, reference)
    return download_weights(uri, artifact_uri), run_id
