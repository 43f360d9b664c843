"""Training and sampling speed: FLDD against the fixed masked forward, same reverse network and batch.

Sequence task shape from the core-library issue: D=64, K=27 (text8-like), transformer width 128,
depth 4 (the adaLN transformer of fldd/networks.py). Tokens are random: speed does not depend on the
data. Every timed step is a steady-state joint step (forward and reverse both trained: no reverse-only
phase, no relaxed warm-up). Prints a table and writes docs/results/speed.json.

    python -m benchmarks.speed [--batch 64] [--steps 30] [--T 8] [--threads 2]
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
    "masked-x0": {"process.method": "masked", "process.reverse_parameterization": "x0"},
    "fldd (loo, M=2)": {"process.method": "fldd", "train.estimator": "loo", "train.num_zt_samples": 2},
    "fldd (ema)": {"process.method": "fldd", "train.estimator": "ema", "train.num_zt_samples": 1},
    "fldd-mask (loo, M=2)": {"process.method": "fldd-mask", "train.estimator": "loo", "train.num_zt_samples": 2},
    "fldd-mask-carry (loo, M=2)": {"process.method": "fldd-mask", "process.reverse_parameterization": "carry-over",
                                   "train.estimator": "loo", "train.num_zt_samples": 2},
}


def make_config(overrides: dict, args: argparse.Namespace) -> FLDDConfig:
    net = {"arch": "transformer", "width": 128, "depth": 4, "heads": 4}
    base = {f"{which}.{k}": v for which in ("reverse_network", "forward_network") for k, v in net.items()}
    return FLDDConfig(seq_len=64, vocab_size=27).with_overrides(
        {**base, "process.num_steps": args.T, "train.batch_size": args.batch, "train.steps": args.train_steps,
         "data.name": "random",
         # every timed step is a steady-state joint step: no reverse-only phase (the forward frozen,
         # FLDD's cost understated) and no relaxed warm-up
         "train.forward_freeze_fraction": 0.0, "train.concrete_warmup_steps": 0, **overrides})


class Variant:
    """One model + optimizer, timed in blocks interleaved with the other variants (drift cancels)."""

    def __init__(self, cfg: FLDDConfig):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = FLDDModel(cfg)
        self.optimizer = build_optimizer(self.model, cfg.train)
        data = torch.randint(0, cfg.vocab_size, (cfg.rows_per_micro_batch(), cfg.seq_len))
        self.batches = iter(lambda: data, None)
        self.schedule = TrainSchedule(cfg.train, cfg.learns_forward)
        self.step_seconds: list[float] = []
        self.sample_rates: list[float] = []

    def time_training(self, steps: int) -> None:
        start = time.perf_counter()
        train_loop(self.model, self.batches, self.optimizer, num_steps=steps, schedule=self.schedule,
                   log_every=10**9)
        self.step_seconds.append((time.perf_counter() - start) / steps)

    def time_sampling(self, num_samples: int, seed: int) -> None:
        start = time.perf_counter()
        sample(self.model, num_samples, generator=torch.Generator().manual_seed(seed), batch_size=num_samples)
        self.sample_rates.append(num_samples / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="reverse-network batch per step")
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=20,
                        help="optimizer steps per timed block (--steps: the older spelling)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--T", type=int, default=8, help="sampling steps")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {name: Variant(make_config(overrides, args)) for name, overrides in VARIANTS.items()}
    for variant in variants.values():  # warm-up
        variant.time_training(3)
        variant.time_sampling(16, seed=0)
    for repeat in range(args.repeats):
        for variant in variants.values():
            variant.time_training(args.train_steps)
            variant.time_sampling(args.num_samples, seed=repeat)
        print(f"round {repeat + 1}/{args.repeats} done", flush=True)
    rows = []
    for name, variant in variants.items():
        step_seconds = statistics.median(variant.step_seconds)
        rate = statistics.median(variant.sample_rates)
        rows.append({"variant": name, "train_step_ms": 1000 * step_seconds, "train_steps_per_s": 1 / step_seconds,
                     "samples_per_s": rate})
        print(f"{name:<22} train {1000 * step_seconds:7.1f} ms/step   sample {rate:8.1f} samples/s (T={args.T})")
    masked = rows[0]
    for row in rows:
        row["train_cost_vs_masked"] = row["train_step_ms"] / masked["train_step_ms"]
        row["sampling_speed_vs_masked"] = row["samples_per_s"] / masked["samples_per_s"]
    print(f"\n{'variant':<22} {'train cost / masked':>20} {'sampling speed / masked':>24}")
    for row in rows:
        print(f"{row['variant']:<22} {row['train_cost_vs_masked']:>20.2f} {row['sampling_speed_vs_masked']:>24.2f}")
    result = {
        "command": "python -m benchmarks.speed " + " ".join(
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
