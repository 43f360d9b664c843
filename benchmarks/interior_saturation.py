"""Per interior step t, the information u(x,t) carries about x and its entropy, every few optimizer
steps from the start of a toy2d run: where a random (or uniform warm) start loses its interior
steps at T >= 4 (docs/training_recipe.md, "The start per T").

    python -m benchmarks.interior_saturation --T 4 --steps 300 --set process.warm_start=none \\
        --set train.forward_freeze_fraction=0 > docs/results/interior_saturation/T4_random.txt

Prints one line per log step: step, training loss, I(x; z_t) in bits for t = 0..T (averaged over
positions), the mean entropy H[u(x,t)] in bits for t = 0..T, and the forward's gradient norm. The
training is the library's loop (`fldd.train.train_loop`) on the toy2d preset's config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fldd.config import CONFIG_DIR, FLDDConfig
from fldd.data import infinite_batches, load_splits
from fldd.model import FLDDModel
from fldd.train import TrainSchedule, build_optimizer, train_loop

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=4, help="sampling steps")
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=300,
                        help="optimizer steps to watch (--steps: the older spelling)")
    parser.add_argument("--every", type=int, default=25, help="log every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml").with_overrides(
        {"process.num_steps": args.T, "train.steps": 3000, "train.seed": args.seed, "seq_len": 2, "vocab_size": 50,
         "data.num_train": 100000}).with_overrides(args.set)
    print(f"# T={args.T} seed={args.seed} start={cfg.resolved_warm_start} forward_lr={cfg.forward_lr} "
          f"reverse-only fraction={cfg.resolved_freeze_fraction} overrides={args.set}", flush=True)
    train, valid = load_splits(cfg)
    torch.manual_seed(args.seed)
    model = FLDDModel(cfg)
    optimizer = build_optimizer(model, cfg.train)
    batches = infinite_batches(train, cfg.rows_per_micro_batch(), torch.Generator().manual_seed(args.seed))
    probe = valid[:1024]

    def show(step: int, metrics: dict) -> None:
        bits, entropy = model.forward_statistics(probe)
        print(f"{step:5d} loss {metrics.get('loss', float('nan')):7.3f}  I: {' '.join(f'{b:.3f}' for b in bits.tolist())}"
              f"  H: {' '.join(f'{h:.3f}' for h in entropy.tolist())}"
              f"  grad_fwd {metrics.get('grad_norm_forward', float('nan')):.3g}", flush=True)

    show(0, {})
    schedule = TrainSchedule(cfg.train, cfg.learns_forward, freeze_fraction=cfg.resolved_freeze_fraction)
    train_loop(model, batches, optimizer, num_steps=args.train_steps, schedule=schedule, grad_clip=cfg.train.grad_clip,
               grad_clip_mode=cfg.train.grad_clip_mode, log_every=args.every, on_metrics=show)


if __name__ == "__main__":
    main()
