"""Ray Train + MLflow on a real local cluster: distributed training, fault tolerance, resume,
the logged model, and input checks that fail before any worker starts."""

import dataclasses
import shutil
import subprocess
import threading
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import fldd.objective
import pipelines.worker
from fldd.config import ConfigError
from fldd.data import DataError, write_token_table
from fldd.model import CheckpointError
from pipelines.tracking import global_tracking_uri, tracking_uri
from pipelines.train import LaunchOptions, TrainingError, launch
from pipelines.vocabulary import RUN_NAME_TAG
from tests.pipelines.conftest import toy_config


def metric_history(run_id, key):
    client = MlflowClient(tracking_uri())
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def runs_named(name):
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("fldd")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


def test_two_workers_lower_validation_nelbo(ray_cluster, home):
    cfg = toy_config(**{"process.method": "masked", "train.steps": 150, "train.checkpoint_every": 50})
    outcome = launch(cfg, LaunchOptions(workers=2, name="two-workers", quiet=True))
    history = metric_history(outcome.run_id, "valid_nelbo_bits")
    assert [step for step, _ in history] == [50, 100, 150]
    assert history[-1][1] < history[0][1] - 0.05
    run = MlflowClient(tracking_uri()).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["workers"] == "2"
    assert run.data.params["process.method"] == "masked" and run.data.params["train.batch_size"] == "512"
    assert "process.warm_start_resolved" not in run.data.params  # a fixed forward has no start to resolve
    assert {"nelbo", "kl", "grad_norm", "final_valid_nelbo_bits", "final_kl"} <= set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient(tracking_uri()).list_artifacts(outcome.run_id)}
    assert {"config.yaml", "metrics.json", "samples.png", "forward_schedule.png"} <= artifacts


def test_killed_worker_restarts_from_checkpoint(ray_cluster, home):
    cfg = toy_config(**{"process.method": "masked", "train.steps": 90, "train.checkpoint_every": 30})
    outcome = launch(cfg, LaunchOptions(workers=2, name="fault", quiet=True, inject_failure_at_step=45,
                                        max_failures=2))
    assert outcome.start_step == 30  # the restarted group resumed from the step-30 checkpoint
    steps = [step for step, _ in metric_history(outcome.run_id, "valid_nelbo_bits")]
    assert steps == [30, 60, 90]
    assert len(runs_named("fault")) == 1
    state = torch.load(home / "runs" / "fault" / "model.pt", weights_only=True)
    assert state["config"]["train"]["steps"] == 90


def test_rerun_with_the_same_name_resumes(ray_cluster, home):
    first = launch(toy_config(**{"train.steps": 40}), LaunchOptions(workers=0, name="resume", quiet=True))
    second = launch(toy_config(**{"train.steps": 80}), LaunchOptions(workers=0, name="resume", quiet=True))
    assert not first.resumed and second.resumed
    params = MlflowClient(tracking_uri()).get_run(first.run_id).data.params
    assert float(params["train.forward_lr_at_T"]) == pytest.approx(toy_config().forward_lr)  # the rate in use
    # what each "auto" of the preset stood for at T=2, logged beside the word itself
    assert (params["process.warm_start"], params["process.warm_start_resolved"]) == ("auto", "none")
    assert float(params["train.forward_freeze_fraction_resolved"]) == 0.0
    assert second.run_id == first.run_id and second.start_step == 40
    assert [s for s, _ in metric_history(first.run_id, "valid_nelbo_bits")] == [20, 40, 60, 80]
    assert len(runs_named("resume")) == 1
    with pytest.raises(CheckpointError, match="process.num_steps: run has 2, now 4"):
        launch(toy_config(**{"process.num_steps": 4}), LaunchOptions(workers=0, name="resume", quiet=True))
    with pytest.raises(CheckpointError, match="train.lr: run has 0.001, now 0.0003"):
        launch(toy_config(**{"train.steps": 80, "train.lr": 3e-4}), LaunchOptions(workers=0, name="resume"))
    # rerunning a finished run is a no-op that keeps it FINISHED; "auto" spelled out is the same run
    third = launch(toy_config(**{"train.steps": 80, "process.warm_start": "none", "train.forward_freeze_fraction": 0.0}),
                   LaunchOptions(workers=0, name="resume", quiet=True))
    assert third.start_step == 80 and third.run_id == first.run_id
    assert MlflowClient(tracking_uri()).get_run(first.run_id).info.status == "FINISHED"

    # the logged MLflow model loads and samples
    with global_tracking_uri(tracking_uri()):  # put back after: later tests' fluent calls must not see this store
        sampler = mlflow.pyfunc.load_model(second.model_uri)
    samples = sampler.predict(None, params={"num_samples": 7, "seed": 3})
    assert samples.shape == (7, 2) and samples.dtype == np.int64 and (samples < 50).all() and (samples >= 0).all()
    assert np.array_equal(samples, sampler.predict(None, params={"num_samples": 7, "seed": 3}))
    with pytest.raises(Exception, match="T=2 grid"):
        sampler.predict(None, params={"num_samples": 2, "steps": 5})


SMALL = {"reverse_network.width": 16, "forward_network.width": 16, "train.batch_size": 64, "data.num_train": 1000,
         "data.num_valid": 200}


def test_resuming_with_more_steps_keeps_the_reverse_only_phase(ray_cluster, home):
    """A 20-step run with the forward frozen for half its steps, extended to 60: the forward trains
    from step 10 on, not from step 30 (half the new total)."""
    cfg = toy_config(**SMALL, **{"train.forward_freeze_fraction": 0.5, "train.log_every": 5,
                                 "train.checkpoint_every": 20})
    first = launch(cfg.with_overrides({"train.steps": 20}), LaunchOptions(workers=0, name="extend", quiet=True))
    second = launch(cfg.with_overrides({"train.steps": 60}), LaunchOptions(workers=0, name="extend", quiet=True))
    assert second.start_step == 20 and second.run_id == first.run_id
    trained = dict(metric_history(first.run_id, "forward_trained"))
    assert sorted(trained) == list(range(5, 61, 5))
    assert [step for step, value in sorted(trained.items()) if value == 0.0] == [5, 10]


def test_local_mode_selects_the_best_checkpoint_not_the_newest(ray_cluster, home, monkeypatch):
    real = pipelines.worker.evaluate_nelbo
    scripted = iter([3.0, 1.0, 2.0])  # validation NELBO at steps 20, 40, 60: step 40 is the best

    def evaluate(model, data, **kwargs):
        return dataclasses.replace(real(model, data, **kwargs), bits_per_token=next(scripted))

    monkeypatch.setattr(pipelines.worker, "evaluate_nelbo", evaluate)
    outcome = launch(toy_config(**SMALL, **{"process.method": "masked"}),
                     LaunchOptions(workers=0, name="best", quiet=True))
    checkpoints = home / "ray_results" / "best" / "local_checkpoints"

    def weights(path):
        return torch.load(path, weights_only=True)["state_dict"]

    selected = weights(outcome.model_path)
    for step, chosen in ((40, True), (60, False)):
        saved = weights(checkpoints / f"checkpoint_{step:08d}" / "model.pt")
        assert all(torch.equal(selected[k], saved[k]) for k in saved) == chosen, step


def test_init_from_a_baseline_scores_it_at_step_0_and_keeps_the_better_checkpoint(ray_cluster, home):
    from fldd.data import load_splits
    from fldd.model import FLDDModel
    from fldd.objective import evaluate_nelbo

    carry = {"process.reverse_parameterization": "carry-over"}
    baseline = launch(toy_config(**{"process.method": "masked", **carry}),
                      LaunchOptions(workers=0, name="baseline", quiet=True))
    cfg = toy_config(**{"process.method": "fldd-mask", **carry, "train.init_from": f"runs:/{baseline.run_id}/model",
                        "train.forward_freeze_fraction": 0.0})
    started = launch(cfg, LaunchOptions(workers=0, name="from-baseline", quiet=True))

    # step 0 is the baseline itself, scored with the checkpoints' protocol
    valid = load_splits(cfg)[1]
    source = FLDDModel.load(baseline.model_path)
    expected = evaluate_nelbo(source, valid[:2000], num_passes=2, generator=torch.Generator().manual_seed(0))
    history = dict(metric_history(started.run_id, "valid_nelbo_bits"))
    assert sorted(history) == [0, 20, 40, 60]
    assert history[0] == pytest.approx(expected.bits_per_token, abs=1e-9)
    # the chosen checkpoint is the best on validation, step 0 included
    state = torch.load(started.model_path, weights_only=True)["state_dict"]
    best = min(history, key=history.get)
    saved = torch.load(home / "ray_results" / "from-baseline" / "local_checkpoints" / f"checkpoint_{best:08d}" /
                       "model.pt", weights_only=True)["state_dict"]
    # (the final collapse check rewrites the information buffers: compare the weights)
    assert all(torch.equal(state[k], saved[k]) for k in saved if k not in ("information_bits", "collapsed"))
    params = MlflowClient(tracking_uri()).get_run(started.run_id).data.params
    assert params["train.init_from"] == f"runs:/{baseline.run_id}/model"

    # a source that cannot be this model's start is refused in the driver, naming the field
    with pytest.raises(ConfigError, match="process.reverse_parameterization"):
        launch(cfg.with_overrides({"process.reverse_parameterization": "direct"}),
               LaunchOptions(workers=0, name="mismatch", quiet=True))
    assert not runs_named("mismatch")


def test_bad_input_fails_in_the_driver(ray_cluster, home, tmp_path):
    bad = tmp_path / "bad.parquet"
    write_token_table(bad, np.array([[1, 2], [3, 60]]), vocab_size=50)
    with pytest.raises(DataError, match=r"bad.parquet: row 1, column 'tokens': token outside"):
        launch(toy_config(**{"data.path": str(bad)}), LaunchOptions(workers=2, name="bad-data"))
    with pytest.raises(ConfigError, match="train.batch_size=250"):
        launch(toy_config(**{"train.batch_size": 250}), LaunchOptions(workers=2, name="bad-batch"))
    # more workers than the cluster's CPUs: refused at once (Ray would wait for them for good)
    with pytest.raises(ConfigError, match=r"3 worker\(s\) x 1 CPU need 3 CPUs, the Ray cluster has 2"):
        launch(toy_config(**{"train.batch_size": 384}), LaunchOptions(workers=3, name="too-many-workers"))
    assert not (home / "mlflow.db").exists() or not (runs_named("bad-data") or runs_named("too-many-workers"))


def test_nan_loss_stops_the_run_and_marks_it_failed(ray_cluster, home, monkeypatch):
    real = fldd.objective.step_kl
    monkeypatch.setattr(fldd.objective, "step_kl", lambda q, log_p: real(q, log_p) * float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss at step 0: term\(s\) \['nelbo', 'kl'"):
        launch(toy_config(**{"process.method": "masked"}), LaunchOptions(workers=0, name="nan", quiet=True))
    (run,) = runs_named("nan")
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["fldd.error"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_worker_trains_with_bf16(ray_cluster, home):
    outcome = launch(toy_config(**{"process.method": "masked", "train.steps": 40}),
                     LaunchOptions(workers=1, gpu=True, name="gpu", quiet=True))
    assert np.isfinite(outcome.metrics["valid_nelbo_bits"])


def test_resume_skips_a_checkpoint_half_written_and_names_a_truncated_one(ray_cluster, home):
    """Checkpoints are written to DIR.partial and renamed when complete: a crash mid-write leaves a
    .partial directory that resume never reads. A complete checkpoint truncated afterwards (a bad
    disk) is refused with its path, not loaded and not a deep pickle error."""
    cfg = toy_config(**SMALL, **{"process.method": "masked", "train.checkpoint_every": 20})
    launch(cfg.with_overrides({"train.steps": 40}), LaunchOptions(workers=0, name="torn", quiet=True))
    checkpoints = home / "ray_results" / "torn" / "local_checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_00000020", "checkpoint_00000040"]
    half_written = checkpoints / "checkpoint_00000099.partial"  # a crash while step 99 was being written
    shutil.copytree(checkpoints / "checkpoint_00000040", half_written)
    (half_written / "state.pt").write_bytes((half_written / "state.pt").read_bytes()[:100])
    resumed = launch(cfg.with_overrides({"train.steps": 60}), LaunchOptions(workers=0, name="torn", quiet=True))
    assert resumed.start_step == 40  # not 99, and no error from the torn file
    newest = checkpoints / "checkpoint_00000060" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(TrainingError, match=f"checkpoint file {newest} cannot be read"):
        launch(cfg.with_overrides({"train.steps": 80}), LaunchOptions(workers=0, name="torn", quiet=True))


def test_storage_that_turns_read_only_mid_run_stops_naming_the_path_and_the_rerun_resumes(ray_cluster, home, tmp_path):
    """Issue 28, item 6: the checkpoint storage is a real file system (a tmpfs) remounted read-only
    after the step-100 checkpoint; root ignores file modes, so chmod would not do."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "fldd-test", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs to mount a tmpfs (root, or CAP_SYS_ADMIN)")
    try:
        checkpoints = disk / "ro" / "local_checkpoints"

        def remount_after_step_100() -> None:
            deadline = time.monotonic() + 120
            while not (checkpoints / "checkpoint_00000100").is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

        cfg = toy_config(**{"process.method": "masked", "train.steps": 300, "train.checkpoint_every": 50,
                            "train.log_every": 10})
        remount = threading.Thread(target=remount_after_step_100)
        remount.start()
        with pytest.raises(TrainingError, match="cannot write checkpoint .*/ro/local_checkpoints/checkpoint_.*"
                                                "Read-only file system.*rerun the same command to resume"):
            launch(cfg, LaunchOptions(workers=0, name="ro", storage=str(disk), quiet=True))
        remount.join()
        (failed,) = runs_named("ro")
        assert failed.info.status == "FAILED" and "Read-only file system" in failed.data.tags["fldd.error"]
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        outcome = launch(cfg, LaunchOptions(workers=0, name="ro", storage=str(disk), quiet=True))
        assert outcome.resumed and outcome.run_id == failed.info.run_id and outcome.start_step == 100
        assert [s for s, _ in metric_history(outcome.run_id, "valid_nelbo_bits")] == list(range(50, 301, 50))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
