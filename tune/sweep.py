"""Run a sweep: one Ray Tune experiment per step budget T (so ASHA only ever compares trials of the
same budget), every trial the project's one training path (`pipelines.train.launch`) with
`TuneReportCallback` in its Ray Train run callbacks, an MLflow parent run per sweep and a child run
per trial. Rerunning the same sweep name resumes it with `Tuner.restore`.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from fldd.config import ConfigError
from fldd.data import resolve_data_shape
from pipelines.cluster import init_ray
from pipelines.tracking import Tracker, ensure_experiment, find_or_create_run, git_commit, project_home, tracking_uri
from pipelines.train import LaunchOptions, TrainingError, launch
from pipelines.vocabulary import (BUDGETS_TAG, COLLAPSED_TAG, DIGEST_TAG, EARLY_STOPPED_TAG, ERROR_TAG,
                                  EXPERIMENT, FINAL_TRAIN_SECONDS_METRIC, FINAL_VALID_NELBO_METRIC,
                                  FINAL_VALID_STDERR_METRIC, GIT_COMMIT_TAG, KIND_SWEEP, KIND_TAG, KIND_TRIAL,
                                  PARENT_TAG, RAY_NODE_TAG, RAY_VERSION_TAG, STORAGE_TAG, SWEEP_RUN_NAME, SWEEP_TAG,
                                  TRIAL_RUN_NAME, TRIAL_TAG, VALID_NELBO_METRIC)
from tune.results import SweepOutcome, TrialRow, best_per_budget, log_results
from tune.spec import PARAMETERIZATION_KEY, SweepSpec

log = logging.getLogger(__name__)

TRIAL_DRIVER_CPUS = 0.01  # the trial's own process only waits on its Train workers (STACK_NOTES)
# A trial whose process died (its node was lost) is started again, and continues its own run from its
# last checkpoint (the run name is the trial's). A trial that failed for its own reasons (a non-finite
# loss) fails again from that checkpoint and is recorded failed: one retry bounds what that costs.
TRIAL_RETRIES = 1


class SweepError(RuntimeError):
    """The sweep cannot start or could not finish (not: a trial failed; that is recorded)."""


class SweepInterrupted(SweepError):
    """Ctrl-C or a stop signal: Tune saved its state; the same command resumes."""


# ---------------------------------------------------------------------------------------------
# One trial: the ordinary training launch, reporting to Tune
# ---------------------------------------------------------------------------------------------

def run_trial(values: dict[str, Any], *, spec: SweepSpec, budget: int, sweep: str, parent_run_id: str,
              storage: str, home: str, mlflow_uri: str) -> None:
    # the trial runs in a Ray worker whose CWD is Ray's session directory: absolute home and store
    os.environ["FLDD_HOME"], os.environ["MLFLOW_TRACKING_URI"] = home, mlflow_uri
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = spec.trial_config(values, budget)
    trial_id = tune.get_context().get_trial_id()
    r = spec.resources
    launch(cfg, LaunchOptions(
        workers=r.workers_per_trial, gpu=r.gpus_per_worker > 0, cpus_per_worker=r.cpus_per_worker,
        storage=storage, name=trial_run_name(sweep, budget, trial_id), quiet=True, max_failures=1,
        callbacks=[TuneReportCallback()],
        tags={PARENT_TAG: parent_run_id, SWEEP_TAG: sweep, KIND_TAG: KIND_TRIAL,
              TRIAL_TAG: trial_id, RAY_NODE_TAG: ray.get_runtime_context().get_node_id()}))


def trial_run_name(sweep: str, budget: int, trial_id: str) -> str:
    """One name per trial, stable across restores: its Ray Train run and its MLflow child run."""
    return TRIAL_RUN_NAME.format(sweep=sweep, T=budget, trial_id=trial_id)


# ---------------------------------------------------------------------------------------------
# Progress: a bar per budget, with running / done / stopped / failed and the best so far
# ---------------------------------------------------------------------------------------------

class SweepProgress(tune.Callback):
    def __init__(self, budget: int, total: int, steps: int, enabled: bool = True):
        self.budget, self.total, self.steps, self.enabled = budget, total, steps, enabled
        self._bar = None
        self._best = math.inf
        self._drawn = 0.0

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment; a bar does not pickle
        return {**self.__dict__, "_bar": None}

    def setup(self, **info) -> None:
        if self.enabled:
            # in training steps over all trials, so the rate and the time left mean something; a
            # trial that ends (finished, stopped early, failed) counts as all its steps
            self._bar = tqdm(total=self.total * self.steps, desc=f"T={self.budget}, {self.total} trials",
                             unit="step", unit_scale=True, mininterval=2.0, dynamic_ncols=True)

    def _refresh(self, trials: list) -> None:
        if self._bar is None:
            return
        counts = {"running": 0, "done": 0, "stopped": 0, "failed": 0}
        for trial in trials:
            if trial.status == "RUNNING":
                counts["running"] += 1
            elif trial.status == "ERROR":
                counts["failed"] += 1
            elif trial.status == "TERMINATED":
                stopped = int((trial.last_result or {}).get("step", self.steps)) < self.steps
                counts["stopped" if stopped else "done"] += 1
        steps = sum(self.steps if trial.status in ("TERMINATED", "ERROR")
                    else min(self.steps, int((trial.last_result or {}).get("step", 0))) for trial in trials)
        # one trial's best checkpoint so far; the final choice ranks configs by their final validation
        # NELBO (all rows x 10 passes), averaged over a config's trials, so it can differ from this
        best = f", best checkpoint (any trial) {self._best:.4f}" if math.isfinite(self._best) else ""
        self._bar.set_postfix_str(", ".join(f"{v} {k}" for k, v in counts.items() if v) + best, refresh=False)
        self._bar.update(max(0, steps - self._bar.n))  # redraws at most every mininterval

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._refresh(trials)

    def on_step_end(self, iteration, trials, **info) -> None:
        # trials report only at checkpoints: redraw between them so the elapsed time keeps moving
        if self._bar is not None and time.monotonic() - self._drawn > 5.0:
            self._bar.refresh()
            self._drawn = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(VALID_NELBO_METRIC)
        if value is not None and math.isfinite(value):
            self._best = min(self._best, value)
        self._refresh(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._refresh(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._refresh(trials)

    def on_experiment_end(self, trials, **info) -> None:
        self._refresh(trials)
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def sweep_storage(storage: str | None, home: Path) -> str:
    if storage and "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage or home / "ray_results").resolve())


def check_cluster(storage: str, mlflow_uri: str, workers: int, cpus: float, gpus: float, remote: bool = False) -> None:
    """On a multi-node cluster every node must read the storage and reach the MLflow store: say so
    before any trial starts, rather than lose checkpoints or metrics on another node."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total_cpus = ray.cluster_resources().get("CPU", 0.0)
    if TRIAL_DRIVER_CPUS + workers * cpus > total_cpus + 1e-9:  # no trial would ever start: say so now
        what_to_do = ("add worker nodes with CPUs (`ray start --address HEAD:PORT` on each; a head started with "
                      "--num-cpus=0 runs no trial)" if total_cpus == 0 else
                      "lower resources.cpus_per_worker or workers_per_trial, or add nodes")
        raise SweepError(f"one trial needs {workers} worker(s) x {cpus} CPU + {TRIAL_DRIVER_CPUS} CPU, the cluster "
                         f"has {total_cpus:g} CPUs: {what_to_do}")
    if gpus and ray.cluster_resources().get("GPU", 0.0) < workers * gpus:
        raise SweepError(f"one trial needs {workers * gpus:g} GPUs, the cluster has "
                         f"{ray.cluster_resources().get('GPU', 0.0):g}")
    if len(nodes) < 2 and not remote:
        return  # the driver's own machine: its disk and its MLflow store are every node's
    where = "through Ray Client" if remote else f"on {len(nodes)} nodes"
    if mlflow_uri.startswith("sqlite:") or mlflow_uri.startswith("file:"):
        raise SweepError(f"trials run {where} but MLflow tracks to a store on this machine ({mlflow_uri}): "
                         "start a tracking server (mlflow server ...) and set MLFLOW_TRACKING_URI to it")
    if "://" in storage:
        return  # s3:// or another remote file system: shared by construction
    marker = Path(storage) / f".fldd-shared-check-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("shared?")
    try:
        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return os.path.exists(path)

        blind = [n["NodeManagerAddress"] for n in nodes
                 if not ray.get(sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                     n["NodeID"], soft=False)).remote(str(marker)))]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise SweepError(f"--storage {storage} is not shared: node(s) {', '.join(blind)} cannot read it. Give a "
                         "directory every node mounts (NFS) or an s3:// URI")


def _scheduler(spec: SweepSpec):
    steps, every = spec.base.train.steps, spec.base.train.checkpoint_every
    grace = every * int(spec.scheduler.get("grace_period", max(1, spec.reports_per_trial // 4)))
    # ASHA's rungs are grace * rf^k up to max_t, max_t included. With max_t = the last report
    # before the end, every rung is judged before a trial's final report: a trial that reaches its
    # end is never stopped there (that would skip its final evaluation and logged model), and
    # stop_last_trials=False lets it run past max_t to its own end.
    last_decision = steps - every if steps % every == 0 else steps - steps % every
    if spec.scheduler.get("type", "asha") == "fifo" or last_decision < grace:
        return FIFOScheduler()  # no rung before the last report: nothing to stop early
    # time in optimizer steps (each report carries its step), not reports: a trial resumed from a
    # checkpoint restarts Tune's iteration count but not its step, and must be judged at its step
    return ASHAScheduler(time_attr="step", max_t=last_decision, stop_last_trials=False, grace_period=grace,
                         reduction_factor=float(spec.scheduler.get("reduction_factor", 2)))


def max_concurrent(spec: SweepSpec) -> int:
    r = spec.resources
    if r.max_concurrent_trials:
        return r.max_concurrent_trials
    # Tune does not count Ray Train workers: cap trials so their workers fit the cluster (STACK_NOTES)
    per_trial = TRIAL_DRIVER_CPUS + r.workers_per_trial * r.cpus_per_worker
    fit = int(ray.cluster_resources().get("CPU", 1.0) // per_trial)
    if r.gpus_per_worker:
        fit = min(fit, int(ray.cluster_resources().get("GPU", 0.0) // (r.workers_per_trial * r.gpus_per_worker)))
    return max(1, fit)


def start_parent_run(spec: SweepSpec, name: str, storage: str, home: Path) -> Tracker:
    """The sweep's MLflow parent run: found again by name when the sweep resumes."""
    uri = tracking_uri(home)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, home)
    tags = {SWEEP_TAG: name, KIND_TAG: KIND_SWEEP, GIT_COMMIT_TAG: git_commit(), RAY_VERSION_TAG: ray.__version__,
            STORAGE_TAG: storage, BUDGETS_TAG: ",".join(map(str, spec.budgets))}
    digest = spec.digest()
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and "
                                  f"tags.`{KIND_TAG}` = '{KIND_SWEEP}'", max_results=1)
    if existing:  # a rerun resumes the same sweep only: Tune would keep the old space and samples
        old = existing[0].data.tags
        if old.get(STORAGE_TAG) != storage:
            raise SweepError(f"sweep {name!r} keeps its state in {old.get(STORAGE_TAG)}, not {storage}: pass "
                             f"--storage {old.get(STORAGE_TAG)} to resume it, or use another --name")
        if old.get(DIGEST_TAG) != digest:
            raise SweepError(f"sweep {name!r} exists with a different definition (its sweep file, base config or "
                             "--samples changed since it started): use another --name for a new sweep")
    run_id, resumed = find_or_create_run(client, experiment_id, SWEEP_RUN_NAME.format(sweep=name),
                                         {**tags, DIGEST_TAG: digest})
    tracker = Tracker(uri, run_id)
    if not resumed:
        params = {"sweep.samples": spec.samples, "sweep.metric": spec.metric, "sweep.budgets": spec.budgets,
                  "sweep.scheduler": spec.scheduler, "sweep.resources": vars(spec.resources),
                  **{f"space.{k}": v for k, v in spec.space.items()}}
        tracker.log_params(params)
        tracker.log_text("sweep.yaml", spec.source or "")
        tracker.log_text("base_config.yaml", spec.base.to_yaml())
    return tracker


def run_sweep(spec: SweepSpec, *, name: str | None = None, address: str | None = None, storage: str | None = None,
              samples: int | None = None, progress: bool = True, verbose: bool = False) -> SweepOutcome:
    """Run (or resume) every budget's Tune experiment; return per-trial rows and the best per T."""
    name = name or spec.name
    if not name or "/" in name:
        raise ConfigError(f"--name {name!r}: must be a non-empty name without '/'")
    if samples is not None:
        if samples < 1:
            raise ConfigError(f"--samples {samples}: must be >= 1")
        spec.samples = samples
    # the data describes itself (each trial resolves seq_len and vocab_size); bad data fails here,
    # before any trial starts
    resolve_data_shape(spec.base)
    home = project_home()
    storage = sweep_storage(storage, home)
    mlflow_uri = tracking_uri(home)
    MlflowClient(mlflow_uri)  # the store and experiment exist before any trial writes (SQLite races)
    ensure_experiment(MlflowClient(mlflow_uri), home)
    # the bars below are the sweep's progress; Tune's own tables and the trials' worker logs are
    # noise here (a failed trial's error is in the final table and in Tune's error.txt)
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init_ray(address, log_to_driver=verbose)
    r = spec.resources
    check_cluster(storage, mlflow_uri, r.workers_per_trial, r.cpus_per_worker, r.gpus_per_worker,
                  remote=str(address or os.environ.get("RAY_ADDRESS", "")).startswith("ray://"))
    parent = start_parent_run(spec, name, storage, home)
    if spec.samples > 1 and all(e["domain"] in ("grid", "value") for e in spec.space.values()):
        log.warning("samples=%d but the space has no random key: the %d draws of each grid point are identical "
                    "trials (same config, same seed); vary train.seed to measure noise", spec.samples, spec.samples)
    if progress:
        print(f"sweep {name!r}: budgets T={spec.budgets}, {spec.trials_per_budget()} trials per budget, "
              f"{max_concurrent(spec)} at a time; MLflow parent run {parent.run_id} ({mlflow_uri})", flush=True)

    start = time.perf_counter()
    trials_by_budget: dict[int, list] = {}
    try:
        for budget in spec.budgets:
            trials_by_budget[budget] = _run_budget(spec, name, budget, storage, home, mlflow_uri, parent, progress,
                                                   verbose)
        rows = collect_rows(spec, name, trials_by_budget, mlflow_uri)
        outcome = SweepOutcome(name, parent.run_id, rows, best_per_budget(rows), time.perf_counter() - start)
        log_results(outcome, parent, home)
    except BaseException as error:  # the parent run never stays RUNNING; a rerun sets it RUNNING again
        parent.finish("KILLED" if isinstance(error, (SweepInterrupted, KeyboardInterrupt)) else "FAILED")
        raise
    parent.finish("FINISHED")
    return outcome


def _run_budget(spec: SweepSpec, name: str, budget: int, storage: str, home: Path, mlflow_uri: str,
                parent: Tracker, progress: bool, verbose: bool = False) -> list:
    experiment = f"{name}-T{budget}"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, budget=budget, sweep=name, parent_run_id=parent.run_id,
                             storage=storage, home=str(home), mlflow_uri=mlflow_uri),
        {"CPU": TRIAL_DRIVER_CPUS})
    watcher = SweepProgress(budget, spec.trials_per_budget(), spec.base.train.steps, enabled=progress)
    path = f"{storage}/{experiment}"
    if tune.Tuner.can_restore(path):
        # finished trials stay finished; unfinished ones continue; errored ones start again
        # (Tune saved the progress callback with the experiment; it draws a fresh bar on setup)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=spec.param_space(),
            tune_config=tune.TuneConfig(metric=VALID_NELBO_METRIC, mode="min", scheduler=_scheduler(spec),
                                        num_samples=spec.samples, max_concurrent_trials=max_concurrent(spec)),
            run_config=tune.RunConfig(name=experiment, storage_path=storage, verbose=2 if verbose else 0,
                                      callbacks=[watcher],
                                      failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES, fail_fast=False)))
    tuner.fit()
    trials = tune.ExperimentAnalysis(path).trials  # every trial of this budget, restored ones included
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SweepInterrupted(f"sweep {name!r} interrupted at T={budget} with {len(unfinished)} trial(s) unfinished; "
                               "its state is saved: rerun the same command to resume")
    return trials


def collect_rows(spec: SweepSpec, name: str, trials_by_budget: dict[int, list], mlflow_uri: str) -> list[TrialRow]:
    """One row per trial: Tune's status joined with the MLflow child run's final validation metrics.
    Trials the scheduler stopped early have no final metrics; their child runs are closed as KILLED."""
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.data.tags.get(TRIAL_TAG): r for r in client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{KIND_TAG}` = '{KIND_TRIAL}'", max_results=10000)}
    rows = []
    for budget, trials in trials_by_budget.items():
        for trial in trials:
            values = {k: v for k, v in trial.config.items() if v is not None}
            parameterization = values.get(PARAMETERIZATION_KEY) or spec.base.parameterization
            last = trial.last_result or {}
            row = TrialRow(budget, trial.trial_id, "finished", parameterization, values,
                           steps_trained=int(last.get("step", 0)), trial_seconds=float(last.get("time_total_s", math.nan)))
            run = runs.get(trial.trial_id)
            if run is not None:
                row.run_id = run.info.run_id
                row.valid_nelbo_bits = run.data.metrics.get(FINAL_VALID_NELBO_METRIC, math.nan)
                row.valid_nelbo_stderr = run.data.metrics.get(FINAL_VALID_STDERR_METRIC, math.nan)
                row.train_seconds = run.data.metrics.get(FINAL_TRAIN_SECONDS_METRIC, math.nan)
            if trial.status == "ERROR":
                row.status = "error"
                row.error = _trial_error(trial)
            elif run is None:
                row.status = "error"
                row.error = (f"no MLflow child run for trial {trial.trial_id} in {mlflow_uri}: "
                             "do the trials reach the same tracking store as this driver?")
            elif run.info.status != "FINISHED":
                # Tune ended it early: stopping a trial kills its Train controller, which the trial's
                # launch saw as a failure (or never saw, if it was killed first); neither is one
                row.status = "stopped"
                if run.info.status != "KILLED":
                    if ERROR_TAG in run.data.tags:
                        client.delete_tag(run.info.run_id, ERROR_TAG)
                    client.set_tag(run.info.run_id, EARLY_STOPPED_TAG, "true")
                    client.set_terminated(run.info.run_id, "KILLED")
            elif run.data.tags.get(COLLAPSED_TAG) == "True":
                row.status = "collapsed"
            rows.append(row)
    return rows


def _trial_error(trial) -> str:
    try:
        text = Path(trial.local_path, "error.txt").read_text()
    except (OSError, TypeError):
        text = str(getattr(trial, "error_msg", "") or "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed"


__all__ = ["SweepError", "SweepInterrupted", "SweepOutcome", "TrainingError", "TrialRow", "run_sweep"]
