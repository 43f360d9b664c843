"""How far one optimizer step moves the learned forward's marginals, from random initialisation.

The spec's pilot recipe (random init, forward trained from step 0 at the reverse's learning rate)
on each shipped architecture: toy2d (MLP), binary digits (MLP), mini-text8 (transformer). Per
optimizer step it records the RMS change of log u(x,t) over a fixed probe batch and the interior
steps, the part of it that is the same for every x, the mean entropy of u(x,t) (0: a one-hot, dead
softmax) and the forward's gradient norm. This is the measurement behind docs/method.md, "How fast
a step moves u"; tests/fldd/test_forward_dynamics.py holds its outcome.

    python -m benchmarks.forward_dynamics [--steps 100] [--datasets toy2d digits text] [--out docs/results/forward_dynamics.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fldd.config import CONFIG_DIR, FLDDConfig
from fldd.data import infinite_batches, load_splits, resolve_data_shape
from fldd.model import FLDDModel
from fldd.train import build_optimizer, clip_gradients

ROOT = Path(__file__).resolve().parent.parent
PILOT = {"process.method": "fldd", "process.warm_start": "none", "process.prior": "uniform",
         "train.forward_freeze_fraction": 0.0, "train.forward_lr": 1e-3, "train.forward_lr_ref_steps": 0}


def measure(preset: str, steps: int, seed: int, probe_rows: int = 256) -> dict:
    """The pilot recipe on a preset for `steps` optimizer steps; per-step records and their summary."""
    cfg = resolve_data_shape(FLDDConfig.from_yaml(CONFIG_DIR / f"{preset}.yaml").with_overrides(
        {**PILOT, "train.seed": seed, "data.num_train": 20000}))[0]
    train, valid = load_splits(cfg)
    torch.manual_seed(seed)
    model = FLDDModel(cfg)
    optimizer = build_optimizer(model, cfg.train)
    batches = infinite_batches(train, cfg.rows_per_micro_batch(), torch.Generator().manual_seed(seed))
    probe, T = valid[:probe_rows], cfg.process.num_steps
    interior = torch.arange(1, T).repeat(len(probe), 1)

    def log_u() -> torch.Tensor:
        with torch.no_grad():
            return model.forward_process.log_marginals(probe, interior)  # (B, T-1, D, S)

    records, before = [], log_u()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        model(next(batches))["loss"].backward()
        norms = clip_gradients(optimizer, cfg.train.grad_clip, cfg.train.grad_clip_mode)
        optimizer.step()
        after = log_u()
        change = after - before
        entropy = -(after.exp() * after).sum(-1).mean(dim=(0, 2)) / math.log(2)  # per interior t
        records.append({"step": step, "rms_change": change.pow(2).mean().sqrt().item(),
                        "x_independent_change": change.mean(0).pow(2).mean().sqrt().item(),
                        "entropy_min_bits": entropy.min().item(), "grad_norm_forward": norms["grad_norm_forward"]})
        before = after
    early = records[:40]
    return {"dataset": preset, "seed": seed, "steps": steps,
            "rms_change_mean_1_40": sum(r["rms_change"] for r in early) / len(early),
            "rms_change_max_1_40": max(r["rms_change"] for r in early),
            "x_independent_share_1_40": sum(r["x_independent_change"] ** 2 for r in early)
            / max(sum(r["rms_change"] ** 2 for r in early), 1e-30),
            "entropy_min_bits_last": records[-1]["entropy_min_bits"],
            "grad_norm_forward_last": records[-1]["grad_norm_forward"], "per_step": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=100,
                        help="optimizer steps (--steps: the older spelling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", nargs="+", default=["toy2d", "digits", "text"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "forward_dynamics.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for preset in args.datasets:
        r = measure(preset, args.train_steps, args.seed)
        results.append(r)
        print(f"{preset}: RMS change of log u per step (steps 1-40) mean {r['rms_change_mean_1_40']:.3f}, max "
              f"{r['rms_change_max_1_40']:.3f}, x-independent share {r['x_independent_share_1_40']:.3f}; at step "
              f"{args.train_steps}: entropy {r['entropy_min_bits_last']:.3g} bits, forward grad norm "
              f"{r['grad_norm_forward_last']:.3g}", flush=True)
    from pipelines.tracking import git_commit  # the commit the numbers were measured at
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": f"python -m benchmarks.forward_dynamics --train-steps {args.train_steps} --seed "
                                    f"{args.seed} --datasets {' '.join(args.datasets)}", "commit": git_commit(),
                                    "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
