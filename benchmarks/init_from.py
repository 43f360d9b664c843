"""Starting FLDD from a trained baseline (`fldd train --init-from`), against the strongest fixed
forward at equal total optimizer steps. Selection on validation only; test on fresh seeds.

Protocol (binary digits, T=4 by default; every run is an ordinary `fldd train` run in local mode, the
best checkpoint on validation is kept, two runs at a time):
1. baseline: the fixed masked forward with the carry-over reverse (the reverse parameterization of
   `fldd-mask-carry`), N steps;
2. FLDD from it: `fldd-mask-carry --init-from <baseline>`, M more steps, no reverse-only phase;
   its forward learning rate is chosen on the *validation* NELBO of seed 0 from a small grid;
3. the comparison: `masked-x0` (the strongest fixed forward, MDLM's x0 reverse) trained N + M steps,
   its learning rate chosen the same way (seed-0 validation, a grid of the same size).
Seeds 10, 11, 12, which play no part in the choices, are then run with the chosen settings, and every
model is evaluated on the test split (10 passes, evaluation seed 0); the FLDD arm and masked-x0 are
also compared paired (same test examples, same z_t draws).

    python -m benchmarks.init_from --out docs/results/init_from_digits_t4.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLDD = str(Path(sys.executable).parent / "fldd")
SELECTION_SEED, TEST_SEEDS = 0, (10, 11, 12)
CARRY = ["--set", "process.reverse_parameterization=carry-over"]


def run_id_of(name: str, home: Path) -> str:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    from pipelines.vocabulary import EXPERIMENT, RUN_NAME_TAG

    client = MlflowClient(tracking_uri(home))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    return runs[0].info.run_id


def metrics_of(run_id: str, home: Path) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    return dict(MlflowClient(tracking_uri(home)).get_run(run_id).data.metrics)


class Runner:
    def __init__(self, args: argparse.Namespace, home: Path):
        self.args, self.home = args, home
        self.env = {**os.environ, "FLDD_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
        self.log = home / "runs.log"
        self.lock = threading.Lock()

    def train(self, name: str, *extra: str) -> str:
        command = [FLDD, "train", "--config", self.args.config, "--steps", str(self.args.T), "--workers", "0",
                   "--name", name, "--set", f"train.checkpoint_every={self.args.checkpoint_every}",
                   "--set", f"train.log_every={self.args.checkpoint_every}", *extra]
        start = time.perf_counter()
        with self.log.open("a") as log:
            done = subprocess.run(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(command)} exited {done.returncode} (see {self.log})")
        run_id = run_id_of(name, self.home)
        with self.lock:
            print(f"  {name}: run {run_id}, {time.perf_counter() - start:.0f} s", flush=True)
        return run_id

    def test_nelbo(self, run_id: str) -> dict[str, float]:
        done = subprocess.run([FLDD, "evaluate", "--run", run_id, "--split", "test", "--passes", "10", "--seed", "0"],
                              env=self.env, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout)
        return {"test_nelbo_bits": measured["test_nelbo_bits"], "test_nelbo_stderr": measured["test_nelbo_stderr"]}


def paired_differences(rows: list[dict], home: Path, against: str = "masked-x0 (N+M)",
                       candidate: str = "fldd-mask-carry from it (N+M)") -> list[dict]:
    """Per seed: test NELBO of `against` minus `candidate`, paired over the same test examples and the
    same z_t draws (evaluation seed 0, 10 passes), with the standard error of the paired mean."""
    import torch

    from fldd.data import load_test_split
    from fldd.model import FLDDModel
    from fldd.objective import evaluate_nelbo
    from pipelines.gate import Scores, paired_difference
    from pipelines.tracking import download_model_file, tracking_uri

    def scores(run_id: str) -> Scores:
        model = FLDDModel.load(download_model_file(tracking_uri(home), f"runs:/{run_id}/model")[0]).eval()
        test = load_test_split(model.config)
        estimate = evaluate_nelbo(model, test, num_passes=10, generator=torch.Generator().manual_seed(0))
        return Scores(estimate.bits_per_token, estimate.per_example_bits)

    out = []
    for seed in sorted({r["seed"] for r in rows}):
        by_model = {r["model"]: r["run_id"] for r in rows if r["seed"] == seed}
        held, tried = scores(by_model[against]), scores(by_model[candidate])
        mean, stderr = paired_difference(held, tried)  # the registry gate's statistic; > 0: the candidate is better
        examples = held.per_example_bits.numel()
        out.append({"seed": seed, "against": against, "candidate": candidate, "mean_bits": mean,
                    "stderr_bits": stderr, "examples": examples})
        print(f"  seed {seed}: {against} - {candidate} = {mean:+.4f} +- {stderr:.4f} "
              f"bits/token (paired, {examples} test examples)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--baseline-steps", type=int, default=3000, help="N")
    parser.add_argument("--init-steps", type=int, default=2000, help="M")
    parser.add_argument("--forward-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                        help="forward learning rates of the FLDD arm, chosen on seed-0 validation")
    parser.add_argument("--x0-lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3],
                        help="learning rates of the masked-x0 arm, chosen the same way (equal tuning for both)")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--home", type=Path, default=ROOT / ".fldd" / "bench-init-from")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "init_from_digits_t4.json")
    parser.add_argument("--paired-only", action="store_true",
                        help="only (re)compute the paired test differences of the runs recorded in --out")
    args = parser.parse_args()
    if args.paired_only:
        result = json.loads(args.out.read_text())
        result["paired"] = paired_differences(result["rows"], args.home)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    args.home.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, args.home)
    N, M = args.baseline_steps, args.init_steps
    tag = f"{args.config}-T{args.T}"

    def baseline(seed: int) -> str:
        return runner.train(f"{tag}-masked-carry-s{seed}-N{N}", "--method", "masked", *CARRY, "--seed", str(seed),
                            "--train-steps", str(N))

    def from_baseline(seed: int, source: Future, lr: float) -> str:
        return runner.train(f"{tag}-fldd-mask-carry-init-s{seed}-M{M}-flr{lr:g}", "--method", "fldd-mask-carry",
                            "--seed", str(seed), "--train-steps", str(M), "--init-from", f"runs:/{source.result()}/model",
                            "--set", "train.forward_freeze_fraction=0", "--set", f"train.forward_lr={lr}")

    def fixed_x0(seed: int, lr: float) -> str:
        suffix = "" if lr == 1e-3 else f"-lr{lr:g}"  # 1e-3: the config's default learning rate
        return runner.train(f"{tag}-masked-x0-s{seed}-{N + M}{suffix}", "--method", "masked-x0", "--seed", str(seed),
                            "--train-steps", str(N + M), "--set", f"train.lr={lr}")

    # the store exists before two runs open it at once (concurrent SQLite schema creation fails)
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import ensure_experiment, tracking_uri

    ensure_experiment(MlflowClient(tracking_uri(args.home)), args.home)
    start = time.perf_counter()
    print(f"{tag}: baseline N={N}, FLDD from it M={M}, masked-x0 N+M={N + M}; selection seed {SELECTION_SEED}, "
          f"test seeds {TEST_SEEDS}; runs logged to {runner.log}", flush=True)
    # a dependency is submitted before its dependents, and long enough before that a waiting
    # dependent seldom holds one of the two slots idle
    with ThreadPoolExecutor(max_workers=2) as pool:
        base0 = pool.submit(baseline, SELECTION_SEED)
        bases = {seed: pool.submit(baseline, seed) for seed in TEST_SEEDS}
        x0_candidates = {lr: pool.submit(fixed_x0, SELECTION_SEED, lr) for lr in args.x0_lrs}
        candidates = {lr: pool.submit(from_baseline, SELECTION_SEED, base0, lr) for lr in args.forward_lrs}
        # the choices: validation NELBO of seed 0 only, the same way for both arms
        x0_selection = {lr: metrics_of(f.result(), args.home)["final_valid_nelbo_bits"]
                        for lr, f in x0_candidates.items()}
        x0_lr = min(x0_selection, key=x0_selection.get)
        print(f"  masked-x0: chosen lr {x0_lr:g} on validation (seed {SELECTION_SEED}): {x0_selection}", flush=True)
        x0 = {seed: pool.submit(fixed_x0, seed, x0_lr) for seed in TEST_SEEDS}
        selection = {lr: metrics_of(f.result(), args.home)["final_valid_nelbo_bits"] for lr, f in candidates.items()}
        chosen = min(selection, key=selection.get)
        print(f"  FLDD: chosen forward_lr {chosen:g} on validation (seed {SELECTION_SEED}): {selection}", flush=True)
        learned = {seed: pool.submit(from_baseline, seed, bases[seed], chosen) for seed in TEST_SEEDS}
        runs = {seed: {"masked-carry (N)": bases[seed].result(), "fldd-mask-carry from it (N+M)": learned[seed].result(),
                       "masked-x0 (N+M)": x0[seed].result()} for seed in TEST_SEEDS}

    rows = []
    for seed, by_model in runs.items():
        for model, run_id in by_model.items():
            row = {"seed": seed, "model": model, "run_id": run_id,
                   "valid_nelbo_bits": metrics_of(run_id, args.home)["final_valid_nelbo_bits"],
                   **runner.test_nelbo(run_id)}
            rows.append(row)
            print(f"  seed {seed} {model:<30} valid {row['valid_nelbo_bits']:.4f}  test {row['test_nelbo_bits']:.4f} "
                  f"+- {row['test_nelbo_stderr']:.4f}", flush=True)
    paired = paired_differences(rows, args.home)
    result = {
        "command": "python -m benchmarks.init_from " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "home", "paired_only")),
        "protocol": {"config": args.config, "T": args.T, "baseline_steps": N, "init_steps": M,
                     "selection": {"seed": SELECTION_SEED, "split": "valid", "metric": "final_valid_nelbo_bits",
                                   "fldd_forward_lr": selection, "fldd_chosen": chosen,
                                   "masked_x0_lr": x0_selection, "masked_x0_chosen": x0_lr},
                     "test": {"seeds": list(TEST_SEEDS), "split": "test", "passes": 10, "eval_seed": 0}},
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "wall_seconds": time.perf_counter() - start,
        "rows": rows,
        "paired": paired,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
