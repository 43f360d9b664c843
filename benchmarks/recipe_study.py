"""Which FLDD training recipe trains reliably? toy2d, T=2, exact metrics, several seeds.

Compares forward initialisations and schedules (spec section 5b) against the fixed masked forward
with the same reverse network and optimizer steps. Selection uses the validation split only.
Prints a markdown table and writes docs/results/recipe_study.json.

    python -m benchmarks.recipe_study [--steps 3000] [--seeds 0 1 2] [--processes 2] [--recipes pilot x30]

Each record keeps its learning curve (`curve`: information retained and training NELBO at every
log step, validation NELBO at 20 evaluations), so a slow start is told apart from a collapse:
    python -m benchmarks.recipe_study --steps 20000 --recipes pilot x30 --out docs/results/slow_start.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

from fldd.config import CONFIG_DIR, FLDDConfig
from fldd.data import load_splits
from fldd.datasets import data_pmf
from fldd.metrics import exact_distribution_metrics
from fldd.train import fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "recipe_study.json"

# Every recipe states its start and schedule in full, so that a change of the toy2d preset's
# defaults (issue 23 made random init the preset's recipe) does not change what a name means.
RANDOM = {"process.warm_start": "none", "process.prior": "uniform"}
MASKED_WARM = {"process.warm_start": "masked", "process.prior": "mask", "process.forward_init_scale": 1.0}
RECIPES = {
    "random init, forward from step 0 (pilot recipe)": {**RANDOM, "train.forward_freeze_fraction": 0.0,
                                                        "train.forward_lr": 1e-3},
    "random init x30, reverse-first 30%": {**RANDOM, "process.forward_init_scale": 30.0,
                                           "train.forward_freeze_fraction": 0.3, "train.forward_lr": 3e-4},
    "masked warm start, exact (zero residual)": {**MASKED_WARM, "process.forward_init_scale": 0.0,
                                                 "train.forward_freeze_fraction": 0.3, "train.forward_lr": 3e-4},
    "masked warm start + random residual (default)": {**MASKED_WARM, "train.forward_freeze_fraction": 0.3,
                                                      "train.forward_lr": 3e-4},
    "fixed masked forward (baseline)": {"process.method": "masked"},
}
SHORT_NAMES = dict(zip(("pilot", "x30", "warm-exact", "warm-default", "masked"), RECIPES))
CURVE_KEYS = ("information_retained_max", "forward_entropy_min", "nelbo", "valid_nelbo_bits")


def run_one(job: tuple[str, int, int, dict]) -> dict:
    name, seed, steps, extra = job
    torch.set_num_threads(1)
    cfg = FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml").with_overrides(
        {**RECIPES[name], **extra, "train.steps": steps, "train.seed": seed, "train.log_every": max(steps // 100, 1),
         "train.eval_every": max(steps // 20, 1)})
    train, valid = load_splits(cfg)
    result = fit(cfg, train, valid)
    curve = [{"step": h["step"], **{k: h[k] for k in CURVE_KEYS if k in h}} for h in result.history]
    exact = exact_distribution_metrics(result.model, data_pmf("toy2d"))
    return {"recipe": name, "seed": seed, "steps": steps, "valid_nelbo_bits": result.valid_nelbo.bits_per_token,
            "kl": exact["kl"], "tv": exact["tv"], "collapsed": bool(result.collapse and result.collapse.collapsed),
            "saturated": bool(result.collapse and result.collapse.saturated),
            "train_seconds": result.train_seconds, "curve": curve}


def _split(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=3000,
                        help="optimizer steps (--steps: the older spelling)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", choices=list(SHORT_NAMES), default=list(SHORT_NAMES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override applied to every recipe (an ablation), e.g. train.grad_clip_mode=per-network")
    args = parser.parse_args()
    chosen = [SHORT_NAMES[short] for short in args.recipes]
    extra = dict(_split(item) for item in args.set)
    jobs = [(name, seed, args.train_steps, extra) for name in chosen for seed in args.seeds]
    records = []
    with ProcessPoolExecutor(args.processes) as pool:
        for i, record in enumerate(pool.map(run_one, jobs), 1):
            records.append(record)
            print(f"[{i}/{len(jobs)}] {record['recipe']} seed {record['seed']}: KL {record['kl']:.4f} "
                  f"NELBO {record['valid_nelbo_bits']:.4f} collapsed={record['collapsed']}", flush=True)
    print(f"\n| recipe | exact KL per seed {args.seeds} | mean KL | valid NELBO (bits/token) | collapsed |")
    print("|---|---|---|---|---|")
    for name in chosen:
        rows = [r for r in records if r["recipe"] == name]
        kls = " / ".join(f"{r['kl']:.4f}" for r in rows)
        nelbo = statistics.mean(r["valid_nelbo_bits"] for r in rows)
        print(f"| {name} | {kls} | {statistics.mean(r['kl'] for r in rows):.4f} | {nelbo:.4f} | "
              f"{sum(r['collapsed'] for r in rows)}/{len(rows)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = (f"python -m benchmarks.recipe_study --train-steps {args.train_steps} --seeds {' '.join(map(str, args.seeds))} "
               f"--recipes {' '.join(args.recipes)} --out {args.out}" + "".join(f" --set {item}" for item in args.set))
    args.out.write_text(json.dumps({"command": command, "records": records}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
