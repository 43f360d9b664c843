"""Your own cluster: `fldd train --address` and `ray job submit` against a separate Ray cluster started
with `ray start --head` (token auth on, as Ray 2.59 and 2.60 do when ~/.ray/auth_token exists), the fast
failure of a client that cannot join it, and the resume-config check on file:// storage.

The cluster tests are real-cluster tests (`real_cluster`, below): a second Ray cluster beside the
session's, its own ports and temp dir, stopped by its own process group at the end (`ray stop` has
no per-cluster option in Ray 2.59 or 2.60: it would stop every cluster on the machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from fldd.model import CheckpointError
from pipelines.cluster import ClusterConnectionError, _local_token_headers, _probe
from pipelines.run_storage import RUN_CONFIG_FILE, check_resume_config
from pipelines.vocabulary import RUN_NAME_TAG
from tests.pipelines.conftest import toy_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray and fldd
# a real second Ray cluster (ray start --head) and fldd / ray job subprocesses against it
real_cluster = pytest.mark.cluster
TRAIN_ARGS = ["--workers", "1", "--config", "toy2d", "--train-steps", "30", "--set", "train.log_every=10",
              "--set", "train.eval_every=30", "--set", "train.checkpoint_every=30"]
# the auth settings a client brings itself (the session's own ray.init sets RAY_AUTH_MODE=token here)
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray cluster address or auth mode of the test session."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_GCS_SERVER_PORT", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def local_token_header(generate: bool = False) -> dict[str, str]:
    """The authorization header for this machine's token as Ray itself reads it (`ray get-auth-token`,
    which makes ~/.ray/auth_token first with `generate`, as any local ray.init() does): {} without one."""
    result = subprocess.run([str(BIN / "ray"), "get-auth-token", *(["--generate"] if generate else [])],
                            capture_output=True, text=True, env=clean_env())
    return {"authorization": f"Bearer {result.stdout}"} if result.returncode == 0 and result.stdout else {}


class TokenCluster:
    def __init__(self, gcs_port: int, dashboard_port: int, token_header: dict[str, str]):
        self.gcs_port, self.dashboard_port = gcs_port, dashboard_port
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.token_header = token_header

    def jobs(self) -> list[dict]:
        """The cluster's own record of its jobs (drivers that joined it and submitted jobs)."""
        response = requests.get(f"{self.dashboard}/api/jobs/", headers=self.token_header, timeout=30)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def token_cluster():
    """`ray start --head --block` on free ports (GCS, dashboard, dashboard agent, Ray Client server),
    2 CPUs, token auth as a user's head gets it (RAY_AUTH_MODE unset, ~/.ray/auth_token present)."""
    token_header = local_token_header(generate=True)
    assert token_header, "ray get-auth-token --generate printed no token"
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="fldd-rc-", dir="/tmp")  # short: Ray's socket paths live under it
    log_path = Path(temp_dir) / "head.log"
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(log_path, "w") as log:
        # no 30 s drain on SIGTERM (a node that ran jobs waits it out): the cluster is thrown away
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=clean_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"),
                                start_new_session=True)  # its own process group: stopped as one below
    cluster = TokenCluster(gcs, dashboard, token_header)
    try:
        deadline = time.time() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited {head.returncode}:\n{log_path.read_text()[-3000:]}")
            if "Ray runtime started" in log_path.read_text():
                try:
                    if requests.get(f"{cluster.dashboard}/api/version", headers=token_header,
                                    timeout=5).ok:
                        break
                except requests.RequestException:
                    pass
            if time.time() > deadline:
                pytest.fail(f"the cluster did not come up in 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        # the situation under test: the head runs with token authentication
        assert _probe(cluster.address, None, 5.0)[0] == "UNAUTHENTICATED"
        yield cluster
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever is left of this cluster's process group
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def finished_run(home: Path, name: str):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fldd")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    return runs[0]


def checkpoints(home: Path, name: str) -> list[Path]:
    return [p for p in (home / "ray_results" / name).glob("checkpoint_*") if (p / "model.pt").is_file()]


@real_cluster
def test_train_joins_a_token_auth_cluster_by_address(token_cluster, tmp_path):
    home = tmp_path / "home"
    # no RAY_AUTH_MODE in the client's environment: fldd turns it on, the token is on this machine
    result = subprocess.run([str(BIN / "fldd"), "train", "--address", token_cluster.address, *TRAIN_ARGS,
                             "--name", "by-address"], cwd=tmp_path, env=clean_env(FLDD_HOME=str(home)),
                            text=True, capture_output=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = finished_run(home, "by-address")
    assert run.data.tags["workers"] == "1"
    assert run.data.tags["ray_gcs_address"].endswith(f":{token_cluster.gcs_port}")
    assert checkpoints(home, "by-address")
    # the cluster itself recorded the driver that trained it
    drivers = [job for job in token_cluster.jobs()
               if job["type"] == "DRIVER" and "by-address" in (job.get("entrypoint") or "")]
    assert len(drivers) == 1 and drivers[0]["status"] == "SUCCEEDED", token_cluster.jobs()


@real_cluster
def test_ray_job_submit_with_the_working_dir(token_cluster, tmp_path):
    home = tmp_path / "home"  # absolute: the job runs in an unpacked copy of the working dir
    runtime_env = {"excludes": [".git", ".venv", ".fldd"], "env_vars": {"FLDD_HOME": str(home)}}
    # the job CLI talks to the dashboard, which needs the token as well: RAY_AUTH_MODE=token
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", token_cluster.dashboard, "--submission-id", "fldd-job-run",
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
         "fldd", "train", *TRAIN_ARGS, "--name", "job-run"],
        cwd=tmp_path, env=clean_env(RAY_AUTH_MODE="token"), text=True, capture_output=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job = next(job for job in token_cluster.jobs() if job.get("submission_id") == "fldd-job-run")
    assert job["status"] == "SUCCEEDED" and job["type"] == "SUBMISSION"
    assert job["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")  # the job ran the uploaded copy
    run = finished_run(home, "job-run")
    assert run.data.tags["ray_gcs_address"].endswith(f":{token_cluster.gcs_port}")
    assert checkpoints(home, "job-run")


@real_cluster
@pytest.mark.parametrize("case", ["no-token", "wrong-token", "nothing-listening"])
def test_a_client_that_cannot_join_fails_at_once_saying_why(token_cluster, tmp_path, case):
    env = clean_env(FLDD_HOME=str(tmp_path / "home"))
    for name in AUTH_VARS:
        env.pop(name, None)
    address = token_cluster.address
    if case == "no-token":
        env["HOME"] = str(tmp_path / "elsewhere")  # a machine without ~/.ray/auth_token
        expected = ["requires token authentication and this machine has no token", "~/.ray/auth_token",
                    "RAY_AUTH_TOKEN", "RAY_AUTH_MODE=token"]
    elif case == "wrong-token":
        env["RAY_AUTH_TOKEN"] = "0123456789abcdef" * 2
        expected = ["refused this machine's auth token (from RAY_AUTH_TOKEN)", "RAY_AUTH_MODE=token"]
    else:
        address = f"127.0.0.1:{free_ports(1)[0]}"
        expected = [f"no Ray cluster answers at {address}", "ray start --head"]
    # before: ~20 s of InvalidAuthToken retries, then a bare ConnectionError (minutes for a dead port)
    result = subprocess.run([str(BIN / "fldd"), "train", "--address", address, *TRAIN_ARGS], cwd=tmp_path,
                            env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.startswith("fldd train: error: ")
    for text in expected:
        assert text in result.stderr
    assert "InvalidAuthToken" not in result.stderr and "Traceback" not in result.stderr


# --- this machine's token, read as Ray reads it (`ray get-auth-token` is Ray's own reader) ---

@pytest.mark.parametrize("case", ["env", "env-whitespace-only", "token-path", "home-file"])
def test_the_local_token_is_the_one_ray_reads(tmp_path, monkeypatch, case):
    for name in AUTH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_bytes(b" \t home-token \v\r\nsecond line\n")
    if case == "env":
        monkeypatch.setenv("RAY_AUTH_TOKEN", " \t env token\n")
    elif case == "env-whitespace-only":  # a set RAY_AUTH_TOKEN wins: no token at all, not the file's
        monkeypatch.setenv("RAY_AUTH_TOKEN", " \n ")
    elif case == "token-path":
        (tmp_path / "token").write_bytes(b"\fpath-token\r\n")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    expected = {"env": "env token", "env-whitespace-only": None, "token-path": "path-token",
                "home-file": "home-token"}[case]
    assert _local_token_headers() == ({"authorization": f"Bearer {expected}"} if expected else {})
    assert _local_token_headers() == local_token_header()


def test_a_token_path_that_cannot_be_read_is_an_error_naming_it(tmp_path, monkeypatch):
    for name in AUTH_VARS:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "blank").write_text(" \n")
    for path in (tmp_path / "missing", tmp_path / "blank"):  # Ray refuses both (it does not fall back)
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
        with pytest.raises(ClusterConnectionError, match=re.escape(f"RAY_AUTH_TOKEN_PATH is set but file cannot be opened "
                                                         f"or is empty: {path}; put the cluster's token")):
            _local_token_headers()


# --- the resume-config check on storage given as a URI (file:// goes through pyarrow's file
# system like s3:// and gs://) ---

def test_resume_config_on_uri_storage_refuses_other_settings(tmp_path):
    storage = (tmp_path / "bucket").as_uri()  # file:///...
    check_resume_config(toy_config(), storage, "remote-run")
    assert (tmp_path / "bucket" / "remote-run" / RUN_CONFIG_FILE).is_file()  # written through the URI
    with pytest.raises(CheckpointError, match=r"run 'remote-run' exists in file://.* with different settings: "
                                              r"train\.lr: run has 0\.001, now 0\.0003"):
        check_resume_config(toy_config(**{"train.lr": 3e-4}), storage, "remote-run")
    with pytest.raises(CheckpointError, match=r"process\.num_steps: run has 2, now 4"):
        check_resume_config(toy_config(**{"process.num_steps": 4}), storage, "remote-run")
    check_resume_config(toy_config(**{"train.lr": 3e-4}), storage, "another-run")  # a new name is a new run


def test_resume_config_on_uri_storage_accepts_resumable_changes(tmp_path):
    storage = (tmp_path / "bucket").as_uri()
    check_resume_config(toy_config(), storage, "extend")
    longer = toy_config(**{"train.steps": 120, "train.log_every": 40, "train.checkpoint_every": 40})
    check_resume_config(longer, storage, "extend")
    saved = (tmp_path / "bucket" / "extend" / RUN_CONFIG_FILE).read_text()
    assert "steps: 120" in saved  # the saved config follows the run
    with pytest.raises(CheckpointError, match="train.lr"):  # still checked against the updated file
        check_resume_config(toy_config(**{"train.steps": 120, "train.lr": 3e-4}), storage, "extend")
