"""Sweeps on real Ray clusters with a real MLflow store: early stopping inside a budget, a failing
trial, parent/child runs and their artifacts, interrupt-and-resume, and a separate two-node
cluster reached with --address."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from fldd.config import CONFIG_DIR
from pipelines.tracking import ensure_experiment, tracking_uri
from tests.servers import MlflowServer, free_port
from tune.spec import SweepSpec
from pipelines.vocabulary import KIND_TAG, NUM_STEPS_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG
from tune.sweep import run_sweep

REPO = Path(__file__).resolve().parents[2]
FLDD = str(Path(sys.executable).parent / "fldd")
SMALL = {"train.steps": 100, "train.checkpoint_every": 20, "train.log_every": 20, "data.num_train": 4000,
         "data.num_valid": 500, "reverse_network.width": 64, "forward_network.width": 64}


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"base": "toy2d", "set": SMALL, **fields}))
    return path


def child_runs(client: MlflowClient, sweep: str) -> list:
    experiment = client.get_experiment_by_name("fldd")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KIND_TAG}` = 'trial'")


def test_sweep_stops_a_weak_trial_early_and_survives_a_failing_one(ray_cluster, home, tmp_path):
    # one trial at a time, so the order is fixed: a good trial sets the rungs, the weak one (lr 1e-6)
    # is stopped at its first rung, the next trial still starts and reports (no leaked placement
    # group), and lr 1e30 overflows to a non-finite loss at step 1: recorded as failed, the sweep goes on
    path = write_sweep(tmp_path / "sweep.yaml", budgets=[2],
                       space={"parameterization": "masked-x0", "train.lr": {"grid": [3e-3, 1e-6, 1e-3, 1e30]}},
                       scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 0.9, "max_concurrent_trials": 1})
    outcome = run_sweep(SweepSpec.from_yaml(path, CONFIG_DIR), name="early", progress=False)

    by_lr = {row.values["train.lr"]: row for row in outcome.rows}
    assert by_lr[3e-3].status == "finished" and by_lr[3e-3].steps_trained == 100
    assert by_lr[1e-6].status == "stopped" and by_lr[1e-6].steps_trained < 100
    assert by_lr[1e-3].steps_trained >= 20  # started after the stop, and trained (finished or stopped by ASHA)
    assert by_lr[1e30].status == "error" and "non-finite" in by_lr[1e30].error
    assert outcome.best[2].values["train.lr"] in (3e-3, 1e-3)

    client = MlflowClient(tracking_uri())
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags[KIND_TAG] == "sweep" and parent.info.status == "FINISHED"
    children = {run.data.tags[TRIAL_TAG]: run for run in child_runs(client, "early")}
    assert len(children) == 4 and all(run.data.tags[PARENT_TAG] == parent.info.run_id for run in children.values())
    statuses = {row.values["train.lr"]: children[row.trial_id].info.status for row in outcome.rows}
    expected_third = "FINISHED" if by_lr[1e-3].status == "finished" else "KILLED"
    assert statuses == {3e-3: "FINISHED", 1e-6: "KILLED", 1e-3: expected_third, 1e30: "FAILED"}
    finished = children[by_lr[3e-3].trial_id]
    assert finished.data.params["train.lr"] == "0.003" and finished.data.params["process.reverse_parameterization"] == "x0"
    # metrics over steps from the trial's Train worker, and its LoggedModel
    history = client.get_metric_history(finished.info.run_id, "valid_nelbo_bits")
    assert sorted(m.step for m in history) == [20, 40, 60, 80, 100]
    assert "fldd.model_id" in finished.data.tags

    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"trials.csv", "quality_vs_steps.png", "sweep.yaml", "base_config.yaml"} <= artifacts
    local = Path(client.download_artifacts(outcome.parent_run_id, "trials.csv", str(tmp_path)))
    rows = list(csv.DictReader(local.open()))
    assert sorted(r["status"] for r in rows) == sorted(row.status for row in outcome.rows)
    assert {r["run_id"] for r in rows} == {row.run_id for row in outcome.rows}
    assert float(parent.data.metrics["best_valid_nelbo_bits_T2"]) == pytest.approx(outcome.best[2].valid_nelbo_bits)


def wait_until(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(1)
    return condition()


def driver_processes_left(pid: int) -> list[str]:
    """Processes of the Ray cluster a driver (pid) started that are still alive: Ray names its
    session directory after the driver's pid (session_<date>_<pid>)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and f"_{pid}/" in cmdline and "session_" in cmdline:
            alive.append(f"{proc.name}: {cmdline[:120]}")
    return alive


def sweep_command(path: Path, *extra: str) -> list[str]:
    return [FLDD, "sweep", "--config", str(path), *extra]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(home, tmp_path):
    """Two trials at a time on SQLite, then Ctrl-C while a T=4 trial is training, then the same
    command, killed with SIGKILL (no clean-up at all) once that trial has moved on, then the same
    command again: finished trials keep their one MLflow run, the interrupted one continues in its
    own run from its checkpoint, no run is left RUNNING, no metric is lost, and each budget's Tune
    experiment holds only its trials."""
    path = write_sweep(tmp_path / "sweep.yaml", budgets=[2, 4],
                       set={**SMALL, "train.steps": 600, "train.checkpoint_every": 60},
                       space={"parameterization": "masked-x0", "train.lr": {"grid": [2e-3, 1e-3]}},
                       scheduler={"type": "fifo"},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 0.9, "max_concurrent_trials": 2})
    env = {**os.environ, "FLDD_HOME": str(home)}
    client = MlflowClient(tracking_uri())
    ensure_experiment(client, home)  # the store exists before the sweep starts: polling it races nothing
    first = subprocess.Popen(sweep_command(path, "--name", "resume"), cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, interrupted = time.time() + 400, None
    while time.time() < deadline and first.poll() is None and interrupted is None:
        time.sleep(1)
        runs = child_runs(client, "resume")
        done_t2 = [r for r in runs if r.data.tags[NUM_STEPS_TAG] == "2" and r.info.status == "FINISHED"]
        training_t4 = [r for r in runs if r.data.tags[NUM_STEPS_TAG] == "4" and r.info.status == "RUNNING"
                       and client.get_metric_history(r.info.run_id, "valid_nelbo_bits")]
        if len(done_t2) == 2 and training_t4:
            interrupted = training_t4[0]
    assert interrupted is not None, "no T=4 trial was caught training:\n" + (first.communicate()[0] or "")[-3000:]
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=180)[0]
    assert first.returncode == 130 and "rerun the same command" in output, output[-3000:]

    # kill -9 of the driver once the interrupted trial has logged a checkpoint past the interrupt
    def checkpoints(run_id: str) -> set[int]:
        return {m.step for m in client.get_metric_history(run_id, "valid_nelbo_bits")}

    at_interrupt = max(checkpoints(interrupted.info.run_id))
    killed = subprocess.Popen(sweep_command(path, "--name", "resume"), cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    moved_on = wait_until(lambda: killed.poll() is not None or max(checkpoints(interrupted.info.run_id)) > at_interrupt,
                          timeout=300)
    if killed.poll() is not None or not moved_on:
        killed.kill()
        pytest.fail(f"the rerun ended or made no progress: {(killed.communicate(timeout=60)[0] or '')[-3000:]}")
    killed.kill()
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    # no clean-up ran, yet the local cluster it started goes with it (Ray ties its processes to the driver)
    assert wait_until(lambda: not driver_processes_left(killed.pid), timeout=60), driver_processes_left(killed.pid)

    second = subprocess.run(sweep_command(path, "--name", "resume"), cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = child_runs(client, "resume")
    assert sorted(r.data.tags[NUM_STEPS_TAG] for r in runs) == ["2", "2", "4", "4"]  # one child run per trial
    assert all(r.info.status == "FINISHED" for r in runs)
    for before in done_t2:  # finished before the interrupt: not run again
        after = client.get_run(before.info.run_id)
        assert "fldd.resumed" not in after.data.tags and after.info.end_time == before.info.end_time
    resumed = client.get_run(interrupted.info.run_id)
    assert resumed.data.tags.get("fldd.resumed") == "true" and resumed.info.status == "FINISHED"
    for run in runs:  # parallel writers on SQLite lost nothing; the resumed run has every checkpoint
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "valid_nelbo_bits")}
        assert steps == set(range(60, 601, 60)), (run.info.run_name, sorted(steps))
    parents = client.search_runs([resumed.info.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for T in (2, 4):  # each budget is its own Tune experiment: ASHA never sees another budget's trials
        trials = tune.ExperimentAnalysis(str(home / "ray_results" / f"resume-T{T}")).trials
        budgets = {r.data.tags[NUM_STEPS_TAG] for r in runs if r.data.tags[TRIAL_TAG] in {t.trial_id for t in trials}}
        assert len(trials) == 2 and budgets == {str(T)}
    # a changed sweep under the same name is refused rather than resumed with the old space
    changed = subprocess.run(sweep_command(path, "--name", "resume", "--samples", "3"), cwd=REPO, env=env, text=True,
                             capture_output=True, timeout=300)
    assert changed.returncode == 1 and "different definition" in changed.stderr, changed.stderr[-2000:]


@pytest.fixture
def cpuless_head_cluster():
    """A head with no CPUs (`ray start --head --num-cpus=0`, the usual production setup); the test
    adds a worker node with one CPU, where a trial (0.01 + 0.9 CPU) must run."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                           "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    yield cluster
    cluster.shutdown()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server.uri
    server.stop()


@pytest.mark.cluster
@pytest.mark.slow
def test_a_node_lost_under_a_training_trial_resumes_it_on_the_other_node(cpuless_head_cluster, mlflow_server, tmp_path):
    """Issue 28, item 1: the raylet of the worker node that runs the trial is killed once the trial
    has checkpointed; the sweep finishes, the trial continues in its one MLflow run from its last
    checkpoint on the other node, and every metric step is in that run once."""
    cluster = cpuless_head_cluster
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    steps = {"train.steps": 400, "train.checkpoint_every": 50, "train.log_every": 10}
    path = write_sweep(tmp_path / "sweep.yaml", budgets=[2], set={**SMALL, **steps},
                       space={"parameterization": "masked-x0"}, resources={"workers_per_trial": 1, "cpus_per_worker": 0.9})
    env = {**os.environ, "FLDD_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": mlflow_server}
    sweep = subprocess.Popen(sweep_command(path, "--address", cluster.address, "--storage", str(tmp_path / "shared"),
                                           "--name", "lost"), cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = MlflowClient(mlflow_server)
    try:
        def checkpointed() -> bool:
            runs = child_runs(client, "lost") if client.get_experiment_by_name("fldd") else []
            return bool(runs) and any(m.step >= 100 for m in client.get_metric_history(runs[0].info.run_id,
                                                                                         "valid_nelbo_bits"))
        assert wait_until(checkpointed, 300), "the trial did not reach its step-100 checkpoint"
        (run,) = child_runs(client, "lost")
        assert run.info.status == "RUNNING"  # still training when its node goes
        (lost,) = [node for node in nodes if node.node_id == run.data.tags["ray_node_id"]]
        killed_at = time.time()
        lost.kill_raylet()  # its worker processes, the trial's among them, go with it
        output, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output[-4000:]
    (after,) = child_runs(client, "lost")  # one run for the trial, not a second one
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED", output[-4000:]
    assert after.data.tags["fldd.resumed"] == "true"
    (survivor,) = [node for node in nodes if node is not lost]
    assert after.data.tags["ray_node_id"] == survivor.node_id  # the retry ran on the node left
    history = lambda key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))  # noqa: E731
    assert history("valid_nelbo_bits") == list(range(50, 401, 50))  # none lost, none twice
    assert history("nelbo") == list(range(10, 401, 10))
    stamps = sorted(m.timestamp / 1000 - killed_at for m in client.get_metric_history(run.info.run_id, "nelbo"))
    pause = max(later - earlier for earlier, later in zip(stamps, stamps[1:]) if later > 0)
    print(f"node lost: training paused {pause:.1f} s (no metric logged) around the kill")


def test_sweep_on_a_separate_two_node_cluster(cpuless_head_cluster, mlflow_server, tmp_path, monkeypatch):
    path = write_sweep(tmp_path / "sweep.yaml", budgets=[2], space={"parameterization": "masked-x0"},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 0.9})
    # the cluster was started by this process with its auth settings; a client forcing
    # RAY_AUTH_MODE=token against it had every trial actor cancelled before it ran
    env = {**os.environ, "FLDD_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cluster = cpuless_head_cluster
    address = cluster.address
    # the head alone has no CPU for any trial: refused at once, saying so (a trial would wait forever)
    refused = subprocess.run(sweep_command(path, "--address", address), cwd=REPO, env=env, text=True,
                             capture_output=True, timeout=120)
    assert refused.returncode == 1 and "the cluster has 0 CPUs: add worker nodes" in refused.stderr, refused.stderr[-2000:]
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    # a local SQLite store cannot serve trials on another node: refused before any trial starts
    refused = subprocess.run(sweep_command(path, "--address", address), cwd=REPO, env=env, text=True,
                             capture_output=True, timeout=300)
    assert refused.returncode == 1 and "MLFLOW_TRACKING_URI" in refused.stderr, refused.stderr[-2000:]

    shared = tmp_path / "shared"  # both nodes run on this machine: a directory they both read
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    result = subprocess.run(sweep_command(path, "--address", address, "--storage", str(shared), "--name", "cluster"),
                            cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = child_runs(client, "cluster")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", result.stdout[-3000:] + result.stderr[-3000:]
    assert runs[0].data.tags["ray_node_id"] == worker.node_id  # on the node with the CPU, not the head
    assert (shared / "cluster-T2").is_dir()  # Tune's state on the shared storage
    assert runs[0].info.run_id in result.stdout
