"""The `fldd` command line.

For now training runs in-process on the built-in toy data sets (the Ray Train launcher wraps the
same loop later). Outputs go under the project home, `.fldd/` in the current directory unless
FLDD_HOME says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fldd.config import ConfigError, FLDDConfig
from fldd.data import BUILTIN_PMFS, data_pmf, load_splits
from fldd.metrics import exact_distribution_metrics
from fldd.model import CheckpointError, FLDDModel
from fldd.objective import evaluate_nelbo
from fldd.sampler import sample
from fldd.train import NonFiniteLossError, fit, print_progress

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def project_home() -> Path:
    return Path(os.environ.get("FLDD_HOME", ".fldd")).resolve()


def resolve_config(path: str | None) -> FLDDConfig:
    """A YAML path, or the name of a preset in configs/ (e.g. `toy2d`)."""
    if path is None:
        return FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml")
    candidate = Path(path)
    if not candidate.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        candidate = CONFIG_DIR / f"{path}.yaml"
    return FLDDConfig.from_yaml(candidate)


def build_config(args: argparse.Namespace) -> FLDDConfig:
    cfg = resolve_config(args.config)
    overrides: dict = {}
    if args.method:
        overrides["process.method"] = args.method
    if args.steps is not None:
        overrides["process.num_steps"] = args.steps
    if args.train_steps is not None:
        overrides["train.steps"] = args.train_steps
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    return cfg.with_overrides(overrides).with_overrides(args.set or [])


def format_samples(tokens: torch.Tensor) -> str:
    return "\n".join("  " + " ".join(str(int(v)) for v in row) for row in tokens)


def exact_metrics_if_enumerable(model: FLDDModel) -> dict[str, float]:
    name = model.config.data.name
    if not model.config.data.path and name in BUILTIN_PMFS and model.config.seq_len == 2:
        return exact_distribution_metrics(model, data_pmf(name))
    return {}


def train_and_report(cfg: FLDDConfig, out_dir: Path, quiet: bool = False) -> dict:
    train_data, valid_data = load_splits(cfg)
    print(f"training {cfg.process.method} (T={cfg.process.num_steps}) on {cfg.data.name}: "
          f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, seed {cfg.train.seed}", flush=True)
    result = fit(cfg, train_data, valid_data, on_metrics=None if quiet else print_progress(cfg.train.steps))
    out_dir.mkdir(parents=True, exist_ok=True)
    result.model.save(out_dir / "model.pt")
    cfg.to_yaml(out_dir / "config.yaml")
    summary = {
        "method": cfg.process.method, "steps": cfg.process.num_steps, "seed": cfg.train.seed,
        "valid_nelbo_bits": result.valid_nelbo.bits_per_token,
        "valid_nelbo_stderr": result.valid_nelbo.stderr_bits_per_token,
        "train_seconds": result.train_seconds,
        "collapsed": bool(result.collapse.collapsed) if result.collapse else None,
        **exact_metrics_if_enumerable(result.model),
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"validation NELBO: {result.valid_nelbo}")
    if result.collapse is not None:
        print(result.collapse)
    if "kl" in summary:
        print(f"exact KL(data || model) = {summary['kl']:.4f} nats, TV = {summary['tv']:.4f}, "
              f"mass between modes = {summary['between_modes_mass']:.4f}")
    print(f"saved {out_dir / 'model.pt'}")
    return summary


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    name = args.name or f"{cfg.data.name}-{cfg.process.method}-T{cfg.process.num_steps}-seed{cfg.train.seed}"
    out_dir = Path(args.out).resolve() if args.out else project_home() / "runs" / name
    train_and_report(cfg, out_dir)
    model = FLDDModel.load(out_dir / "model.pt")
    print("samples:\n" + format_samples(sample(model, 8, generator=torch.Generator().manual_seed(0))))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    model = FLDDModel.load(args.model)
    tokens = sample(model, args.num_samples, generator=torch.Generator().manual_seed(args.seed))
    if args.out:
        Path(args.out).write_text(json.dumps(tokens.tolist()))
        print(f"wrote {args.num_samples} samples to {args.out}")
    else:
        print(format_samples(tokens))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model = FLDDModel.load(args.model)
    _, valid = load_splits(model.config)
    estimate = evaluate_nelbo(model, valid, num_passes=args.passes, generator=torch.Generator().manual_seed(0))
    metrics = {"valid_nelbo_bits": estimate.bits_per_token, "valid_nelbo_stderr": estimate.stderr_bits_per_token,
               "collapsed": bool(model.collapsed), **exact_metrics_if_enumerable(model)}
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """FLDD against the fixed masked forward at the same T and reverse network, on toy2d."""
    base = resolve_config(args.config).with_overrides(args.set or [])
    if args.train_steps is not None:
        base = base.with_overrides({"train.steps": args.train_steps})
    home = project_home() / "demo"
    rows = []
    start = time.perf_counter()
    for method in ("fldd", "masked"):
        cfg = base.with_overrides({"process.method": method})
        print(f"\n=== {method} ===", flush=True)
        rows.append(train_and_report(cfg, home / method, quiet=False))
    print(f"\n{'method':<8} {'T':>3} {'NELBO bits/token':>17} {'exact KL':>9} {'TV':>7} {'train s':>8}")
    for r in rows:
        print(f"{r['method']:<8} {r['steps']:>3} {r['valid_nelbo_bits']:>10.4f} +- {r['valid_nelbo_stderr']:.3f} "
              f"{r.get('kl', float('nan')):>9.4f} {r.get('tv', float('nan')):>7.4f} {r['train_seconds']:>8.1f}")
    model = FLDDModel.load(home / "fldd" / "model.pt")
    print(f"\nFLDD samples (T={model.num_steps} reverse calls each):\n"
          + format_samples(sample(model, 8, generator=torch.Generator().manual_seed(0))))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; models under {home}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fldd", description="Forward-Learned Discrete Diffusion: train, "
                                     "evaluate and sample few-step discrete generators.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config path or preset name in configs/ (default: toy2d)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
        p.add_argument("--train-steps", type=int, help="optimizer steps (train.steps)")

    p = sub.add_parser("train", help="train one model in-process on a built-in data set")
    add_config_args(p)
    p.add_argument("--method", choices=["fldd", "fldd-mask", "masked", "uniform"], help="forward process")
    p.add_argument("--steps", type=int, help="sampling steps T (process.num_steps)")
    p.add_argument("--seed", type=int, help="training seed (train.seed)")
    p.add_argument("--name", help="run name (default: data-method-T-seed)")
    p.add_argument("--out", help="output directory (default: $FLDD_HOME/runs/NAME, FLDD_HOME=.fldd)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a saved model")
    p.add_argument("--model", required=True, help="path to model.pt")
    p.add_argument("-n", "--num-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write samples as JSON here instead of printing")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="held-out NELBO (and exact metrics on 2-D toys) of a saved model")
    p.add_argument("--model", required=True, help="path to model.pt")
    p.add_argument("--passes", type=int, default=10, help="Monte Carlo passes over z_t per example")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="FLDD vs the fixed masked forward at equal T on toy2d")
    add_config_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, NonFiniteLossError, ValueError) as error:
        print(f"fldd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
