"""Ray Train: the worker function that wraps fldd's one training loop, and its launcher.

Scale is a launch option, not a second trainer: `workers=0` runs the loop in the driver (local
mode), N CPU workers use DDP over gloo, `gpu=True` one GPU per worker with bf16 autocast for the
networks (posterior, KL and sampling stay fp32/fp64).

Global batch semantics: `train.batch_size` is the global reverse-network batch per optimizer step.
It is split evenly across workers, then into `train.grad_accum_steps` micro-batches; with M z_t
samples per data point, each micro-batch holds batch_size / (workers x accum x M) data points.
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

import pyarrow.fs
import ray
import ray.data
import ray.train
import torch
import yaml
from mlflow.exceptions import MlflowException
from ray.experimental import tqdm_ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device, prepare_model
from tqdm.auto import tqdm

from fldd.config import ConfigError, FLDDConfig
from fldd.codec import TokenCodec
from fldd.data import (DataDescription, DataError, TableFiles, arrow_tokens, check_file_task, load_splits,
                       read_split, resolve_data_shape, token_table)
from fldd.model import CheckpointError, FLDDModel, config_differences
from fldd.objective import evaluate_nelbo
from fldd.train import CHECKPOINT_EVAL_SEED, NonFiniteLossError, TrainSchedule, build_optimizer, train_loop
from pipelines import reports
from pipelines.cluster import init_ray
from pipelines.tracking import (Tracker, dataset_name, download_model_file, git_commit, log_sampler_model, project_home,
                                start_run, tracking_uri)
from pipelines.vocabulary import (COLLAPSED_METRIC, COLLAPSED_TAG, DATASET_TAG, DEVICE_TAG, ERROR_TAG, FINAL_PREFIX,
                                  GIT_COMMIT_TAG, METHOD_TAG, MODEL_URI_TAG, NUM_STEPS_TAG, PARAMETERIZATION_TAG,
                                  RAY_GCS_TAG, RAY_VERSION_TAG, RUN_NAME, SATURATED_METRIC, SATURATED_TAG, STORAGE_TAG,
                                  TORCH_VERSION_TAG, VALID_NELBO_METRIC, VALID_STDERR_METRIC, WORKERS_TAG)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # full training state inside each Ray checkpoint
MODEL_FILE = "model.pt"  # the inference model (FLDDModel.save format)
RUN_CONFIG_FILE = "fldd_config.yaml"  # written beside the Ray run, checked on resume
VALID_ROWS_PER_CHECKPOINT = 2000  # validation NELBO at checkpoints: rows x 2 passes (final: all rows x 10)
SHUFFLE_BUFFER_ROWS = 16384  # a worker's local shuffle buffer, at least (rows; 16384 x 64 int64 = 8 MB)
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


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------

def train_worker(loop_config: dict) -> dict:
    """Runs on every Ray Train worker (or in the driver in local mode)."""
    cfg = FLDDConfig.from_dict(loop_config["config"])
    # one line of progress per log interval is ours; Ray Data's per-epoch progress reports are noise here
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = FLDDModel(cfg, TokenCodec.from_dict(loop_config["codec"]) if loop_config.get("codec") else None).to(device)
    optimizer = build_optimizer(model, cfg.train)
    start_step = 0
    boundaries = None  # phase boundaries of a resumed run: where they were when it started
    run_dir = Path(loop_config["run_storage_dir"]) if loop_config["run_storage_dir"] else None
    local_checkpoints = run_dir / "local_checkpoints" if loop_config["local_mode"] else None
    # Ray's own checkpoint, or a newer one on disk (local mode persists its own; a run may switch
    # between local mode and workers under the same name)
    checkpoint = _newest_checkpoint(ray.train.get_checkpoint(), run_dir)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
        saved = FLDDConfig.from_dict(state["config"])
        differences = config_differences(cfg, saved)
        if differences:
            raise CheckpointError("the run's checkpoint does not match this config: " + "; ".join(differences))
        model.load_state(state["model"], source="checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        # checkpoints from before the boundaries were stored: the schedule of the run that wrote them
        boundaries = state.get("schedule") or TrainSchedule(
            saved.train, cfg.learns_forward, freeze_fraction=saved.resolved_freeze_fraction).boundaries()
        if rank == 0:
            torch.set_rng_state(state["rng"].cpu())  # map_location moved it; RNG states live on the CPU
            if on_gpu and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        else:
            torch.manual_seed(cfg.train.seed + 7919 * rank + start_step)
        if rank == 0:
            print(f"resuming from step {start_step}", flush=True)
    else:
        if loop_config.get("init_state") is not None:  # train.init_from: start as the trained source model
            model.load_state_dict(loop_config["init_state"])
        torch.manual_seed(cfg.train.seed + 7919 * rank)  # different z_t and t draws per rank

    schedule = TrainSchedule(cfg.train, cfg.learns_forward, boundaries, freeze_fraction=cfg.resolved_freeze_fraction)
    freezes_forward = cfg.learns_forward and cfg.resolved_freeze_fraction > 0
    ddp_model = prepare_model(model, move_to_device=False,
                              parallel_strategy_kwargs={"find_unused_parameters": freezes_forward})

    tracker = Tracker(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    column, D = loop_config["column"], cfg.seq_len
    valid = torch.cat([arrow_tokens(b[column], D) for b in ray.train.get_dataset_shard("valid").iter_batches(
        batch_size=8192, batch_format="pyarrow")]) if rank == 0 else None
    progress = TrainingProgress(cfg.train.steps, start_step, in_driver=loop_config["local_mode"]) \
        if rank == 0 and not loop_config.get("quiet") else None

    accumulation = cfg.train.grad_accum_steps
    batches = _shard_batches(ray.train.get_dataset_shard("train"), cfg.rows_per_micro_batch(world), column, D)
    batches = _maybe_inject_failure(batches, loop_config, rank, world, start_step, accumulation)

    def on_metrics(step: int, metrics: dict) -> None:
        if rank != 0:
            return
        if progress is not None:
            progress.show(metrics)
        tracker.log_metrics(step, {k: v for k, v in metrics.items() if k != "phase"})

    def on_checkpoint(step: int) -> None:
        metrics: dict[str, Any] = {"step": step}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        # the same rows and random numbers at every checkpoint (common random numbers): picking the
        # best checkpoint compares models, not independent noise draws
        estimate = evaluate_nelbo(model, valid[:VALID_ROWS_PER_CHECKPOINT], num_passes=2,
                                  generator=torch.Generator(device=device).manual_seed(CHECKPOINT_EVAL_SEED))
        model.train()
        metrics[VALID_NELBO_METRIC] = estimate.bits_per_token
        tracker.log_metrics(step, {VALID_NELBO_METRIC: estimate.bits_per_token,
                                   VALID_STDERR_METRIC: estimate.stderr_bits_per_token})
        # local mode persists nothing itself: keep checkpoints under the run's storage directory
        directory = (local_checkpoints / f"checkpoint_{step:08d}" if local_checkpoints is not None
                     else Path(tempfile.mkdtemp(prefix="fldd-ckpt-")))
        directory.mkdir(parents=True, exist_ok=True)
        state = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "schedule": schedule.boundaries(), "rng": torch.get_rng_state(),
                 **({"cuda_rng": torch.cuda.get_rng_state(device)} if on_gpu else {})}
        torch.save(state, directory / STATE_FILE)
        model.save(directory / MODEL_FILE)
        (directory / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
        if local_checkpoints is None:
            shutil.rmtree(directory, ignore_errors=True)  # Ray copied it to storage
        else:
            _prune_local_checkpoints(local_checkpoints, int(loop_config["keep_checkpoints"]))

    try:
        if start_step == 0 and loop_config.get("init_state") is not None:
            # the starting model is a candidate too: the best checkpoint can never be worse than it
            on_checkpoint(0)
        train_loop(ddp_model, batches, optimizer, num_steps=cfg.train.steps, start_step=start_step,
                   schedule=schedule, grad_clip=cfg.train.grad_clip, grad_clip_mode=cfg.train.grad_clip_mode,
                   log_every=cfg.train.log_every, on_metrics=on_metrics,
                   checkpoint_every=cfg.train.checkpoint_every, on_checkpoint=on_checkpoint,
                   information_batch=(lambda: valid[:1024]) if rank == 0 else None,
                   accumulation_steps=accumulation, autocast_dtype=torch.bfloat16 if on_gpu else None,
                   device=device, on_step=progress.step if progress is not None else None)
    except NonFiniteLossError as error:
        # every rank raised at the same step (collective check); a retry would hit it again
        return {"error": str(error)}
    finally:
        if progress is not None:
            progress.close()
    if start_step >= cfg.train.steps and rank == 0:
        print(f"run already complete at step {start_step}", flush=True)
    return {"steps": cfg.train.steps, "start_step": start_step, "world_size": world}


class TrainingProgress:
    """A bar over the run's optimizer steps with the latest metrics in its description: tqdm in the
    driver (local mode), Ray's tqdm_ray on a worker (drawn by the driver, not as log lines)."""

    SHOWN = ("nelbo", "information_retained_max", "steps_per_second")

    def __init__(self, total: int, start: int, in_driver: bool):
        if in_driver:
            self.bar = tqdm(total=total, initial=start, unit="step", desc="training", dynamic_ncols=True,
                            mininterval=1.0)
        else:
            self.bar = tqdm_ray.tqdm(total=total, desc="training", unit="step")
            self.bar.update(start)
        self.done = start

    def step(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done

    def show(self, metrics: dict[str, Any]) -> None:
        shown = " ".join(f"{key}={metrics[key]:.4g}" for key in self.SHOWN if key in metrics)
        phase = metrics.get("phase")
        self.bar.set_description(f"training ({phase}) {shown}" if phase else f"training {shown}")

    def close(self) -> None:
        self.bar.close()


def _checkpoint_step(directory: Path) -> int:
    try:
        return int(json.loads((directory / "metrics.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def checkpoints_on_disk(run_dir: Path | None) -> list[Path]:
    """Checkpoint directories of a run in local storage: Ray's and local mode's, oldest first."""
    if run_dir is None or not run_dir.is_dir():
        return []
    found = [p for pattern in ("checkpoint_*", "local_checkpoints/checkpoint_*") for p in run_dir.glob(pattern)
             if (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file()]
    return sorted(found, key=_checkpoint_step)


def _newest_checkpoint(from_ray: Checkpoint | None, run_dir: Path | None) -> Checkpoint | None:
    on_disk = checkpoints_on_disk(run_dir)
    if not on_disk:
        return from_ray
    newest = on_disk[-1]
    if from_ray is not None:
        with from_ray.as_directory() as directory:
            if _checkpoint_step(Path(directory)) >= _checkpoint_step(newest):
                return from_ray
    return Checkpoint.from_directory(str(newest))


def _checkpoint_score(directory: Path) -> float:
    try:
        return float(json.loads((directory / "metrics.json").read_text())[VALID_NELBO_METRIC])
    except (OSError, ValueError, KeyError):
        return float("inf")


def best_checkpoint(result: ray.train.Result, storage: str, name: str) -> Checkpoint | None:
    """The run's checkpoint with the lowest validation NELBO, in local mode and with workers alike.

    In local storage that is the best of every checkpoint on disk (Ray's and local mode's, which
    Ray does not track; a run may switch modes under one name), the newest among equals. Remote
    storage: Ray's best of this run."""
    if "://" not in storage:
        on_disk = checkpoints_on_disk(Path(storage) / name)
        if on_disk:
            return Checkpoint.from_directory(str(min(reversed(on_disk), key=_checkpoint_score)))
    return result.get_best_checkpoint(VALID_NELBO_METRIC, "min") if result.best_checkpoints else result.checkpoint


def _prune_local_checkpoints(directory: Path, keep: int) -> None:
    """Keep the latest checkpoint, the best by validation NELBO, and the most recent up to `keep`."""
    found = sorted(p for p in directory.glob("checkpoint_*") if (p / "metrics.json").is_file())
    best = min(found, key=lambda p: json.loads((p / "metrics.json").read_text()).get(VALID_NELBO_METRIC,
                                                                                      float("inf")))
    kept = {found[-1], best, *found[-max(keep, 1):]}
    for path in found:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _shard_batches(shard, rows: int, column: str, seq_len: int):
    """Endless micro-batches of token rows from this worker's Ray Data shard (one pass per epoch).

    Rows are mixed twice: the files' order is shuffled every epoch (streamed tables) or the rows once
    in the driver (tables in memory), and a local buffer of SHUFFLE_BUFFER_ROWS reshuffles within."""
    while True:
        seen = 0
        for batch in shard.iter_batches(batch_size=rows, batch_format="pyarrow", drop_last=True,
                                        local_shuffle_buffer_size=max(8 * rows, SHUFFLE_BUFFER_ROWS),
                                        prefetch_batches=4):
            seen += 1
            yield arrow_tokens(batch[column], seq_len)
        if seen == 0:
            raise RuntimeError(f"this worker's data shard has fewer than {rows} rows")


def _maybe_inject_failure(batches, loop_config: dict, rank: int, world: int, start_step: int, accumulation: int):
    """Test hook: the last worker's process dies (os._exit) once, when it starts step N."""
    fail_at, marker = loop_config.get("inject_failure_at_step"), loop_config.get("failure_marker")
    if fail_at is None or rank != world - 1 or world < 2:
        yield from batches
        return
    for index, batch in enumerate(batches):
        if start_step + index // accumulation == fail_at and not Path(marker).exists():
            Path(marker).write_text(f"worker {rank} killed at step {fail_at}\n")
            # Ray's controller collects reports (and so registers checkpoints) on a ~2 s poll:
            # die well after the last one, like a real crash some time after a checkpoint
            time.sleep(5.0)
            os._exit(1)
        yield batch


# ---------------------------------------------------------------------------------------------
# The launcher (driver)
# ---------------------------------------------------------------------------------------------

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


def _storage_path(opts: LaunchOptions, home: Path) -> str:
    if opts.storage and "://" in opts.storage:
        return opts.storage
    return str(Path(opts.storage or home / "ray_results").resolve())


# settings a resumed run may change: how long it trains and how often it logs and checkpoints
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every")


def _storage_file_system(storage: str):
    """(pyarrow FileSystem, path inside it) of a storage location: a local path, file://, s3://, gs://..."""
    if "://" not in storage:
        return pyarrow.fs.LocalFileSystem(), str(Path(storage).resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as error:
        raise ConfigError(f"storage={storage!r}: not a path or file system URI pyarrow can open: {error}") from error


def _check_resume_config(cfg: FLDDConfig, storage: str, name: str, save: bool = True) -> None:
    """A rerun with the same name continues the same run: only RESUMABLE_CHANGES may differ.
    Anything else (model, data, optimizer settings) is refused here, naming the field, before any
    worker starts or the MLflow run is touched. The config is kept beside the run
    (<storage>/<name>/fldd_config.yaml) through the storage's file system: local and remote alike."""
    fs, root = _storage_file_system(storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    saved_path = f"{run_dir}/{RUN_CONFIG_FILE}"
    try:
        data = None
        if fs.get_file_info(saved_path).type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(saved_path) as stream:
                data = yaml.safe_load(stream.read().decode()) or {}
    except OSError as error:  # no credentials, no such bucket, no permission
        raise ConfigError(f"storage={storage!r}: cannot read {saved_path}: {error}") from error
    if data is not None:
        saved, current = FLDDConfig.from_dict(data).resolved_flat_dict(), cfg.resolved_flat_dict()
        differences = [f"{k}: run has {saved[k]!r}, now {current[k]!r}" for k in current
                       if current[k] != saved[k] and k not in RESUMABLE_CHANGES]
        if differences:
            raise CheckpointError(f"run {name!r} exists in {storage} with different settings: "
                                  + "; ".join(differences) + ". Use another --name for a new run.")
    if not save:
        return
    try:
        fs.create_dir(run_dir, recursive=True)  # object stores have no directories: a no-op there
        with fs.open_output_stream(saved_path) as stream:
            stream.write(cfg.to_yaml().encode())
    except OSError as error:
        raise ConfigError(f"storage={storage!r}: cannot write {saved_path}: {error}") from error


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
    storage = _storage_path(opts, home)
    # before anything is written: a source that does not fit is bad input, named here. Only for a
    # run that has not started: a resume continues from its checkpoint (the source may have moved on)
    fresh = "://" in storage or not checkpoints_on_disk(Path(storage) / name)
    init_state = load_init_model(cfg, tracking_uri(home)).state_dict() if cfg.train.init_from and fresh else None
    _check_resume_config(cfg, storage, name, save=False)

    init_ray(opts.address)
    if described.streams:  # every file checked on the cluster, before the MLflow run or any training
        validate_on_cluster(cfg, described)
        valid_data = read_split(described.splits["valid"], cfg.data.column, cfg.seq_len, cfg.vocab_size)
    _check_resume_config(cfg, storage, name)  # saved only now: a run refused above leaves nothing behind
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
        datasets={"train": training_dataset(run), "valid": ray.data.from_arrow(token_table(run.valid_data, cfg.vocab_size, cfg.data.column))},
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
    return ray.data.from_arrow(token_table(run.train_data[shuffled], cfg.vocab_size, cfg.data.column))


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
        run.tracker.set_tags({ERROR_TAG: f"{type(error).__name__}: {error}"[:5000]})
        run.tracker.finish("FAILED" if isinstance(error, Exception) else "KILLED")
        if not isinstance(error, Exception):
            raise
        raise TrainingError(f"training run {run.name!r} failed: {error}") from error
    finally:
        marker.unlink(missing_ok=True)
