"""A sweep's results: the per-trial CSV, the quality-vs-steps picture (every trial a point, the best
per T joined: the Pareto front over steps and validation NELBO), and the sweep's parent-run summary.
The table printed at the end is `commands/formatting.py:format_table`."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.tracking import Tracker  # noqa: E402
from pipelines.vocabulary import BEST_RUN_TAG, BEST_VALID_METRIC  # noqa: E402


@dataclass
class TrialRow:
    budget: int
    trial_id: str
    status: str  # finished | stopped (early, by the scheduler) | error | collapsed
    parameterization: str
    values: dict[str, Any]
    run_id: str | None = None
    valid_nelbo_bits: float = math.nan  # final: all validation rows x 10 passes (pipelines.reports)
    valid_nelbo_stderr: float = math.nan
    steps_trained: int = 0
    train_seconds: float = math.nan  # the training launch's fit() time, from the MLflow run
    trial_seconds: float = math.nan  # Tune's time_total_s: the whole trial, start-up included
    error: str = ""
    # of the trial's config (trials differing only in `train.seed`); best_per_budget sets them on its rows
    config_mean_valid_nelbo: float = math.nan  # the mean over the config's trials: what selection ranked
    config_trials: int = 1  # trials of the config (one per seed; more when samples > 1 repeats a grid point)


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    rows: list[TrialRow]
    best: dict[int, TrialRow] = field(default_factory=dict)  # per budget, on validation
    wall_seconds: float = 0.0


SEED_KEY = "train.seed"
K = TypeVar("K")


def config_groups(rows: list[TrialRow]) -> dict[tuple[int, str], list[TrialRow]]:
    """Trials by (budget, config): trials whose values differ only in `train.seed` are one config."""
    groups: dict[tuple[int, str], list[TrialRow]] = {}
    for row in rows:
        config = {k: v for k, v in row.values.items() if k != SEED_KEY}
        groups.setdefault((row.budget, json.dumps(config, sort_keys=True, default=str)), []).append(row)
    return groups


def config_mean(group: list[TrialRow]) -> float:
    """The mean final validation NELBO of a config's trials; NaN unless every one of them finished."""
    if any(r.status != "finished" or not math.isfinite(r.valid_nelbo_bits) for r in group):
        return math.nan
    return sum(r.valid_nelbo_bits for r in group) / len(group)


def lowest_mean(scores: Mapping[K, list[float]]) -> K | None:
    """The key whose scores have the lowest mean, among keys whose every score is finite: a seed that
    failed, diverged or collapsed rules its config out, and one lucky seed does not choose a recipe.
    Ties go to the first key; None when no key qualifies. The one selection rule of sweeps and of
    benchmarks/select_then_test.py."""
    means = {key: sum(values) / len(values) for key, values in scores.items()
             if values and all(math.isfinite(v) for v in values)}
    return min(means, key=means.get) if means else None


def best_per_budget(rows: list[TrialRow]) -> dict[int, TrialRow]:
    """Per budget, the config with the lowest final validation NELBO.

    Trials whose values differ only in `train.seed` (or not at all: `samples` > 1 on a grid) are one
    config, ranked by the mean over its trials, and only if every one of them finished (not stopped,
    failed or collapsed): `lowest_mean`. The row returned is that config's best seed (the run a
    promotion registers), carrying the mean it was chosen by. A space without `train.seed` has
    one trial per config, so this is the best finished trial."""
    by_budget: dict[int, dict[str, list[TrialRow]]] = {}
    for (budget, config), group in config_groups(rows).items():
        by_budget.setdefault(budget, {})[config] = group
    best: dict[int, TrialRow] = {}
    for budget, groups in by_budget.items():
        chosen = lowest_mean({config: [r.valid_nelbo_bits if r.status == "finished" else math.nan for r in group]
                              for config, group in groups.items()})
        if chosen is None:
            continue
        group = groups[chosen]
        best[budget] = dataclasses.replace(min(group, key=lambda r: r.valid_nelbo_bits),
                                           config_mean_valid_nelbo=config_mean(group), config_trials=len(group))
    return best


CSV_FIELDS = ("budget", "trial_id", "status", "parameterization", "valid_nelbo_bits", "valid_nelbo_stderr",
              "steps_trained", "train_seconds", "trial_seconds", "run_id", "values", "error",
              "config_mean_valid_nelbo", "config_trials")  # last: files written before them keep their columns


def write_csv(rows: list[TrialRow], path: Path) -> Path:
    """One line per trial. Every row carries its config's `config_mean_valid_nelbo`, the number
    best_per_budget ranks the config by (nan if one of its trials did not finish), and `config_trials`."""
    per_config = {id(row): (config_mean(group), len(group)) for group in config_groups(rows).values() for row in group}
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: (r.budget, r.trial_id)):
            mean, trials = per_config[id(row)]
            record = {k: getattr(row, k) for k in CSV_FIELDS[:-2]}
            record.update(values=json.dumps(row.values, sort_keys=True, default=str),
                          config_mean_valid_nelbo=mean, config_trials=trials)
            writer.writerow(record)
    return path


def plot_front(outcome: SweepOutcome, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    parameterizations = sorted({r.parameterization for r in outcome.rows})
    for index, name in enumerate(parameterizations):
        points = [(r.budget, r.valid_nelbo_bits) for r in outcome.rows
                  if r.parameterization == name and r.status == "finished" and math.isfinite(r.valid_nelbo_bits)]
        if points:
            ax.scatter(*zip(*points), label=name, alpha=0.7, color=f"C{index}")
    front = sorted(outcome.best.items())
    if front:
        ax.plot([T for T, _ in front], [row.config_mean_valid_nelbo for _, row in front], "k--", lw=1,
                label="best per T (mean over trials)" if any(row.config_trials > 1 for _, row in front) else "best per T")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps T")
    ax.set_ylabel("validation NELBO (bits/token)")
    ax.set_title(f"sweep {outcome.name}: quality vs steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_results(outcome: SweepOutcome, parent: Tracker, home: Path) -> Path:
    """Write the CSV and the plot under $FLDD_HOME/sweeps/NAME and attach both to the parent run."""
    directory = home / "sweeps" / outcome.name
    directory.mkdir(parents=True, exist_ok=True)
    for path in (write_csv(outcome.rows, directory / "trials.csv"), plot_front(outcome, directory / "quality_vs_steps.png")):
        parent.log_artifact(path)
    # the number the choice was made on: the mean over seeds where the config ran under several
    metrics = {BEST_VALID_METRIC.format(T=T): row.config_mean_valid_nelbo for T, row in outcome.best.items()}
    parent.log_metrics(0, {**metrics, "trials": len(outcome.rows), "wall_seconds": outcome.wall_seconds,
                           **{f"trials_{status}": sum(r.status == status for r in outcome.rows)
                              for status in ("finished", "stopped", "error", "collapsed")}})
    parent.set_tags({BEST_RUN_TAG.format(T=T): row.run_id for T, row in outcome.best.items()})
    return directory

