"""The sampler logged as an MLflow 3 LoggedModel: linked to its run, loadable with pyfunc, registrable,
and its model.pt found again from every reference form the CLI accepts. No Ray: a tiny model is
logged straight to a run in a fresh SQLite store."""

import os

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from fldd.model import FLDDModel
from pipelines.tracking import download_model_file, log_sampler_model, resolve_model, start_run
from pipelines.vocabulary import MODEL_ID_TAG
from tests.conftest import tiny_model


def log_tiny_model(tmp_path, run_name: str = "logged", seed: int = 0):
    model = tiny_model(seed=seed, double=False)
    path = tmp_path / f"seed{seed}" / "model.pt"  # the name download_model_file looks for
    path.parent.mkdir()
    model.save(path)
    tracker, _ = start_run(model.config, run_name, {})
    tracker.log_metrics(model.config.train.steps, {"final_valid_nelbo_bits": 1.5})
    tracker.log_metrics(1, {"loss": 3.0})
    return tracker, log_sampler_model(tracker, path, model.config), model


def test_logged_model_is_linked_to_its_run_and_loads(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray default store (./mlflow.db) would show up here
    before = mlflow.get_tracking_uri()
    tracker, model_uri, model = log_tiny_model(tmp_path)
    run_id = tracker.run_id
    assert model_uri == f"runs:/{run_id}/model"
    # no lasting global state, and the run's status is the caller's to set
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.active_run() is None
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None

    # model.pt through every reference form, with the process-wide tracking URI left at its default
    for reference in (model_uri, run_id, f"models:/{run.data.tags[MODEL_ID_TAG]}"):
        path, source = download_model_file(tracker.uri, reference)
        assert path.name == "model.pt" and source == run_id
        assert FLDDModel.load(path).config == model.config
    assert not (tmp_path / "mlflow.db").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)  # the fluent API, as a user would call it
    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert (logged.name, logged.source_run_id, logged.status) == ("model", run_id, LoggedModelStatus.READY)
    assert run.data.tags[MODEL_ID_TAG] == logged.model_id
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    # the final metrics (logged at step train.steps) are linked to the model; earlier ones are not
    assert {(m.key, m.value) for m in logged.metrics} == {("final_valid_nelbo_bits", 1.5)}
    assert logged.params["process.num_steps"] == "2"

    sampler = mlflow.pyfunc.load_model(model_uri)
    samples = sampler.predict(None, params={"num_samples": 5, "seed": 1})
    assert samples.shape == (5, 2) and samples.dtype == np.int64 and ((samples >= 0) & (samples < 3)).all()


def test_registered_version_resolves_to_the_logged_model(home, tmp_path, monkeypatch):
    tracker, model_uri, _ = log_tiny_model(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    version = mlflow.register_model(model_uri, "fldd-toy")
    MlflowClient(tracker.uri).set_registered_model_alias("fldd-toy", "champion", version.version)
    for reference in (f"models:/fldd-toy/{version.version}", "models:/fldd-toy@champion"):
        location, run_id = resolve_model(tracker.uri, reference)
        assert run_id == tracker.run_id and "/models/m-" in location
        path, _ = download_model_file(tracker.uri, reference)
        assert path.name == "model.pt"


def test_a_resumed_run_resolves_to_its_newest_model(home, tmp_path):
    tracker, model_uri, _ = log_tiny_model(tmp_path, seed=0)
    again, _, newer = log_tiny_model(tmp_path, seed=1)  # the same run name: a resume logs a second model
    assert again.run_id == tracker.run_id
    path, _ = download_model_file(tracker.uri, model_uri)
    weights = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], v) for k, v in newer.state_dict().items())
    assert tracker.client.get_run(tracker.run_id).data.tags[MODEL_ID_TAG] in resolve_model(tracker.uri, model_uri)[0]


def test_the_process_wide_tracking_uri_is_put_back_as_it_was_unset_included(monkeypatch):
    """Logging a model sets MLflow's process-wide URI for one block; afterwards a process that had
    none has none again (no MLFLOW_TRACKING_URI leaks to its subprocesses), one that had one keeps it."""
    import mlflow

    from pipelines.tracking import global_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    with global_tracking_uri("sqlite:////tmp/fldd-block.db"):
        assert mlflow.get_tracking_uri() == "sqlite:////tmp/fldd-block.db"
    assert not mlflow.tracking.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ
    # only the environment names a store: afterwards MLflow reads the environment again, a later change included
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/fldd-env.db")
    with global_tracking_uri("sqlite:////tmp/fldd-block.db"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow.get_tracking_uri() == "sqlite:////tmp/fldd-env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/fldd-env-2.db")
    assert mlflow.get_tracking_uri() == "sqlite:////tmp/fldd-env-2.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri("sqlite:////tmp/fldd-before.db")
    try:
        with global_tracking_uri("sqlite:////tmp/fldd-block.db"):
            pass
        assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/fldd-before.db"
    finally:
        mlflow.set_tracking_uri(None)
