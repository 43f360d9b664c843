"""What the commands print: a promotion decision, the registry's versions, a sweep's table.
Formatting lives here, on top, so that the layers below return data and never text for a terminal."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: `fldd --help` must not load MLflow or matplotlib
    from pipelines.gate import Decision
    from pipelines.model_store import ModelRow
    from tune.results import SweepOutcome


def format_decision(decision: Decision) -> str:
    """A decision and the numbers it was taken on, as `fldd promote` prints it."""
    where = (f"{decision.model_name} version {decision.version}" if decision.version
             else f"{decision.model_name} (not registered)")
    lines = [f"{decision.decision.upper()}: run {decision.run_id} at T={decision.budget} -> {where}",
             f"  reason: {decision.reason}"]
    if math.isfinite(decision.valid_bits):
        lines.append(f"  validation NELBO (run):  {decision.valid_bits:.4f} bits/token")
    if decision.test_examples:
        lines.append(f"  test NELBO, candidate:   {decision.candidate_test_bits:.4f} +- "
                     f"{decision.candidate_test_stderr:.4f}"
                     f" bits/token ({decision.test_examples} examples)")
    if decision.holder_version is not None and decision.test_examples:
        lines.append(f"  test NELBO, holder v{decision.holder_version}: {decision.holder_test_bits:.4f} bits/token")
        lines.append(f"  paired difference (holder - candidate): {decision.difference_bits:+.4f} +- "
                     f"{decision.difference_stderr:.4f}; margin {decision.margin_bits:.4f} ({decision.margin_rule})")
    if decision.aliases_moved:
        lines.append(f"  aliases moved: {', '.join(decision.aliases_moved)}")
    return "\n".join(lines)


def format_models(rows: list[ModelRow]) -> str:
    """`fldd models`: one line per version."""
    header = ("model", "ver", "aliases", "T", "parameterization", "dataset", "valid bits", "test bits", "decision",
              "run")
    table = [header] + [(r.name, r.version, ",".join(r.aliases) or "-", r.budget, r.parameterization, r.dataset,
                         r.valid_bits, r.test_bits, r.decision, r.run_id) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def format_table(outcome: SweepOutcome) -> str:
    """Per T: the best trial on validation, its metric, its MLflow run; and how many trials ran."""
    lines = [f"{'T':>4}  {'best parameterization':<22} {'valid NELBO bits/token':>24}  {'trials (done/stopped/failed)':>28}"
             f"  MLflow run"]
    for T in sorted({r.budget for r in outcome.rows}):
        rows = [r for r in outcome.rows if r.budget == T]
        counts = "/".join(str(sum(r.status == s for r in rows)) for s in ("finished", "stopped", "error"))
        best = outcome.best.get(T)
        if best is None:
            lines.append(f"{T:>4}  {'(no finished trial)':<22} {'':>24}  {counts:>28}")
            continue
        metric = f"{best.valid_nelbo_bits:.4f} +- {best.valid_nelbo_stderr:.4f}"
        if best.config_trials > 1:  # ranked by the mean over its trials; the row is its best one
            metric = f"{best.config_mean_valid_nelbo:.4f} (mean of {best.config_trials} trials)"
        lines.append(f"{T:>4}  {best.parameterization:<22} {metric:>24}  {counts:>28}  {best.run_id}")
    failed = [r for r in outcome.rows if r.status == "error"]
    for row in failed:
        lines.append(f"  failed: T={row.budget} trial {row.trial_id} ({row.parameterization}): {row.error}")
    return "\n".join(lines)
