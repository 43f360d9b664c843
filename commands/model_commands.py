"""`fldd train`, `fldd evaluate` and `fldd sample`: a config (preset, --method, --set) becomes a
Ray Train run; a trained model (checkpoint, run or registry URI) is evaluated or sampled."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fldd.codec import CodecError
from fldd.config import PARAMETERIZATIONS, FLDDConfig, resolve_config
from fldd.data import load_test_split, load_valid_split, resolve_data_shape
from fldd.model import FLDDModel
from fldd.sampler import sample
from fldd.service import model_codec
from pipelines.vocabulary import EVAL_PREFIX


def build_config(args: argparse.Namespace) -> FLDDConfig:
    cfg = resolve_config(args.config)
    if getattr(args, "method", None):  # a preset: the forward process and its reverse parameterization
        cfg = cfg.with_parameterization(args.method)
    overrides: dict = {}
    if getattr(args, "steps", None) is not None:
        overrides["process.num_steps"] = args.steps
    if args.train_steps is not None:
        overrides["train.steps"] = args.train_steps
    if getattr(args, "seed", None) is not None:
        overrides["train.seed"] = args.seed
    if getattr(args, "init_from", None):
        overrides["train.init_from"] = args.init_from
    cfg = cfg.with_overrides(overrides).with_overrides(args.set or [])
    return resolve_data_shape(cfg)[0]  # seq_len and vocab_size from the data (DataError if stated otherwise)


def format_samples(tokens: torch.Tensor) -> str:
    return "\n".join("  " + " ".join(str(int(v)) for v in row) for row in tokens)


def load_model(args: argparse.Namespace) -> tuple[FLDDModel, str | None]:
    """(model, MLflow run id or None) from --checkpoint PATH, --run RUN_ID or --model URI."""
    if args.checkpoint:
        return FLDDModel.load(args.checkpoint), None
    from pipelines.tracking import download_model_file, tracking_uri  # lazy: start-up time

    path, run_id = download_model_file(tracking_uri(), args.model or args.run)
    return FLDDModel.load(path), run_id


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train import LaunchOptions, launch  # lazy: start-up time

    cfg = build_config(args)
    opts = LaunchOptions(workers=args.workers, gpu=args.gpu, address=args.address, storage=args.storage,
                         name=args.name, max_failures=args.max_failures, cpus_per_worker=args.cpus_per_worker)
    outcome = launch(cfg, opts)
    model = FLDDModel.load(outcome.model_path)
    print("samples:\n" + format_samples(sample(model, 8, generator=torch.Generator().manual_seed(0))))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.reports import evaluate_model, split_metrics  # lazy: start-up time

    model, run_id = load_model(args)
    held_out = load_valid_split(model.config) if args.split == "valid" else load_test_split(model.config)
    measured = evaluate_model(model, held_out, passes=args.passes, seed=args.seed)
    metrics = split_metrics(measured, args.split)  # every key names the split it was measured on
    metrics["split"] = args.split
    if run_id is not None:
        from pipelines.tracking import Tracker, tracking_uri  # lazy: start-up time

        logged = {f"{EVAL_PREFIX}{k}": v for k, v in metrics.items() if k != "split"}
        Tracker(tracking_uri(), run_id).log_metrics(model.config.train.steps, logged)
        print(f"logged to MLflow run {run_id}", file=sys.stderr)
    print(json.dumps(metrics, indent=2))
    return 0


def decode_samples(model: FLDDModel, tokens: torch.Tensor, fmt: str = "auto") -> tuple[str, list]:
    """(format, samples): token id lists, strings (text) or {column: category} objects (rows), with
    the model's codec; `auto` decodes whenever the model has one."""
    codec = model_codec(model.config, model.codec)
    if fmt == "auto":
        fmt = "tokens" if codec is None else "text" if codec.is_text else "rows"
    if fmt == "tokens":
        return fmt, tokens.tolist()
    if codec is None or codec.is_text != (fmt == "text"):
        has = "no codec (its samples are token ids only)" if codec is None else f"a {codec.kind} codec"
        raise CodecError(f"--format {fmt}: this model has {has}; use --format "
                         f"{'tokens' if codec is None else 'text' if codec.is_text else 'rows'}")
    return fmt, [codec.decode(row) for row in tokens.tolist()]


def sample_lines(fmt: str, samples: list) -> tuple[list[str], bool]:
    """One line per sample, and whether text samples were written as JSON strings (because some
    hold newlines or other control characters)."""
    if fmt == "tokens":
        return [" ".join(str(v) for v in row) for row in samples], False
    if fmt == "rows":
        return [json.dumps(row, ensure_ascii=False) for row in samples], False
    quoted = not all(text.isprintable() for text in samples)
    return [json.dumps(text, ensure_ascii=False) if quoted else text for text in samples], quoted


def cmd_sample(args: argparse.Namespace) -> int:
    model, _ = load_model(args)
    tokens = sample(model, args.num_samples, generator=torch.Generator().manual_seed(args.seed))
    out = args.out or ""
    if out.endswith(".png"):
        from pipelines.reports import save_tokens_picture  # lazy: start-up time

        save_tokens_picture(tokens, model.config.vocab_size, Path(out), title=f"T={model.num_steps}")
        print(f"wrote a picture of {args.num_samples} samples to {out}")
        return 0
    if out and not out.endswith((".jsonl", ".txt")):
        Path(out).write_text(json.dumps(tokens.tolist()))
        print(f"wrote {args.num_samples} samples (token ids, JSON) to {out}")
        return 0
    fmt, samples = decode_samples(model, tokens, args.format)
    if out.endswith(".jsonl"):
        Path(out).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
        print(f"wrote {args.num_samples} samples ({fmt}, one JSON value per line) to {out}")
        return 0
    lines, quoted = sample_lines(fmt, samples)
    if quoted:
        print("(samples hold newlines or other control characters: each is written as a JSON string)", file=sys.stderr)
    if out:
        Path(out).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {args.num_samples} samples ({fmt}, one per line) to {out}")
    elif fmt == "tokens":
        print(format_samples(tokens))
    else:
        print("\n".join(lines))
    return 0



def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The train, evaluate and sample commands."""

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config path or preset name in configs/ (default: toy2d)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
        p.add_argument("--train-steps", type=int, help="optimizer steps (train.steps)")
        p.add_argument("--steps", type=int, help="sampling steps T (process.num_steps)")

    def add_model_args(p: argparse.ArgumentParser) -> None:
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--run", help="MLflow run id of a training run")
        source.add_argument("--model", help="MLflow model URI, e.g. models:/NAME@champion")
        source.add_argument("--checkpoint", help="path to a model.pt file")

    p = sub.add_parser("train", help="train a model with Ray Train, tracked in MLflow",
                       description="Train with Ray Train. Rerunning with the same --name resumes from the last "
                       "checkpoint and continues the same MLflow run.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    add_config_args(p)
    p.add_argument("--method", choices=list(PARAMETERIZATIONS),
                   help="forward process and reverse parameterization (e.g. masked-x0: masked + x0)")
    p.add_argument("--seed", type=int, help="training seed (train.seed)")
    p.add_argument("--init-from", metavar="MODEL", help="start from a trained fixed-forward model of the same reverse "
                   "network (run id, runs:/RUN/model, models:/NAME@ALIAS or model.pt): its reverse weights, the "
                   "learned forward starting at its marginals, step 0 scored as a checkpoint (train.init_from)")
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers; 0 = local mode in this process")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast for the networks")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each Ray Train worker reserves "
                   "(also its torch threads, rounded down, at least 1)")
    p.add_argument("--address", help="Ray cluster to join: HOST:PORT (the head's GCS port; a token-auth cluster "
                   "needs its token on this machine), auto or ray://HOST:PORT (default: RAY_ADDRESS, else a new "
                   "local cluster)")
    p.add_argument("--storage", help="checkpoint storage: local path or URI (default $FLDD_HOME/ray_results); with "
                   "several nodes, a path every node mounts or s3://...")
    p.add_argument("--name", help="run name (default: <data>-<parameterization>-T<T>-seed<seed>-<config digest>); the same name resumes")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="held-out metrics of a trained model, logged back to its MLflow run")
    add_model_args(p)
    p.add_argument("--passes", type=int, default=10, help="Monte Carlo passes over z_t per example")
    p.add_argument("--split", choices=["valid", "test"], default="valid",
                   help="held-out split: valid for choosing among models, test for the final report")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="draw samples from a trained model")
    add_model_args(p)
    p.add_argument("-n", "--num-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write to FILE: .png a picture of the token ids, .jsonl one sample per line as "
                   "JSON, .txt one sample per line (as printed), anything else a JSON list of token ids")
    p.set_defaults(func=cmd_sample)

    p.add_argument("--format", choices=["auto", "tokens", "text", "rows"], default="auto",
                   help="how samples are printed or written to .txt/.jsonl: auto (default) decodes them with the "
                   "model's codec (text models: strings; table models: {column: category} objects), tokens keeps "
                   "the ids")



TRAIN_EPILOG = """\
your own data:
  fldd train --config text --set data.path=DIR     a Parquet token table; seq_len, vocab_size and the
                                                   codec come from the table (fldd data prepare makes one)
on your own cluster:
  fldd train --address HEAD:6379 --workers 8 --storage s3://bucket/runs --set data.path=s3://bucket/tok
exit status: 0 done, 2 bad input (config, data, cluster address), 1 the run failed, 130 interrupted
"""
