"""A tracking server that blinks (issue 28, item 2), for real: an `mlflow server` on loopback is
stopped in the middle of a training run and started again. A short outage is ridden out by MLflow's
own client retries, with every metric step recorded once; one longer than those retries stops the
run with a message naming the tracking URI, and the same command then resumes it."""

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import Tracker, TrackingUnavailable, retry_window_s
from pipelines.train import LaunchOptions, TrainingError, launch
from pipelines.vocabulary import RUN_NAME_TAG
from tests.pipelines.conftest import toy_config
from tests.servers import MlflowServer, free_port

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("tracking-server"))
    server.start()
    yield server
    server.stop()


def steps_logged(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def run_named(client: MlflowClient, name: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


def stop_once_logged(server: MlflowServer, name: str, step: int, down_for: float | None) -> tuple[threading.Thread, dict]:
    """Stop the server once run `name` has logged its training NELBO at `step`; start it again
    after `down_for` seconds (None: leave it down). Records when, and the last step logged before."""
    seen: dict = {}

    def watch() -> None:
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = run_named(client, name)
            if runs and (logged := steps_logged(client, runs[0].info.run_id, "nelbo")) and logged[-1] >= step:
                break
            time.sleep(0.2)
        else:
            return  # the run never got there: the test fails on what `seen` lacks
        seen["last_step_before"], seen["down_at"] = logged[-1], time.monotonic()
        server.stop()
        if down_for is not None:
            time.sleep(down_for)
            server.start()
            seen["up_at"] = time.monotonic()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


@pytest.mark.slow
def test_a_training_run_rides_out_a_20_second_tracking_outage(ray_cluster, home, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    cfg = toy_config(**{"train.steps": 300, "train.log_every": 10, "train.checkpoint_every": 100})
    watcher, seen = stop_once_logged(mlflow_server, "blink", step=50, down_for=20)
    outcome = launch(cfg, LaunchOptions(workers=0, name="blink", quiet=True))
    finished_at = time.monotonic()
    watcher.join(timeout=120)
    assert seen["last_step_before"] < 300 and seen["up_at"] < finished_at  # the outage fell inside training
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and outcome.start_step == 0
    assert steps_logged(client, outcome.run_id, "nelbo") == list(range(10, 301, 10))  # none lost, none twice
    assert steps_logged(client, outcome.run_id, "valid_nelbo_bits") == [100, 200, 300]
    assert "final_valid_nelbo_bits" in run.data.metrics
    # training waited for the server (no metric for 20 s or more), it did not drop what it could not log
    stamps = sorted(m.timestamp for m in client.get_metric_history(outcome.run_id, "nelbo"))
    assert max(later - earlier for earlier, later in zip(stamps, stamps[1:])) >= 20_000


@pytest.mark.slow
def test_an_outage_past_the_retries_stops_the_run_naming_the_uri_and_the_same_command_resumes(
        ray_cluster, home, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # retries over about 6 s (default: 244 s)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    cfg = toy_config(**{"train.steps": 400, "train.log_every": 10, "train.checkpoint_every": 100})
    watcher, seen = stop_once_logged(mlflow_server, "outage", step=150, down_for=None)
    with pytest.raises(TrainingError) as stopped:
        launch(cfg, LaunchOptions(workers=0, name="outage", quiet=True))
    waited = time.monotonic() - seen["down_at"]
    watcher.join(timeout=60)
    message = str(stopped.value)
    assert mlflow_server.uri in message and "MLFLOW_HTTP_REQUEST_MAX_RETRIES=3" in message
    assert "rerun the same command and it resumes" in message
    assert waited < 120  # the configured retries, not MLflow's default four minutes, set the wait

    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    (left,) = run_named(client, "outage")
    assert left.info.status == "RUNNING"  # nothing could be recorded while the server was down
    outcome = launch(cfg, LaunchOptions(workers=0, name="outage", quiet=True))
    assert outcome.resumed and outcome.run_id == left.info.run_id and outcome.start_step == 100
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    # the steps logged past the step-100 checkpoint before the outage are not logged twice
    assert steps_logged(client, outcome.run_id, "nelbo") == list(range(10, 401, 10))
    assert steps_logged(client, outcome.run_id, "valid_nelbo_bits") == [100, 200, 300, 400]


def test_an_unanswered_request_names_the_server_and_the_retry_bound(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    with pytest.raises(TrackingUnavailable, match=f"{uri} did not answer .*MLFLOW_HTTP_REQUEST_MAX_RETRIES=0"):
        Tracker(uri, "0" * 32).log_metrics(1, {"nelbo": 1.0})
    with pytest.raises(TrackingUnavailable, match=uri):
        Tracker(uri, "0" * 32).finish()


@pytest.mark.parametrize("retries, factor, seconds", [(7, 2, 244.0), (3, 1, 6.0), (0, 2, 0.0), (9, 2, 484.0)])
def test_the_retry_window_follows_mlflows_settings(monkeypatch, retries, factor, seconds):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(factor))
    assert retry_window_s() == seconds
