"""Training and sampling speed: FLDD against the fixed masked forward, same reverse network and batch.

Sequence task shape from the core-library issue: D=64, K=27 (text8-like), transformer width 128,
depth 4. Tokens are random: speed does not depend on the data. Prints a table and writes
docs/results/speed.json.

    python benchmarks/speed.py [--batch 64] [--steps 30] [--T 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fldd.config import FLDDConfig
from fldd.model import FLDDModel
from fldd.sampler import sample
from fldd.train import TrainSchedule, build_optimizer, train_loop

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "speed.json"

VARIANTS = {
    "masked": {"process.method": "masked"},
    "fldd (loo, M=2)": {"process.method": "fldd", "train.estimator": "loo", "train.num_zt_samples": 2},
    "fldd (ema)": {"process.method": "fldd", "train.estimator": "ema", "train.num_zt_samples": 1},
    "fldd-mask (loo, M=2)": {"process.method": "fldd-mask", "train.estimator": "loo", "train.num_zt_samples": 2},
}


def make_config(overrides: dict, args: argparse.Namespace) -> FLDDConfig:
    net = {"arch": "transformer", "width": 128, "depth": 4, "heads": 4}
    base = {f"{which}.{k}": v for which in ("reverse_network", "forward_network") for k, v in net.items()}
    return FLDDConfig(seq_len=64, vocab_size=27).with_overrides(
        {**base, "process.num_steps": args.T, "train.batch_size": args.batch, "train.steps": args.steps,
         "data.name": "random", **overrides})


def time_training(cfg: FLDDConfig, args: argparse.Namespace) -> float:
    """Median seconds per optimizer step over `repeats` timed blocks (after a warm-up block)."""
    torch.manual_seed(0)
    model = FLDDModel(cfg)
    optimizer = build_optimizer(model, cfg.train)
    x_per_step = cfg.train.batch_size // model.samples_per_x
    data = torch.randint(0, cfg.vocab_size, (x_per_step, cfg.seq_len))
    batches = iter(lambda: data, None)
    schedule = TrainSchedule(cfg.train, cfg.learns_forward)
    block = args.steps
    train_loop(model, batches, optimizer, num_steps=3, schedule=schedule, log_every=10**9)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        train_loop(model, batches, optimizer, num_steps=block, schedule=schedule, log_every=10**9)
        times.append((time.perf_counter() - start) / block)
    return statistics.median(times)


def time_sampling(cfg: FLDDConfig, args: argparse.Namespace) -> float:
    """Median samples per second of the T-step sampler."""
    torch.manual_seed(0)
    model = FLDDModel(cfg).eval()
    sample(model, 16, generator=torch.Generator().manual_seed(0))  # warm-up
    rates = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        sample(model, args.num_samples, generator=torch.Generator().manual_seed(repeat), batch_size=args.num_samples)
        rates.append(args.num_samples / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="reverse-network batch per step")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    parser.add_argument("--T", type=int, default=8, help="sampling steps")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, overrides in VARIANTS.items():
        cfg = make_config(overrides, args)
        step_seconds = time_training(cfg, args)
        rate = time_sampling(cfg, args)
        rows.append({"variant": name, "train_step_ms": 1000 * step_seconds, "train_steps_per_s": 1 / step_seconds,
                     "samples_per_s": rate})
        print(f"{name:<22} train {1000 * step_seconds:7.1f} ms/step   sample {rate:8.1f} samples/s (T={args.T})",
              flush=True)
    masked = rows[0]
    for row in rows:
        row["train_cost_vs_masked"] = row["train_step_ms"] / masked["train_step_ms"]
        row["sampling_speed_vs_masked"] = row["samples_per_s"] / masked["samples_per_s"]
    print(f"\n{'variant':<22} {'train cost / masked':>20} {'sampling speed / masked':>24}")
    for row in rows:
        print(f"{row['variant']:<22} {row['train_cost_vs_masked']:>20.2f} {row['sampling_speed_vs_masked']:>24.2f}")
    result = {
        "command": "python benchmarks/speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "setup": {"seq_len": 64, "vocab_size": 27, "arch": "transformer", "width": 128, "depth": 4,
                  "batch": args.batch, "T": args.T, "threads": args.threads, "torch": torch.__version__,
                  "machine": platform.machine(), "processor": platform.processor() or "unknown"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
