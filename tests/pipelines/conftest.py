"""One real local Ray cluster for the whole session (dashboard on: STACK_NOTES), and a fresh
project home (MLflow SQLite store, checkpoints) per test."""

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLDD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def toy_config(**overrides):
    from fldd.config import FLDDConfig
    from pipelines.cli import CONFIG_DIR

    base = {"train.steps": 60, "train.log_every": 20, "train.checkpoint_every": 20, "data.num_train": 4000,
            "data.num_valid": 500, "reverse_network.width": 64, "forward_network.width": 64}
    return FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml").with_overrides({**base, **overrides})
