"""Streaming data at scale: train 200 steps with 2 Ray Train workers on generated token tables of
10^5, 10^6 and 10^7 rows, recording the driver's and each worker's peak memory and the steps/second.

The driver must not hold the table: training files stream through Ray Data to the workers, and
validation runs as one Ray task per file. Targets (issue 14): the driver's peak memory at 10^7
rows within 1.2x of 10^5, and throughput within 10% across the three sizes.

Each size runs in a fresh driver process (so one size's peak cannot hide inside another's), on a
fresh local Ray cluster; the tables are generated first, in another process. Memory is peak RSS:
- driver: the driver process's own (getrusage);
- workers: each process named ray::RayTrainWorker, and the largest of Ray Data's processes (read
  tasks, SplitCoordinator), from the kernel's high-water mark (VmHWM) polled every 0.2 s.
Throughput: optimizer steps between the first and the last logged interval over the wall-clock
time between them (every callback inside; start-up excluded).

    python -m benchmarks.data_scale [--rows 100000 1000000 10000000] [--steps 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "data_scale.json"
SEQ_LEN, VOCAB = 32, 64
ROWS_PER_FILE = 1_000_000
VALID_ROWS = 10_000


def generate(directory: Path, rows: int, seed: int = 0) -> None:
    """A split table: train/ as files of at most ROWS_PER_FILE rows, and valid.parquet. Tokens are a
    random walk per row (some structure to learn), uint8 on disk."""
    from fldd.token_table import VOCAB_KEY

    if (directory / "done").is_file():
        return
    rng = np.random.default_rng(seed)
    metadata = {VOCAB_KEY: str(VOCAB).encode()}

    def write(path: Path, count: int) -> None:
        steps = rng.integers(-2, 3, size=(count, SEQ_LEN))
        tokens = (rng.integers(0, VOCAB, size=(count, 1)) + np.cumsum(steps, axis=1)) % VOCAB
        column = pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.uint8).reshape(-1)), SEQ_LEN)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"tokens": column}).replace_schema_metadata(metadata), path,
                       row_group_size=100_000)

    for index, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        write(directory / "train" / f"part-{index:04d}.parquet", min(ROWS_PER_FILE, rows - start))
    write(directory / "valid.parquet", VALID_ROWS)
    (directory / "done").write_text("ok\n")


class PeakSampler(threading.Thread):
    """Peak RSS (MB) of each Ray Train worker and of Ray Data's processes, from the kernel's own
    high-water mark (/proc/PID/status VmHWM), read every 0.2 s while they live."""

    DATA_TITLES = ("ray::ReadFiles", "ray::ReadParquet", "ray::ListFiles", "ray::SplitCoordinator", "ray::_check_file")

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.workers: dict[int, float] = {}
        self.data = 0.0
        self.stopped = threading.Event()

    @staticmethod
    def _read(pid: str) -> tuple[str, float]:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # the process ended
            return "", 0.0
        peak = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
        return title, int(peak) / 1024

    def run(self) -> None:
        while not self.stopped.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                title, peak = self._read(pid)
                if title.startswith("ray::RayTrainWorker"):
                    self.workers[int(pid)] = max(self.workers.get(int(pid), 0.0), peak)
                elif title.startswith(self.DATA_TITLES):
                    self.data = max(self.data, peak)
            time.sleep(self.interval)


def child(data_dir: str, steps: int, workers: int, home: str) -> dict:
    """One size, in this (fresh) driver process: launch the real `fldd train` path."""
    os.environ["FLDD_HOME"] = home
    sampler = PeakSampler()
    sampler.start()
    from mlflow.tracking import MlflowClient

    from fldd.config import CONFIG_DIR, FLDDConfig
    from pipelines.train import LaunchOptions, launch
    from pipelines.tracking import tracking_uri
    from pipelines.vocabulary import TRAIN_NELBO_METRIC, VALID_NELBO_METRIC

    cfg = FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml").with_overrides({
        "data.path": data_dir, "train.steps": steps, "train.log_every": 25, "train.checkpoint_every": steps,
        "train.eval_every": 0, "process.method": "masked", "process.reverse_parameterization": "x0"})
    start = time.perf_counter()
    outcome = launch(cfg, LaunchOptions(workers=workers, name=f"scale-{Path(data_dir).name}", quiet=True))
    wall = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    history = MlflowClient(tracking_uri()).get_metric_history(outcome.run_id, TRAIN_NELBO_METRIC)
    logged = sorted((m.step, m.timestamp / 1000) for m in history)
    (first_step, first_time), (last_step, last_time) = logged[0], logged[-1]
    return {"driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mb": sorted(sampler.workers.values()),
            "ray_data_process_peak_rss_mb": sampler.data,
            "steps_per_s": (last_step - first_step) / (last_time - first_time),
            "launch_wall_s": wall, "valid_nelbo_bits": outcome.metrics[VALID_NELBO_METRIC]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=200,
                        help="optimizer steps (--steps: the older spelling)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "fldd-data-scale"),
                        help="where the generated tables are kept (reused across runs)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs=2, metavar=("DATA_DIR", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.train_steps, args.workers, args.child[1])), flush=True)
        return

    results = []
    for rows in args.rows:
        directory = Path(args.data_dir) / f"rows-{rows}"
        clock = time.perf_counter()
        # a fresh process, so that the generator's memory is not counted in the run's (cwd: the repo
        # root, where `benchmarks` is importable)
        subprocess.run([sys.executable, "-c", f"from benchmarks.data_scale import generate; from pathlib import Path; "
                        f"generate(Path({str(directory)!r}), {rows})"], check=True, cwd=ROOT)
        print(f"{rows:>10,} rows: table ready in {time.perf_counter() - clock:.0f} s "
              f"({sum(f.stat().st_size for f in directory.rglob('*.parquet')) / 2**20:.0f} MB on disk)", flush=True)
        with tempfile.TemporaryDirectory(prefix="fldd-scale-home-") as home:
            done = subprocess.run([sys.executable, "-m", "benchmarks.data_scale", "--child", str(directory), home,
                                   "--train-steps", str(args.train_steps),
                                   "--workers", str(args.workers)], capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"the run on {rows} rows failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        result = {"rows": rows, **json.loads(lines[-1][len("RESULT "):])}
        results.append(result)
        print(f"{rows:>10,} rows: driver peak {result['driver_peak_rss_mb']:.0f} MB, workers "
              f"{', '.join(f'{m:.0f}' for m in result['worker_peak_rss_mb'])} MB, Ray Data processes "
              f"{result['ray_data_process_peak_rss_mb']:.0f} MB, {result['steps_per_s']:.2f} steps/s", flush=True)

    smallest, largest = results[0], results[-1]
    rates = [r["steps_per_s"] for r in results]
    summary = {
        "driver_peak_ratio_largest_vs_smallest": largest["driver_peak_rss_mb"] / smallest["driver_peak_rss_mb"],
        "throughput_spread": (max(rates) - min(rates)) / max(rates),
    }
    summary["targets"] = {"driver_peak_within_1.2x": summary["driver_peak_ratio_largest_vs_smallest"] <= 1.2,
                          "throughput_within_10pct": summary["throughput_spread"] <= 0.10}
    print(json.dumps(summary, indent=2))
    from pipelines.tracking import git_commit

    payload = {"command": "python -m benchmarks.data_scale " + " ".join(sys.argv[1:]), "git_commit": git_commit(),
               "seq_len": SEQ_LEN, "vocab_size": VOCAB, "steps": args.train_steps, "workers": args.workers,
               "cpu_count": os.cpu_count(), "results": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
