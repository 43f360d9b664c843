"""A run's checkpoints on disk: which is newest (to resume from), which is best (the run's model),
and which to keep. Ray tracks the checkpoints of worker runs; local mode (`workers=0`) writes its
own under <storage>/<run name>/local_checkpoints/, and a run may switch between the two under one
name, so both places are read."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint

from fldd.model import CheckpointError
from pipelines.vocabulary import VALID_NELBO_METRIC

STATE_FILE = "state.pt"  # full training state inside each Ray checkpoint
MODEL_FILE = "model.pt"  # the inference model (FLDDModel.save format)
PARTIAL = ".partial"  # a checkpoint directory being written; renamed when complete, never read


def write_checkpoint(directory: Path, write: Callable[[Path], None]) -> Path:
    """Write a checkpoint into `directory` as a whole or not at all: `write` fills DIR.partial, which
    is then renamed to DIR. A crash (or a full disk) mid-write leaves only a .partial directory,
    which no resume reads. Returns `directory`."""
    partial = directory.with_name(directory.name + PARTIAL)
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier crash at this step
        partial.mkdir(parents=True)
        write(partial)
        shutil.rmtree(directory, ignore_errors=True)  # the same step written again (a rerun)
        os.replace(partial, directory)
    except (OSError, RuntimeError) as error:  # read-only or full disk (torch.save reports ENOSPC as RuntimeError)
        shutil.rmtree(partial, ignore_errors=True)  # a full disk keeps no half checkpoint filling it
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise CheckpointError(f"cannot write checkpoint {directory}: {reason}. The checkpoints "
                              f"before it in {directory.parent} are complete: once it is writable again, rerun "
                              "the same command to resume from the newest") from error
    return directory


def load_state(directory: Path, device: torch.device | str = "cpu") -> dict:
    """The training state of a checkpoint; CheckpointError naming the file when it cannot be read
    (truncated or corrupt), instead of a deep torch or pickle error."""
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"checkpoint file {path} cannot be read (truncated or corrupt: {error}); delete "
                              f"{Path(directory)} to resume from the checkpoint before it") from error


def checkpoint_step(directory: Path) -> int:
    try:
        return int(json.loads((directory / "metrics.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def checkpoints_on_disk(run_dir: Path | None) -> list[Path]:
    """Checkpoint directories of a run in local storage: Ray's and local mode's, oldest first."""
    if run_dir is None or not run_dir.is_dir():
        return []
    found = [p for pattern in ("checkpoint_*", "local_checkpoints/checkpoint_*") for p in run_dir.glob(pattern)
             if not p.name.endswith(PARTIAL) and (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def newest_checkpoint(from_ray: Checkpoint | None, run_dir: Path | None) -> Checkpoint | None:
    on_disk = checkpoints_on_disk(run_dir)
    if not on_disk:
        return from_ray
    newest = on_disk[-1]
    if from_ray is not None:
        with from_ray.as_directory() as directory:
            if checkpoint_step(Path(directory)) >= checkpoint_step(newest):
                return from_ray
    return Checkpoint.from_directory(str(newest))


def checkpoint_score(directory: Path) -> float:
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
            return Checkpoint.from_directory(str(min(reversed(on_disk), key=checkpoint_score)))
    return result.get_best_checkpoint(VALID_NELBO_METRIC, "min") if result.best_checkpoints else result.checkpoint


def prune_local_checkpoints(directory: Path, keep: int) -> None:
    """Keep the latest checkpoint, the best by validation NELBO, and the most recent up to `keep`."""
    found = sorted(p for p in directory.glob("checkpoint_*")
                   if not p.name.endswith(PARTIAL) and (p / "metrics.json").is_file())
    best = min(found, key=checkpoint_score)
    kept = {found[-1], best, *found[-max(keep, 1):]}
    for path in found:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)
