"""Validation curves: is the equal-T table's optimizer budget where the methods stop improving?

Trains each (method, T) pair for a long budget with the recipe `select_then_test.py` chose on
validation (read from its results file, so nothing here looks at test data), evaluating the
validation NELBO at 20 points along the way (2 passes each, a generator of its own, so evaluating
does not change training). Prints where each curve has flattened: the first step at which the
validation NELBO is within `--tolerance` bits of the curve's best.

    python benchmarks/convergence.py                      # toy2d, T in {2, 8}, 12000 steps: ~20 min on 2 cores
    python benchmarks/convergence.py --steps 2 --train-steps 600 --out .fldd/convergence.json   # smoke

Writes docs/results/convergence_<dataset>.json (the curves, the recipe, seeds, split, git commit)
and docs/plots/convergence_<dataset>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_vs_steps import ROOT, config_for  # noqa: E402
from select_then_test import ALWAYS, git_commit  # noqa: E402

from fldd.data import load_splits  # noqa: E402
from fldd.train import fit  # noqa: E402


def chosen_recipes(path: Path) -> dict[tuple[str, int], dict]:
    record = json.loads(path.read_text())
    return {(c["method"], c["steps"]): {**ALWAYS, c["knob"]: c["value"]} for c in record["choices"]}


def curve(job: dict, overrides: dict, train_steps: int) -> dict:
    torch.set_num_threads(1)
    cfg = config_for(job, train_steps, None, {**overrides, "train.eval_every": max(1, train_steps // 20)})
    train, valid = load_splits(cfg)
    start = time.perf_counter()
    result = fit(cfg, train, valid, eval_passes=1)
    points = [(h["step"], h["valid_nelbo_bits"]) for h in result.history if "valid_nelbo_bits" in h]
    return {**job, "overrides": overrides, "train_steps": train_steps, "split": "valid",
            "seconds": time.perf_counter() - start, "curve": points}


def flattened_at(points: list[tuple[int, float]], tolerance: float) -> int:
    """The first step whose 3-point moving average is within `tolerance` of the smoothed curve's best
    (each point is a 2-pass estimate with about 0.02 bits of noise on toy2d)."""
    values = [v for _, v in points]
    smoothed = [sum(values[max(0, i - 1):i + 2]) / len(values[max(0, i - 1):i + 2]) for i in range(len(values))]
    best = min(smoothed)
    return next(step for (step, _), value in zip(points, smoothed) if value <= best + tolerance)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="toy2d")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8], help="sampling steps T")
    parser.add_argument("--methods", nargs="+", default=["fldd-mask-carry", "masked-x0"])
    parser.add_argument("--seed", type=int, default=0, help="a selection seed: the curves inform a budget choice")
    parser.add_argument("--train-steps", type=int, default=12000)
    parser.add_argument("--tolerance", type=float, default=0.01, help="bits/token from the smoothed curve's best")
    parser.add_argument("--recipes", type=Path, help="default: docs/results/select_then_test_<dataset>.json")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, help="default: docs/results/convergence_<dataset>.json")
    args = parser.parse_args(argv)
    recipes = chosen_recipes(args.recipes or ROOT / "docs" / "results" / f"select_then_test_{args.dataset}.json")
    jobs = [({"dataset": args.dataset, "method": m, "steps": T, "seed": args.seed}, recipes[(m, T)])
            for m in args.methods for T in args.steps]
    with ProcessPoolExecutor(args.processes) as pool:
        curves = list(pool.map(curve, *zip(*jobs), [args.train_steps] * len(jobs)))
    out = args.out or ROOT / "docs" / "results" / f"convergence_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps({"command": command, "git_commit": git_commit(), "tolerance": args.tolerance,
                               "curves": curves}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, c in enumerate(curves):
        steps, values = zip(*c["curve"])
        at = flattened_at(c["curve"], args.tolerance)
        print(f"{c['method']} T={c['steps']} seed {c['seed']}: best valid NELBO {min(values):.4f}, within "
              f"{args.tolerance} of it from step {at}; at 3000: {dict(c['curve']).get(3000, float('nan')):.4f}; "
              f"last {values[-1]:.4f} ({c['seconds']:.0f} s)", flush=True)
        ax.plot(steps, values, label=f"{c['method']} T={c['steps']}", color=f"C{index}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation NELBO (bits/token)")
    ax.set_title(f"{args.dataset}: validation curves, seed {args.seed}, chosen recipes", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = (ROOT / "docs" / "plots" if args.out is None else out.parent) / f"convergence_{args.dataset}.png"
    fig.savefig(plot, dpi=100)
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main()
