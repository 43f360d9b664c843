"""The function every Ray Train worker runs: fldd's one training loop, fed from the worker's Ray Data
shard, reporting metrics to MLflow (rank 0) and checkpoints to Ray.

Global batch semantics: `train.batch_size` is the global reverse-network batch per optimizer step.
It is split evenly across workers, then into `train.grad_accum_steps` micro-batches; with M z_t
samples per data point, each micro-batch holds batch_size / (workers x accum x M) data points.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.data
import ray.train
import torch
from ray.experimental import tqdm_ray
from ray.train import Checkpoint
from ray.train.torch import get_device, prepare_model
from tqdm.auto import tqdm

from fldd.codec import TokenCodec
from fldd.config import FLDDConfig
from fldd.data import arrow_tokens
from fldd.model import CheckpointError, FLDDModel, config_differences
from fldd.objective import evaluate_nelbo
from fldd.train import CHECKPOINT_EVAL_SEED, NonFiniteLossError, TrainSchedule, build_optimizer, train_loop
from pipelines.checkpoints import (MODEL_FILE, STATE_FILE, load_state, newest_checkpoint, prune_local_checkpoints,
                                  write_checkpoint)
from pipelines.tracking import Tracker
from pipelines.vocabulary import TRAIN_NELBO_METRIC, VALID_NELBO_METRIC, VALID_STDERR_METRIC

VALID_ROWS_PER_CHECKPOINT = 2000  # validation NELBO at checkpoints: rows x 2 passes (final: all rows x 10)
SHUFFLE_BUFFER_ROWS = 16384  # a worker's local shuffle buffer, at least (rows; 16384 x 64 int64 = 8 MB)


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
    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), run_dir)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory), device)
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
    # steps an earlier attempt logged past the checkpoint this one resumes from are not logged again
    # (a run that starts from step 0 trains anew: it logs everything, even under a reused run name)
    resumed = rank == 0 and start_step > 0
    trained_through = tracker.last_logged_step(TRAIN_NELBO_METRIC) if resumed else -1
    validated_through = tracker.last_logged_step(VALID_NELBO_METRIC) if resumed else -1
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
        if step > trained_through:
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
        state = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "schedule": schedule.boundaries(), "rng": torch.get_rng_state(),
                 **({"cuda_rng": torch.cuda.get_rng_state(device)} if on_gpu else {})}

        def write(into: Path) -> None:
            torch.save(state, into / STATE_FILE)
            model.save(into / MODEL_FILE)
            (into / "metrics.json").write_text(json.dumps(metrics))

        if local_checkpoints is not None:  # local mode persists nothing itself: under the run's storage
            directory = write_checkpoint(local_checkpoints / f"checkpoint_{step:08d}", write)
        else:  # Ray copies it into storage on report
            directory = Path(tempfile.mkdtemp(prefix="fldd-ckpt-"))
            write(directory)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
        # logged once the checkpoint is stored: a step whose checkpoint failed to write is scored again
        # by the attempt that resumes, never recorded for a model that was not kept
        if step > validated_through:
            tracker.log_metrics(step, {VALID_NELBO_METRIC: estimate.bits_per_token,
                                       VALID_STDERR_METRIC: estimate.stderr_bits_per_token})
        if local_checkpoints is None:
            shutil.rmtree(directory, ignore_errors=True)  # Ray copied it to storage
        else:
            prune_local_checkpoints(local_checkpoints, int(loop_config["keep_checkpoints"]))

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
    return {"train_steps": cfg.train.steps, "start_step": start_step, "world_size": world}


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
