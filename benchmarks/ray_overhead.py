"""Ray Train overhead: steps/second of the same config through Ray Train (1 and 2 CPU workers)
against the bare fldd loop in-process.

Throughput is what the user waits for once training runs: optimizer steps between the first and the
last logged interval divided by the wall-clock time between them, so every callback (MLflow
logging, validation, checkpoints, Ray's reports) is inside it; start-up is excluded and reported
separately as the whole launch's wall time. (The loop's own `steps_per_second` metric leaves the
callbacks out; it is kept in the JSON as `loop_steps_per_s` for comparison.)
Prints a table and writes docs/results/ray_overhead.json.

    python -m benchmarks.ray_overhead [--steps 600] [--config toy2d]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")

import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from fldd.data import load_splits  # noqa: E402
from fldd.train import fit  # noqa: E402
from fldd.config import resolve_config  # noqa: E402
from pipelines.vocabulary import TRAIN_NELBO_METRIC  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "ray_overhead.json"


def steady_rate(history: list[dict]) -> float:
    rates = [h["steps_per_second"] for h in history if "steps_per_second" in h][1:]
    return statistics.median(rates)


def waited_rate(stamps: list[tuple[int, float]]) -> float:
    """Steps per wall-clock second between the first and the last (step, seconds) stamp."""
    if len(stamps) < 2:
        raise ValueError(f"{len(stamps)} logged interval(s): raise --steps to at least twice train.log_every")
    (first_step, first_time), (last_step, last_time) = stamps[0], stamps[-1]
    return (last_step - first_step) / (last_time - first_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy2d")
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=600,
                        help="optimizer steps (--steps: the older spelling)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cfg = resolve_config(args.config).with_overrides(
        {"train.steps": args.train_steps, "train.log_every": 50, "train.checkpoint_every": args.train_steps})
    os.environ["FLDD_HOME"] = tempfile.mkdtemp(prefix="fldd-bench-")

    torch.set_num_threads(1)  # a Ray worker gets one CPU and one thread; compare like with like
    train, valid = load_splits(cfg)
    stamps: list[tuple[int, float]] = []
    bare = fit(cfg, train, valid, eval_passes=1,
               on_metrics=lambda step, metrics: stamps.append((step, time.time())) if TRAIN_NELBO_METRIC in metrics else None)
    rows = [{"setup": "bare loop, in-process (1 thread)", "steps_per_s": waited_rate(stamps),
             "loop_steps_per_s": steady_rate(bare.history)}]
    print(f"{rows[-1]['setup']:<36} {rows[-1]['steps_per_s']:7.1f} steps/s", flush=True)

    from pipelines.train import LaunchOptions, launch  # noqa: E402  (imports Ray)

    for workers in (0, 1, 2):
        start = time.perf_counter()
        outcome = launch(cfg, LaunchOptions(workers=workers, name=f"overhead-{workers}", quiet=True))
        wall = time.perf_counter() - start
        client = MlflowClient(outcome_uri())
        logged = sorted(client.get_metric_history(outcome.run_id, "steps_per_second"), key=lambda m: m.step)
        history = [{"steps_per_second": m.value} for m in logged]
        # MLflow stamps each logged value when the worker logs it (milliseconds)
        stamps = [(m.step, m.timestamp / 1000) for m in logged]
        setup = "Ray Train, local mode (0 workers)" if workers == 0 else f"Ray Train, {workers} CPU worker(s)"
        rows.append({"setup": setup, "steps_per_s": waited_rate(stamps), "loop_steps_per_s": steady_rate(history),
                     "wall_seconds_including_startup": wall})
        print(f"{rows[-1]['setup']:<36} {rows[-1]['steps_per_s']:7.1f} steps/s (wall {wall:.0f} s with start-up)",
              flush=True)
    bare_rate, local, one, two = (r["steps_per_s"] for r in rows)
    rows[1]["ratio_vs_bare"], rows[2]["ratio_vs_bare"] = local / bare_rate, one / bare_rate
    rows[3]["ratio_vs_1_worker"] = two / one
    print(f"\nlocal mode / bare loop: {local / bare_rate:.2f}x; 1 worker / bare loop: {one / bare_rate:.2f}x; "
          f"2 workers / 1 worker: {two / one:.2f}x (global batch {cfg.train.batch_size}, 2 cores)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": f"python -m benchmarks.ray_overhead --train-steps {args.train_steps} "
                                               f"--config {args.config}", "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


def outcome_uri() -> str:
    from pipelines.tracking import tracking_uri
    return tracking_uri()


if __name__ == "__main__":
    main()
