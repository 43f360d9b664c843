"""What the commands print: a promotion decision, the registry's versions, a sweep's table.
Formatting lives here, on top, so that the layers below return data and never text for a terminal."""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

from fldd.inspection import category_label

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
              "run") + (("test scores",) if any(r.test_scores != "-" for r in rows) else ())
    table = [header] + [(r.name, r.version, ",".join(r.aliases) or "-", r.budget, r.parameterization, r.dataset,
                         r.valid_bits, r.test_bits, r.decision, r.run_id, r.test_scores)[:len(header)] for r in rows]
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


def format_inspect(report: dict[str, Any]) -> str:
    """The inspect report for people."""
    lines = [report["path"]]
    prepared = report.get("prepared")
    if prepared:
        lines[0] += (f"  (fldd data prepare: {len(prepared.get('sources', []))} {prepared.get('kind', '?')} file(s), "
                     f"seed {prepared.get('seed')}, {prepared.get('tokens_dropped', 0):,} tokens dropped)")
    width = max(len(t["split"]) for t in report["tables"])
    for table in report["tables"]:
        files = table["files"][0] if len(table["files"]) == 1 else \
            f"{len(table['files'])} files in {common_folder(table['files'])}"
        lines.append(f"  {table['split']:<{width}}  {table['rows']:>10,} rows  {table['row_groups']:>4} row group(s)"
                     f"  {files}")
    codec = report["codec"]
    if codec is None:
        what = "none (token ids only)"
    elif codec["kind"] == "chars":
        alphabet = codec["alphabet"]
        what = f"chars, {len(alphabet)} symbols: " + (repr(alphabet) if len(alphabet) <= 120
                                                         else repr(alphabet[:120]) + " ...")
    elif codec["kind"] == "bytes":
        what = "bytes (UTF-8 text)"
    elif codec["kind"] == "smiles":
        what = f"smiles, {len(codec['symbols'])} symbols (token 0 the padding): {' '.join(codec['symbols'][1:])}"
    else:
        what = f"columns {codec['columns']}"
    lines.append(f"  sequence length {report['seq_len']}; vocabulary size {report['vocab_size']} "
                 f"(from {report['vocab_from']})")
    lines.append(f"  codec: {what}")
    lines.append(f"  {report['tokens']:,} tokens, {report['distinct_tokens']} distinct; "
                 f"top {len(report['histogram'])}:")
    for entry in report["histogram"]:
        symbol_ = entry["symbol"]
        shown = "" if symbol_ is None else f"  {symbol_}" if codec["kind"] == "columns" else f"  {symbol_!r}"
        lines.append(f"    {entry['token']:>6}  {entry['count']:>12,}  {100 * entry['share']:5.1f}%{shown}")
    for entry in report.get("columns", []):
        top = ", ".join(f"{category_label(t['category']) if t['category'] is not None else '<invalid>'} "
                        f"{100 * t['share']:.0f}%" for t in entry["top"])
        lines.append(f"    column {entry['column']!r}: {entry['used']} of {entry['categories']} categories used; "
                     f"top: {top}")
    if report["duplicates"]:
        parts = [f"{split} {d['copies_of_train_rows']:,} of {d['rows']:,} rows"
                 for split, d in report["duplicates"].items()]
        lines.append(f"  exact copies of a train row: {'; '.join(parts)}")
    elif not any(t["split"] == "train" for t in report["tables"]):
        lines.append("  exact copies of a train row: not checked (no train split)")
    lines.append("  examples:")
    for entry in report["examples"]:
        shown = entry.get("decoded", entry["tokens"]) if report["codec"] else entry["tokens"]
        if isinstance(shown, dict):
            shown = json.dumps(shown, ensure_ascii=False)
        elif isinstance(shown, str):
            shown = repr(shown)
        else:
            shown = " ".join(map(str, shown))
        several = any(t["split"] == entry["split"] and len(t["files"]) > 1 for t in report["tables"])
        where = f" {entry['file'].rsplit('/', 1)[-1]}" if several and entry.get("file") else ""
        lines.append(f"    {entry['split']}{where} row {entry['row']}: {shown}")
    for problem in report["problems"]:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)


def common_folder(names: list[str]) -> str:
    common = os.path.commonprefix(names)
    return common[:common.rfind("/") + 1] or "."
