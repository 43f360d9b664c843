"""Shared helpers: tiny enumerable models (D=2, K=3, T=2) where exact values are computable; one
real local Ray cluster for the whole session (dashboard on: STACK_NOTES), and a fresh project home
(MLflow SQLite store, checkpoints) per test."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from fldd.config import FLDDConfig
from fldd.model import FLDDModel

os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from pipelines.cluster import start_local_ray

    try:
        start_local_ray(num_cpus=2, log_to_driver=False)
    except Exception:  # a node that misses Ray's 30 s registration window on an overloaded box: once more
        ray.shutdown()
        start_local_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def module_project_home(tmp_path_factory, name: str):
    """A project home (SQLite store) shared by a module's tests, as `home` is for one test. The
    working directory moves next to it: anything reaching MLflow's process-wide default store would
    write ./mlflow.db there, where a test can look for it."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp(name) / "home"
        patch.setenv("FLDD_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.chdir(home.parent)
        yield home


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLDD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


ALL_METHODS = ("fldd", "fldd-mask", "masked", "uniform")
# every forward-process parameterization the library offers
RANDOM_FLDD = {"process.method": "fldd", "process.warm_start": "none", "process.prior": "uniform"}
PROCESS_VARIANTS = {
    "fldd-default": {"process.method": "fldd"},  # masked warm start
    "fldd-random": RANDOM_FLDD,
    "fldd-random-scaled": {**RANDOM_FLDD, "process.forward_init_scale": 30.0},
    "fldd-random-prior-mask": {**RANDOM_FLDD, "process.prior": "mask"},
    "fldd-random-floor": {**RANDOM_FLDD, "process.forward_floor": 0.01},
    "fldd-warm-uniform": {**RANDOM_FLDD, "process.warm_start": "uniform"},
    "fldd-mask": {"process.method": "fldd-mask"},
    "masked": {"process.method": "masked"},
    "masked-cosine": {"process.method": "masked", "process.schedule": "cosine"},
    "uniform": {"process.method": "uniform"},
    "masked-x0": {"process.method": "masked", "process.reverse_parameterization": "x0"},
    "uniform-x0": {"process.method": "uniform", "process.reverse_parameterization": "x0"},
    "masked-carry-over": {"process.method": "masked", "process.reverse_parameterization": "carry-over"},
    "fldd-mask-carry-over": {"process.method": "fldd-mask", "process.reverse_parameterization": "carry-over"},
}


def tiny_config(overrides: dict | None = None, *, T: int = 2, K: int = 3, D: int = 2, arch: str = "mlp",
                width: int = 16) -> FLDDConfig:
    base = {
        "process.num_steps": T,
        "reverse_network.arch": arch, "reverse_network.width": width, "reverse_network.depth": 2,
        "forward_network.arch": arch, "forward_network.width": width, "forward_network.depth": 2,
        "reverse_network.heads": 2, "forward_network.heads": 2,
        "train.batch_size": 8, "train.log_every": 1,
    }
    return FLDDConfig(seq_len=D, vocab_size=K).with_overrides({**base, **(overrides or {})})


def tiny_model(overrides: dict | None = None, *, seed: int = 0, double: bool = True, **kwargs) -> FLDDModel:
    torch.manual_seed(seed)
    model = FLDDModel(tiny_config(overrides, **kwargs))
    return model.double() if double else model


@pytest.fixture(params=sorted(PROCESS_VARIANTS))
def variant(request) -> dict:
    return PROCESS_VARIANTS[request.param]
