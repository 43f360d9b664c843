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
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from fldd.config import FLDDConfig

EXPERIMENT = "fldd"
RUN_NAME_TAG = "fldd.run_name"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"
MODEL_PIP_REQUIREMENTS = ["torch==2.13.0", "numpy", "pyyaml", "pyarrow"]


def project_home() -> Path:
    return Path(os.environ.get("FLDD_HOME", ".fldd")).resolve()


def tracking_uri(home: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = (home or project_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"  # absolute path: sqlite:////abs/...


class Tracker:
    """Explicit MLflow client calls for one run (no global active run, safe inside Ray workers)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        now = int(1000 * time.time())
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()
                   if isinstance(value, (int, float, np.floating)) and np.isfinite(value)]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_json(self, name: str, payload: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2))
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
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
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(cfg: FLDDConfig, run_name: str, tags: dict[str, Any], home: Path | None = None) -> tuple[Tracker, bool]:
    """The MLflow run for `run_name`: the existing one (resume) or a new one. Returns (tracker, resumed)."""
    home = (home or project_home()).resolve()
    uri = tracking_uri(home)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, home)
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        tracker = Tracker(uri, run_id)
        # params are immutable in MLflow; the settings a resume may change go in as tags
        tracker.set_tags({**tags, "fldd.resumed": "true", "fldd.train_steps": cfg.train.steps})
        return tracker, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name,
                                                                    **{k: str(v) for k, v in tags.items()}})
    tracker = Tracker(uri, run.info.run_id)
    derived = {"train.forward_lr_at_T": cfg.forward_lr} if cfg.learns_forward else {}  # what the optimizer uses
    params = [Param(k, str(v)[:6000]) for k, v in {**cfg.to_flat_dict(), **derived}.items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    return tracker, False


def model_signature(seq_len: int, num_steps: int) -> ModelSignature:
    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype("int64"), (-1, seq_len), name="tokens")]),
        params=ParamSchema([ParamSpec("num_samples", "long", 16), ParamSpec("steps", "long", num_steps),
                            ParamSpec("seed", "long", 0)]),
    )


def log_sampler_model(tracker: Tracker, model_path: Path, cfg: FLDDConfig) -> str:
    """Log the sampler as an MLflow pyfunc model under the run's `model/` artifacts.

    Models-from-code: the code file, the `fldd` package and the weights + config (model.pt) are
    stored; nothing is pickled. Saved locally then uploaded through the client, so no global MLflow
    state (tracking URI, active run) is touched. Returns `runs:/<run_id>/model`.
    """
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the sampler takes no input data, only params: MLflow's input-example/type-hint advice does not apply
        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(local), python_model=str(MODEL_CODE), artifacts={"model": str(model_path)},
            code_paths=[str(PACKAGE_ROOT / "fldd")], signature=model_signature(cfg.seq_len, cfg.process.num_steps),
            pip_requirements=MODEL_PIP_REQUIREMENTS)
        tracker.client.log_artifacts(tracker.run_id, str(local), "model")
    return f"runs:/{tracker.run_id}/model"


def resolve_model(uri: str, reference: str) -> tuple[str, str]:
    """(artifact URI, source run id) for `models:/NAME@ALIAS`, `models:/NAME/VERSION`,
    `runs:/RUN_ID/PATH`, or a bare run id."""
    client = MlflowClient(uri)
    if reference.startswith("models:/"):
        name, _, rest = reference[len("models:/"):].partition("@")
        if rest:
            version = client.get_model_version_by_alias(name, rest)
        else:
            name, _, number = reference[len("models:/"):].partition("/")
            version = client.get_model_version(name, number)
        return version.source, version.run_id
    if reference.startswith("runs:/"):
        return reference, reference[len("runs:/"):].split("/")[0]
    return f"runs:/{reference}/model", reference


def download_model_file(uri: str, reference: str) -> tuple[Path, str]:
    """model.pt of a logged sampler and its source run id."""
    artifact_uri, run_id = resolve_model(uri, reference)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=uri))
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise FileNotFoundError(f"{reference} holds no model.pt artifact")
    return found[0], run_id
