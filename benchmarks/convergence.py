"""Validation curves: is the equal-T table's optimizer budget where the methods stop improving?

Trains each (method, T) pair for a long budget with the recipe `select_then_test.py` chose on
validation (read from its results file, so nothing here looks at test data), evaluating the
validation NELBO at 20 points along the way (2 passes each, a generator of its own, so evaluating
does not change training). Prints where each curve has flattened (the first step at which the
smoothed validation NELBO is within `--tolerance` bits of its best) and compares the long run's end
with the table-budget run of the same seed and recipe (its final validation NELBO, from the
recipes file) through the mean of the evaluations over the long run's second half (the plateau).
Evaluations share their random draws across methods and across steps (`fit` seeds every
evaluation the same; before commit 58d758e the seed was the step, as in convergence_toy2d.json),
so the gap between two methods at one T is also given paired, step by step. With shared draws
the plateau mean no longer averages evaluation noise away: it carries the one 2-pass draw's
offset, which the 10-pass table-budget number does not. A long run is not the short run
continued: its reverse-only phase (`train.forward_freeze_fraction`) is a fraction of *its*
length, so read the curve's end, not its value at the table's step count.

    python -m benchmarks.convergence --steps 2 16         # toy2d, 12000 steps: ~23 min on 2 cores
    python -m benchmarks.convergence --report-only        # the summary again, from the results file
    python -m benchmarks.convergence --steps 2 --train-steps 600 --out .fldd/convergence.json   # smoke

Writes docs/results/convergence_<dataset>.json (the curves, the recipe, seeds, split, git commit)
and docs/plots/convergence_<dataset>.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.quality_vs_steps import ROOT, config_for  # noqa: E402
from benchmarks.select_then_test import ALWAYS  # noqa: E402

from fldd.data import load_splits  # noqa: E402
from fldd.train import fit  # noqa: E402
from pipelines.tracking import git_commit  # noqa: E402


def chosen_recipes(path: Path) -> tuple[dict[tuple[str, int], dict], dict]:
    """The recipes select_then_test chose on validation, and its whole record."""
    if not path.is_file():
        raise SystemExit(f"{path}: no recipes; run benchmarks/select_then_test.py first (or give --recipes)")
    record = json.loads(path.read_text())
    return {(c["method"], c["steps"]): {**ALWAYS, c["knob"]: c["value"]} for c in record["choices"]}, record


def table_run_nelbo(record: dict, job: dict, overrides: dict) -> float:
    """The final validation NELBO of the table-budget selection run with this seed and recipe."""
    return next(r["values"]["nelbo_bits"] for r in record["selection_runs"]
                if (r["method"], r["steps"], r["seed"]) == (job["method"], job["steps"], job["seed"])
                and r["overrides"] == overrides)


def curve(job: dict, overrides: dict, train_steps: int) -> dict:
    torch.set_num_threads(1)
    cfg = config_for(job, train_steps, None, {**overrides, "train.eval_every": max(1, train_steps // 20)})
    train, valid = load_splits(cfg)
    start = time.perf_counter()
    result = fit(cfg, train, valid, eval_passes=10)
    points = [(h["step"], h["valid_nelbo_bits"]) for h in result.history if "valid_nelbo_bits" in h]
    return {**job, "overrides": overrides, "train_steps": train_steps, "split": "valid",
            "seconds": time.perf_counter() - start, "curve": points,
            "final_valid_nelbo": result.valid_nelbo.bits_per_token}


def smoothed(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """3-point moving average: each point is a 2-pass estimate with about 0.02 bits of noise on toy2d."""
    values = [v for _, v in points]
    return [(step, sum(values[max(0, i - 1):i + 2]) / len(values[max(0, i - 1):i + 2]))
            for i, (step, _) in enumerate(points)]


def flattened_at(points: list[tuple[int, float]], tolerance: float) -> int:
    """The first step whose smoothed value is within `tolerance` of the smoothed curve's best."""
    curve = smoothed(points)
    best = min(value for _, value in curve)
    return next(step for step, value in curve if value <= best + tolerance)


def paired_gaps(curves: list[dict]) -> list[dict]:
    """Per T, the first method minus the second at the same evaluation steps over the second half."""
    gaps = []
    for T in sorted({c["steps"] for c in curves}):
        pair = [c for c in curves if c["steps"] == T]
        if len(pair) != 2:
            continue
        a, b = (dict(c["curve"]) for c in pair)
        diffs = [a[step] - b[step] for step in sorted(a) if step in b and step >= pair[0]["train_steps"] // 2]
        if len(diffs) > 1:
            gaps.append({"steps": T, "methods": [c["method"] for c in pair], "mean": statistics.mean(diffs),
                         "stderr": statistics.stdev(diffs) / len(diffs) ** 0.5, "points": len(diffs)})
    return gaps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="toy2d")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 16], help="sampling steps T")
    parser.add_argument("--methods", nargs="+", default=["fldd-mask-carry", "masked-x0"])
    parser.add_argument("--seed", type=int, default=0, help="a selection seed: the curves inform a budget choice")
    parser.add_argument("--train-steps", type=int, default=12000)
    parser.add_argument("--tolerance", type=float, default=0.02, help="bits/token from the smoothed curve's best")
    parser.add_argument("--recipes", type=Path, help="default: docs/results/select_then_test_<dataset>.json")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, help="default: docs/results/convergence_<dataset>.json")
    parser.add_argument("--report-only", action="store_true", help="summarise the results file; train nothing")
    args = parser.parse_args(argv)
    recipes, record = chosen_recipes(args.recipes or ROOT / "docs" / "results" / f"select_then_test_{args.dataset}.json")
    protocol = record["protocol"]
    if args.seed not in protocol["selection"]["seeds"]:
        parser.error(f"--seed {args.seed}: use a selection seed of those recipes ({protocol['selection']['seeds']}); "
                     "curves that inform a choice never use report seeds, and the comparison needs the "
                     "table-budget run of the same seed")
    missing = [(m, T) for m in args.methods for T in args.steps if (m, T) not in recipes]
    if missing:
        parser.error(f"no recipe chosen for {missing} in the recipes file (it has {sorted(recipes)})")
    table_steps = protocol["train_steps"]
    jobs = [({"dataset": args.dataset, "method": m, "steps": T, "seed": args.seed}, recipes[(m, T)])
            for m in args.methods for T in args.steps]
    out = args.out or ROOT / "docs" / "results" / f"convergence_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads(out.read_text())
        curves, command, commit = saved["curves"], saved["command"], saved["git_commit"]
    else:
        with ProcessPoolExecutor(args.processes) as pool:
            curves = list(pool.map(curve, *zip(*jobs), [args.train_steps] * len(jobs)))
        command = ("python -m benchmarks.convergence " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        commit = git_commit()
        # the curves first: a summary that fails must not cost the training
        out.write_text(json.dumps({"command": command, "git_commit": commit, "split": "valid", "curves": curves}))
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, c in enumerate(curves):
        steps, values = zip(*c["curve"])
        at = flattened_at(c["curve"], args.tolerance)
        job = {k: c[k] for k in ("dataset", "method", "steps", "seed")}
        for stale in ("smoothed_at_table_budget", "smoothed_last"):
            c.pop(stale, None)
        plateau = [v for step, v in c["curve"] if step >= c["train_steps"] // 2]
        c.update(flattened_at=at, smoothed_best=min(v for _, v in smoothed(c["curve"])), table_budget=table_steps,
                 plateau_mean=statistics.mean(plateau), plateau_point_std=statistics.stdev(plateau),
                 table_run_valid_nelbo=table_run_nelbo(record, job, c["overrides"]))
        final = c.get("final_valid_nelbo")
        print(f"{c['method']} T={c['steps']} seed {c['seed']}: the {table_steps}-step run ended at "
              f"{c['table_run_valid_nelbo']:.4f}; this {c['train_steps']}-step run's second half averages "
              f"{c['plateau_mean']:.4f} ({len(plateau)} evaluations, {c['plateau_point_std']:.3f} apart)"
              + (f", final {final:.4f} (10 passes)" if final is not None else "")
              + f"; within {args.tolerance} of its smoothed best from step {at} ({c['seconds']:.0f} s)", flush=True)
        ax.plot(steps, values, label=f"{c['method']} T={c['steps']}", color=f"C{index}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation NELBO (bits/token)")
    ax.set_title(f"{args.dataset}: validation curves, seed {args.seed}, chosen recipes", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = (ROOT / "docs" / "plots" if args.out is None else out.parent) / f"convergence_{args.dataset}.png"
    fig.savefig(plot, dpi=100)
    gaps = paired_gaps(curves)
    for gap in gaps:
        print(f"T={gap['steps']}: {gap['methods'][0]} minus {gap['methods'][1]}, paired over the second half: "
              f"{gap['mean']:+.4f} +- {gap['stderr']:.4f}", flush=True)
    out.write_text(json.dumps({"command": command, "git_commit": commit, "summarised_at": git_commit(),
                               "split": "valid", "recipes_from": protocol["command"], "tolerance": args.tolerance,
                               "paired_gaps": gaps, "curves": curves}, indent=1))
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main()
