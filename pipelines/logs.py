"""What reaches the terminal: our progress bars and results, warnings and errors that matter; not
Ray's, Serve's and MLflow's INFO lines (`--verbose` brings them back)."""

from __future__ import annotations

import importlib
import logging
import re
import warnings

# Loggers whose INFO lines are progress reports of their own (cluster start, Serve deploys, MLflow
# schema upgrades, Tune's result files): ours replace them unless --verbose
CHATTY_LOGGERS = ("ray", "ray.serve", "ray.tune", "ray.train", "ray.data", "mlflow", "alembic")
# warnings that are expected on the embedded defaults and say nothing a user can act on
HARMLESS = ("Token authentication is enabled for this Ray cluster",  # our own local cluster
            "Add type hints to the `predict` method")  # MLflow's advice about its pyfunc wrapper


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in HARMLESS)


_quiet = False


def quiet_logs(verbose: bool) -> None:
    """Keep Ray's and MLflow's INFO lines and known-harmless warnings off the terminal; warnings
    and errors that matter still reach it. `requiet()` applies it again after Ray Serve, which sets
    its driver logger up when it starts, has done so."""
    global _quiet
    _quiet = not verbose
    if verbose:
        return
    for package in ("mlflow", "ray"):  # both configure their loggers on import: set ours after
        importlib.import_module(package)

    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        for handler in logger.handlers:
            if not any(isinstance(f, _DropHarmless) for f in handler.filters):
                handler.addFilter(_DropHarmless())
    for text in HARMLESS:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")


def requiet() -> None:
    if _quiet:
        quiet_logs(verbose=False)
