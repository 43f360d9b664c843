"""The `fldd` command line: thin commands over plain functions.

Embedded defaults: a local Ray cluster started on demand (RAY_ADDRESS / --address joins an
existing one), MLflow in SQLite under the project home `$FLDD_HOME` (default ./.fldd;
MLFLOW_TRACKING_URI overrides), checkpoints under $FLDD_HOME/ray_results (--storage overrides).

What imports Ray, MLflow or matplotlib (pipelines' training, tracking, registry and reports, tune,
serving) is imported inside the command that needs it (`# lazy: start-up time`): `fldd --help`
and a mistyped command answer without loading them.

The commands live beside their arguments, one module per group: model_commands (train, evaluate,
sample), data_commands (data prepare, data inspect), release_commands (demo, sweep, promote,
models, serve). This module builds the parser from them and runs one command.
"""

from __future__ import annotations

import argparse
import os
import sys

from commands import data_commands, model_commands, release_commands
from fldd.codec import CodecError
from fldd.config import ConfigError
from fldd.data import DataError
from fldd.model import CheckpointError
from fldd.molecules import MissingExtra
from fldd.train import NonFiniteLossError
from pipelines.logs import quiet_logs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fldd", description="Forward-Learned Discrete Diffusion: train (Ray Train + MLflow), evaluate and "
        "sample few-step discrete generators.",
        epilog="Project home: $FLDD_HOME (default ./.fldd) holds mlflow.db, checkpoints and run outputs.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_commands.add_parsers(sub)
    data_commands.add_parsers(sub)
    release_commands.add_parsers(sub)
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true",
                             help="show Ray's and MLflow's INFO logs, Tune's tables and every worker's output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logs(args.verbose)
    if not args.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Train/Tune status tables on the driver
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny download
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # MLflow resolves some URIs (LoggedModels, registry sources) through its process-wide store
    # whatever client is used: point that at the project's store too, never at ./mlflow.db
    from pipelines.tracking import tracking_uri  # lazy: start-up time

    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, CodecError, FileNotFoundError, MissingExtra) as error:
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        print(f"fldd {command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # training failures: one clear line, details above in the log
        from mlflow.exceptions import MlflowException  # lazy: start-up time

        from pipelines.tracking import TrackingUnavailable  # lazy: start-up time
        from pipelines.train import TrainingError  # lazy: start-up time
        from tune.sweep import SweepError  # lazy: start-up time

        if isinstance(error, (TrainingError, NonFiniteLossError, MlflowException, SweepError, TrackingUnavailable)):
            print(f"fldd {args.command}: error: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
