"""What ASHA saves: the same toy2d search space run as a full grid without early stopping and with
ASHA, each budget its own Tune experiment. Reports, per step budget T, the best validation NELBO
each reaches (with its standard error) and the optimizer steps each spent, and Tune's overhead:
wall time x concurrency against the sum of the trials' own times (Tune's time_total_s).

    python -m benchmarks.sweep_efficiency                 # ~15 min on 2 cores; docs/results/sweep_efficiency.json
    python -m benchmarks.sweep_efficiency --steps 300     # a quick look

Both sweeps run in one local Ray cluster under $FLDD_HOME (default .fldd/bench-sweep-efficiency),
selection on the validation split only, seed 0 for every trial (the grid varies hyperparameters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def space(steps: int, budgets: list[int]) -> dict:
    return {
        "base": "toy2d",
        "set": {"train.steps": steps, "train.checkpoint_every": steps // 10, "train.log_every": steps // 10,
                "train.forward_lr_ref_steps": 0},
        "budgets": budgets,
        "space": {"parameterization": "fldd-mask-carry",
                  "train.forward_lr": {"grid": [3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3]},
                  "train.forward_freeze_fraction": {"grid": [0.1, 0.5]}},
        "samples": 1,
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.9, "max_concurrent_trials": 2},
    }


def summarize(outcome, concurrency: int) -> dict:
    """Per budget: the best validation NELBO and the optimizer steps spent (a stopped trial counts
    the steps of its last report; it may have run a few more before Tune stopped it)."""
    per_budget = {}
    for T in sorted({r.budget for r in outcome.rows}):
        rows = [r for r in outcome.rows if r.budget == T]
        best = outcome.best.get(T)
        per_budget[str(T)] = {
            "best_valid_nelbo_bits": best.valid_nelbo_bits if best else math.nan,
            "best_valid_nelbo_stderr": best.valid_nelbo_stderr if best else math.nan,
            "best_values": best.values if best else {},
            "optimizer_steps": sum(r.steps_trained for r in rows),
            "trials": {s: sum(r.status == s for r in rows) for s in ("finished", "stopped", "error", "collapsed")},
        }
    trial_seconds = sum(r.trial_seconds for r in outcome.rows if math.isfinite(r.trial_seconds))
    return {"per_budget": per_budget, "optimizer_steps": sum(r.steps_trained for r in outcome.rows),
            "wall_seconds": outcome.wall_seconds, "sum_trial_seconds": trial_seconds,
            # > 0: time the sweep spent beyond its trials' own time, at full concurrency
            "tune_overhead": outcome.wall_seconds * concurrency / trial_seconds - 1 if trial_seconds else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=1500,
                        help="optimizer steps per full trial (--steps: the older spelling)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4], help="step budgets T (one experiment each)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "sweep_efficiency.json"))
    args = parser.parse_args()
    os.environ.setdefault("FLDD_HOME", str(ROOT / ".fldd" / "bench-sweep-efficiency"))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    from fldd.config import CONFIG_DIR
    from tune.spec import SweepSpec
    from tune.sweep import run_sweep

    results = {"steps_per_trial": args.train_steps, "space": space(args.train_steps, args.budgets), "date": time.strftime("%Y-%m-%d")}
    for label, scheduler in (("grid", {"type": "fifo"}),
                             ("asha", {"type": "asha", "grace_period": 2, "reduction_factor": 2})):
        spec = SweepSpec.from_dict({**space(args.train_steps, args.budgets), "scheduler": scheduler}, CONFIG_DIR)
        # a fresh name per invocation: a rerun must measure a new sweep, not restore a finished one
        outcome = run_sweep(spec, name=f"efficiency-{label}-{args.train_steps}-{time.strftime('%Y%m%d-%H%M%S')}")
        results[label] = summarize(outcome, spec.resources.max_concurrent_trials)
    grid_steps, asha_steps = results["grid"]["optimizer_steps"], results["asha"]["optimizer_steps"]
    results["asha_step_fraction"] = asha_steps / grid_steps
    for T, grid in results["grid"]["per_budget"].items():  # the same best within two standard errors
        asha = results["asha"]["per_budget"][T]
        noise = 2 * math.hypot(grid["best_valid_nelbo_stderr"], asha["best_valid_nelbo_stderr"])
        asha["within_noise_of_grid"] = abs(asha["best_valid_nelbo_bits"] - grid["best_valid_nelbo_bits"]) <= noise

    print(f"\n{'T':>3} {'grid best (valid bits)':>26} {'ASHA best':>22} {'grid steps':>11} {'ASHA steps':>11}")
    for T, grid in results["grid"]["per_budget"].items():
        asha = results["asha"]["per_budget"][T]
        print(f"{T:>3} {grid['best_valid_nelbo_bits']:>15.4f} +- {grid['best_valid_nelbo_stderr']:.4f} "
              f"{asha['best_valid_nelbo_bits']:>11.4f} +- {asha['best_valid_nelbo_stderr']:.4f} "
              f"{grid['optimizer_steps']:>11} {asha['optimizer_steps']:>11}"
              f"  {'within noise' if asha['within_noise_of_grid'] else 'NOT within noise'}")
    print(f"ASHA spent {results['asha_step_fraction']:.0%} of the grid's optimizer steps; Tune overhead: "
          f"grid {results['grid']['tune_overhead']:.0%}, ASHA {results['asha']['tune_overhead']:.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
