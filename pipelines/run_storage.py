"""Where a run keeps its state, and what a rerun under the same name may change.

Checkpoints live under <storage>/<run name>/ (a local path or a URI pyarrow opens: s3://, gs://...);
the run's config is kept beside them (fldd_config.yaml), so a rerun with the same name is checked
against it before any worker starts: it continues the same run, and only RESUMABLE_CHANGES may
differ."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
import yaml

from fldd.config import ConfigError, FLDDConfig
from fldd.model import CheckpointError

RUN_CONFIG_FILE = "fldd_config.yaml"  # written beside the Ray run, checked on resume
# settings a resumed run may change: how long it trains and how often it logs and checkpoints
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every")


def storage_path(storage: str | None, home: Path) -> str:
    """The checkpoint storage of a run: a URI as given, a local path made absolute
    (default <project home>/ray_results)."""
    if storage and "://" in storage:
        return storage
    return str(Path(storage or home / "ray_results").resolve())


def storage_file_system(storage: str):
    """(pyarrow FileSystem, path inside it) of a storage location: a local path, file://, s3://, gs://..."""
    if "://" not in storage:
        return pyarrow.fs.LocalFileSystem(), str(Path(storage).resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as error:
        raise ConfigError(f"storage={storage!r}: not a path or file system URI pyarrow can open: {error}") from error


def check_resume_config(cfg: FLDDConfig, storage: str, name: str, save: bool = True) -> None:
    """A rerun with the same name continues the same run: only RESUMABLE_CHANGES may differ.
    Anything else (model, data, optimizer settings) is refused here, naming the field, before any
    worker starts or the MLflow run is touched. The config is kept beside the run
    (<storage>/<name>/fldd_config.yaml) through the storage's file system: local and remote alike."""
    fs, root = storage_file_system(storage)
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
