"""Ray Train's launcher: one call, `launch`, takes a config to a finished MLflow run with a logged model.

Scale is a launch option, not a second trainer: `workers=0` runs the loop in the driver (local
mode), N CPU workers use DDP over gloo, `gpu=True` one GPU per worker with bf16 autocast for the
networks (posterior, KL and sampling stay fp32/fp64). What every worker runs is
`pipelines/worker.py`; checkpoints on disk are `pipelines/checkpoints.py`; where a run keeps its
state and what a rerun may change, `pipelines/run_storage.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
import ray.train
import torch
from mlflow.exceptions import MlflowException
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from fldd.config import ConfigError, FLDDConfig
from fldd.data import (DataDescription, DataError, TableFiles, check_file_task, load_splits, read_split,
                       resolve_data_shape, token_table)
from fldd.model import CheckpointError, FLDDModel
from fldd.molecules import require_molecule_scorers
from pipelines import reports
from pipelines.checkpoints import MODEL_FILE, best_checkpoint, checkpoints_on_disk
from pipelines.cluster import init_ray
from pipelines.run_storage import RESUMABLE_CHANGES, check_resume_config, storage_path
from pipelines.tracking import (Tracker, TrackingUnavailable, dataset_name, download_model_file, git_commit,
                                log_sampler_model, project_home, start_run, tracking_outage, tracking_uri,
                                unreachable_message)
from pipelines.vocabulary import (COLLAPSED_METRIC, COLLAPSED_TAG, DATASET_TAG, DEVICE_TAG, ERROR_TAG, FINAL_PREFIX,
                                  GIT_COMMIT_TAG, METHOD_TAG, MODEL_URI_TAG, NUM_STEPS_TAG, PARAMETERIZATION_TAG,
                                  RAY_GCS_TAG, RAY_VERSION_TAG, RUN_NAME, SATURATED_METRIC, SATURATED_TAG, STORAGE_TAG,
                                  TORCH_VERSION_TAG, VALID_NELBO_METRIC, WORKERS_TAG)
from pipelines.worker import train_worker

log = logging.getLogger(__name__)

READ_TASK_CPUS = 0  # Ray Data read tasks and file checks: Train workers may hold every CPU (no deadlock)


class TrainingError(RuntimeError):
    """A training run failed; the MLflow run is marked FAILED."""


@dataclass
class LaunchOptions:
    workers: int = 0  # 0: local mode, the loop runs in this process
    gpu: bool = False
    address: str | None = None  # join this Ray cluster (else RAY_ADDRESS, else start a local one)
    storage: str | None = None  # checkpoints: a local path or URI (default $FLDD_HOME/ray_results)
    name: str | None = None  # run name: rerunning with the same name resumes
    max_failures: int = 2
    cpus_per_worker: float = 1.0
    keep_checkpoints: int = 2
    quiet: bool = False
    inject_failure_at_step: int | None = None  # tests: the last worker dies once at this step
    callbacks: list = field(default_factory=list)  # Ray Train run callbacks (Tune trials: TuneReportCallback)
    tags: dict[str, Any] = field(default_factory=dict)  # extra MLflow run tags (a sweep: parent run, budget)


@dataclass
class TrainOutcome:
    run_name: str
    run_id: str
    resumed: bool
    model_path: Path
    model_uri: str
    metrics: dict[str, Any] = field(default_factory=dict)
    start_step: int = 0  # where the last worker group started (0, or the checkpoint it resumed from)


def config_digest(cfg: FLDDConfig) -> str:
    """8 hex digits of the model-defining config: the settings a resumed run may change
    (RESUMABLE_CHANGES: length, logging, checkpointing) are left out, so extending a run keeps its name."""
    flat = {k: v for k, v in cfg.to_flat_dict().items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_name(cfg: FLDDConfig) -> str:
    """data-parameterization-T-seed-digest: two configs that differ in any hyperparameter get two
    runs (on shared storage they would otherwise resume each other)."""
    return RUN_NAME.format(dataset=dataset_name(cfg), parameterization=cfg.parameterization, T=cfg.process.num_steps,
                           seed=cfg.train.seed, digest=config_digest(cfg))


def validate_launch(cfg: FLDDConfig, opts: LaunchOptions) -> None:
    """Checks that fail fast in the driver, naming the field, before any worker starts."""
    if opts.workers < 0:
        raise ConfigError(f"workers={opts.workers}: must be >= 0")
    world = max(opts.workers, 1)
    micro = world * cfg.train.grad_accum_steps * cfg.samples_per_x
    if cfg.train.batch_size % micro:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must split evenly over {world} worker(s) x "
                          f"{cfg.train.grad_accum_steps} accumulation step(s) x M z_t samples (multiple of {micro})")
    if opts.name is not None and (not opts.name or "/" in opts.name):
        raise ConfigError(f"name={opts.name!r}: must be a non-empty name without '/'")
    if opts.workers == 0 and opts.storage and "://" in opts.storage:
        raise ConfigError(f"storage={opts.storage!r}: local mode (workers=0) keeps checkpoints on a local path; "
                          "use a directory, or workers >= 1 for remote storage")


@dataclass
class PreparedRun:
    """Everything a run needs before Ray Train starts: checked config, data, storage, MLflow run."""

    cfg: FLDDConfig
    opts: LaunchOptions
    name: str
    storage: str
    home: Path
    tracker: Tracker
    resumed: bool
    described: DataDescription
    train_data: torch.Tensor | None  # in memory (built-in data, a table without splits); None: streamed
    train_rows: int
    valid_data: torch.Tensor
    init_state: dict[str, torch.Tensor] | None = None  # train.init_from: the starting weights


def load_init_model(cfg: FLDDConfig, tracking: str) -> FLDDModel:
    """The model `train.init_from` names (a model.pt path, a run id, runs:/... or models:/...), checked
    against `cfg` (ConfigError naming the field that differs) and applied to a fresh model."""
    reference = cfg.train.init_from
    try:
        if Path(reference).is_file():
            source = FLDDModel.load(reference)
        else:
            source = FLDDModel.load(download_model_file(tracking, reference)[0])
    except (OSError, CheckpointError) as error:
        raise ConfigError(f"train.init_from={reference!r}: cannot load a model from it: {error}") from error
    except MlflowException as error:  # no such run, model, version or alias
        raise ConfigError(f"train.init_from={reference!r}: {error.message}") from error
    torch.manual_seed(cfg.train.seed)
    model = FLDDModel(cfg)
    model.init_from(source)
    return model


def prepare_run(cfg: FLDDConfig, opts: LaunchOptions) -> PreparedRun:
    """Validate in the driver (naming the field), join Ray, start or continue the MLflow run."""
    cfg.validate()
    cfg, described = resolve_data_shape(cfg)  # seq_len and vocab_size from the data, or agreeing with it
    validate_launch(cfg, opts)
    if described.codec is not None and described.codec.kind == "smiles":
        require_molecule_scorers()  # the final report scores molecules: say so now, not after training
    home = project_home()
    name = opts.name or default_run_name(cfg)
    if not opts.quiet:
        print(described.summary(), flush=True)
    train_data, valid_data = None, None
    if not described.streams:  # built-in data, or a table split in memory: validated here, in the driver
        train_data, valid_data = load_splits(cfg)
    train_rows = described.rows["train"] if train_data is None else len(train_data)
    world = max(opts.workers, 1)
    rows_per_micro = cfg.rows_per_micro_batch(world)
    if train_rows // world < rows_per_micro:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: each of {world} worker(s) needs "
                          f"{rows_per_micro} rows per micro-batch, the training split has {train_rows}")
    storage = storage_path(opts.storage, home)
    # before anything is written: a source that does not fit is bad input, named here. Only for a
    # run that has not started: a resume continues from its checkpoint (the source may have moved on)
    fresh = "://" in storage or not checkpoints_on_disk(Path(storage) / name)
    init_state = load_init_model(cfg, tracking_uri(home)).state_dict() if cfg.train.init_from and fresh else None
    check_resume_config(cfg, storage, name, save=False)

    init_ray(opts.address)
    check_cluster_fits(opts)
    if described.streams:  # every file checked on the cluster, before the MLflow run or any training
        validate_on_cluster(cfg, described)
        valid_data = read_split(described.splits["valid"], cfg.data.column, cfg.seq_len, cfg.vocab_size)
    check_resume_config(cfg, storage, name)  # saved only now: a run refused above leaves nothing behind
    if opts.workers > 0 and len(ray.nodes()) > 1 and ("://" not in storage or "MLFLOW_TRACKING_URI" not in os.environ):
        log.warning("this Ray cluster has %d nodes: --storage must be shared by all of them (now %s) and "
                    "MLFLOW_TRACKING_URI should name a tracking server (README: running on a cluster)",
                    len(ray.nodes()), storage)
    tags = {GIT_COMMIT_TAG: git_commit(), RAY_VERSION_TAG: ray.__version__, TORCH_VERSION_TAG: torch.__version__,
            WORKERS_TAG: opts.workers, DEVICE_TAG: "gpu" if opts.gpu else "cpu", METHOD_TAG: cfg.process.method,
            PARAMETERIZATION_TAG: cfg.parameterization, DATASET_TAG: dataset_name(cfg),
            NUM_STEPS_TAG: cfg.process.num_steps, STORAGE_TAG: storage,
            RAY_GCS_TAG: ray.get_runtime_context().gcs_address, **opts.tags}  # the cluster it ran on
    tracker, resumed = start_run(cfg, name, tags, home)
    if not opts.quiet:
        print(f"MLflow run {tracker.run_id} ({'resumed' if resumed else 'new'}), tracking {tracker.uri}", flush=True)
    return PreparedRun(cfg, opts, name, storage, home, tracker, resumed, described, train_data, train_rows,
                       valid_data, init_state)


def check_cluster_fits(opts: LaunchOptions) -> None:
    """The Train workers must fit the cluster's CPUs (and GPUs): otherwise Ray waits for them for
    good (a head started with --num-cpus=0 and no worker node yet) instead of saying so."""
    if opts.workers == 0:
        return  # local mode: the loop runs in this process
    have = ray.cluster_resources()
    for kind, each in (("CPU", opts.cpus_per_worker), ("GPU", 1.0 if opts.gpu else 0.0)):
        if opts.workers * each > have.get(kind, 0.0) + 1e-9:
            raise ConfigError(f"{opts.workers} worker(s) x {each:g} {kind} need {opts.workers * each:g} {kind}s, the "
                              f"Ray cluster has {have.get(kind, 0.0):g}: lower --workers or --cpus-per-worker, or add "
                              "nodes (`ray start --address HEAD:PORT`; a head started with --num-cpus=0 runs none)")


def validate_on_cluster(cfg: FLDDConfig, described: DataDescription) -> None:
    """Check every file of a split table in Ray tasks, one per file, each streaming over its row
    groups, about one task per cluster CPU at a time (a table of 10,000 files must not start 10,000
    processes); raise the first problem found, naming the file and row."""
    # zero-CPU tasks would all land on the calling node: spread them over the cluster's nodes
    check = ray.remote(num_cpus=READ_TASK_CPUS, max_retries=0, scheduling_strategy="SPREAD")(check_file_task)
    column, D, K = cfg.data.column, cfg.seq_len, cfg.vocab_size
    units = [TableFiles(files.filesystem, (path,), files.uri_prefix)
             for files in described.splits.values() for path in files.paths]
    window = max(2, int(ray.cluster_resources().get("CPU", 2)))
    pending: list = []
    while units or pending:
        while units and len(pending) < window:
            pending.append(check.remote(units.pop(0), column, D, K))
        done, pending = ray.wait(pending, num_returns=1)
        problem = ray.get(done[0])
        if problem is not None:
            for ref in pending:
                ray.cancel(ref)
            raise DataError(problem)


def build_trainer(run: PreparedRun, failure_marker: Path) -> TorchTrainer:
    """The one TorchTrainer for a prepared run; `opts.callbacks` joins its run callbacks (a Tune
    trial adds TuneReportCallback, so sweeps fit this same trainer)."""
    cfg, opts = run.cfg, run.opts
    quiet_ray_data()
    cpus = max(1, int(opts.cpus_per_worker))
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": run.tracker.uri, "run_id": run.tracker.run_id,
                           "quiet": opts.quiet, "threads_per_worker": cpus, "local_mode": opts.workers == 0,
                           "run_storage_dir": None if "://" in run.storage else str(Path(run.storage) / run.name),
                           "keep_checkpoints": opts.keep_checkpoints,
                           "inject_failure_at_step": opts.inject_failure_at_step,
                           "failure_marker": str(failure_marker), "init_state": run.init_state,
                           "column": cfg.data.column,
                           "codec": run.described.codec.to_dict() if run.described.codec else None},
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.gpu,
                                     resources_per_worker=None if opts.workers == 0 else
                                     {"CPU": opts.cpus_per_worker, **({"GPU": 1} if opts.gpu else {})}),
        run_config=RunConfig(name=run.name, storage_path=run.storage, callbacks=list(opts.callbacks),
                             checkpoint_config=CheckpointConfig(num_to_keep=opts.keep_checkpoints,
                                                                checkpoint_score_attribute=VALID_NELBO_METRIC,
                                                                checkpoint_score_order="min"),
                             failure_config=FailureConfig(max_failures=opts.max_failures)),
        datasets={"train": training_dataset(run), "valid": in_memory_dataset(token_table(run.valid_data, cfg.vocab_size, cfg.data.column))},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def quiet_ray_data() -> None:
    """The training bar is the progress; Ray Data's per-dataset bars and execution lines (drawn by
    every worker, every epoch) are noise unless --verbose. Datasets carry the driver's context."""
    if logging.getLogger("ray").getEffectiveLevel() <= logging.INFO:
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False


def training_dataset(run: PreparedRun) -> ray.data.Dataset:
    """The training split as a Ray Dataset: a split table streams from its files (never read whole by
    the driver; the files' order is reshuffled every epoch); data in memory goes in shuffled once (a
    sorted table must not give sorted batches)."""
    cfg = run.cfg
    if run.train_data is None:
        files = run.described.splits["train"]
        context = ray.data.DataContext.get_current()
        # Ray Data's V2 Parquet reader (the default in Ray 2.60) plans a ListFiles task that asks for
        # a whole CPU (ray/data/_internal/planner/plan_list_files_op.py sets no num_cpus), which
        # never comes while the Train workers hold every CPU (2 workers on 2 cores, a full sweep):
        # the run hangs. The V1 reader's tasks take READ_TASK_CPUS.
        # tests/pipelines/test_data_streaming.py runs 2 workers on the 2-CPU test cluster for this.
        previous, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            # zero-CPU tasks are not limited by CPUs: cap how many read at once (one per worker)
            return ray.data.read_parquet(
                list(files.paths), filesystem=files.filesystem, columns=[cfg.data.column], num_cpus=READ_TASK_CPUS,
                concurrency=max(1, run.opts.workers),
                shuffle=ray.data.FileShuffleConfig(seed=cfg.data.seed, reseed_after_execution=True))
        finally:
            context.use_datasource_v2 = previous
    shuffled = torch.randperm(len(run.train_data), generator=torch.Generator().manual_seed(cfg.data.seed))
    return in_memory_dataset(token_table(run.train_data[shuffled], cfg.vocab_size, cfg.data.column))


def in_memory_dataset(table: pa.Table) -> ray.data.Dataset:
    """A table in this process as a Ray Dataset of one block. Not `ray.data.from_arrow`: it reads each
    block's metadata in a Ray task that asks for a whole CPU, which never comes on a node whose CPUs
    the trials and Train workers hold (a sweep on a 1-CPU worker node under a 0-CPU head hung there
    for good); `from_blocks` (a Ray DeveloperAPI, see pyproject) reads it here."""
    return ray.data.from_blocks([table])


def finish_run(run: PreparedRun, result: ray.train.Result, train_seconds: float) -> TrainOutcome:
    """Final evaluation of the best checkpoint on validation, artifacts, the logged sampler model."""
    cfg, tracker, name, storage, home = run.cfg, run.tracker, run.name, run.storage, run.home
    returned = result.return_value or {}
    if "error" in returned:
        tracker.set_tags({ERROR_TAG: returned["error"][:5000]})
        tracker.finish("FAILED")
        raise TrainingError(f"training run {name!r} stopped: {returned['error']}")

    best = best_checkpoint(result, storage, name)
    if best is None:
        tracker.finish("FAILED")
        raise TrainingError(f"training run {name!r} produced no checkpoint")
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with best.as_directory() as directory:
        shutil.copy(Path(directory) / MODEL_FILE, run_dir / MODEL_FILE)
    model = FLDDModel.load(run_dir / MODEL_FILE)
    metrics = reports.final_report(model, run.valid_data, run_dir, train_seconds=train_seconds,
                                   workers=run.opts.workers)
    tracker.log_metrics(cfg.train.steps, {f"{FINAL_PREFIX}{k}": v for k, v in metrics.items()})
    for artifact in sorted(run_dir.iterdir()):
        if artifact.suffix in (".yaml", ".json", ".png"):
            tracker.log_artifact(artifact)
    model_uri = log_sampler_model(tracker, run_dir / MODEL_FILE, cfg)
    tracker.set_tags({MODEL_URI_TAG: model_uri, COLLAPSED_TAG: metrics.get(COLLAPSED_METRIC, False),
                      SATURATED_TAG: metrics.get(SATURATED_METRIC, False)})
    tracker.finish("FINISHED")
    if not run.opts.quiet:
        print(f"finished: validation NELBO {metrics[VALID_NELBO_METRIC]:.4f} bits/token; model {model_uri}; "
              f"files under {run_dir}", flush=True)
    return TrainOutcome(name, tracker.run_id, run.resumed, run_dir / MODEL_FILE, model_uri, metrics,
                        int(returned.get("start_step", 0)))


def launch(cfg: FLDDConfig, opts: LaunchOptions | None = None) -> TrainOutcome:
    """Train with Ray Train, track in MLflow, log the sampler model. Resumes a run of the same name."""
    run = prepare_run(cfg, opts or LaunchOptions())
    marker = Path(tempfile.gettempdir()) / f"fldd-injected-failure-{run.tracker.run_id}-{run.opts.inject_failure_at_step}"
    trainer = build_trainer(run, marker)
    start = time.perf_counter()
    try:
        result = trainer.fit()
        return finish_run(run, result, train_seconds=time.perf_counter() - start)
    except TrainingError:
        raise  # finish_run recorded it
    except BaseException as error:  # a Tune stop or Ctrl-C lands here too: the run must not stay RUNNING
        outage = tracking_outage(error) if isinstance(error, Exception) else None
        if outage is None:
            try:
                run.tracker.set_tags({ERROR_TAG: f"{type(error).__name__}: {error}"[:5000]})
                run.tracker.finish("FAILED" if isinstance(error, Exception) else "KILLED")
            except TrackingUnavailable as unreachable:  # the workers' error may not carry the outage: this does
                outage = unreachable
        if not isinstance(error, Exception):
            raise
        if outage is not None:  # nothing could be recorded: the run stays RUNNING, and the same command resumes it
            reason = str(outage) if isinstance(outage, TrackingUnavailable) else unreachable_message(run.tracker.uri)
            raise TrainingError(f"training run {run.name!r} stopped: {reason}. Its checkpoints are kept under "
                                f"{run.storage}/{run.name}; its MLflow run stays RUNNING: once the server answers, rerun the "
                                "same command and it resumes") from error
        raise TrainingError(f"training run {run.name!r} failed: {error}") from error
    finally:
        marker.unlink(missing_ok=True)
