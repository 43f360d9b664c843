"""The `fldd` command line: thin commands over plain functions.

Embedded defaults: a local Ray cluster started on demand (RAY_ADDRESS / --address joins an
existing one), MLflow in SQLite under the project home `$FLDD_HOME` (default ./.fldd;
MLFLOW_TRACKING_URI overrides), checkpoints under $FLDD_HOME/ray_results (--storage overrides).

What imports Ray, MLflow or matplotlib (pipelines' training, tracking, registry and reports, tune,
serving) is imported inside the command that needs it (`# lazy: start-up time`): `fldd --help`
and a mistyped command answer without loading them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from commands import demo
from commands.formatting import format_decision, format_inspect, format_models, format_table
from fldd.codec import CodecError
from fldd.config import CONFIG_DIR, PARAMETERIZATIONS, ConfigError, FLDDConfig, resolve_config
from fldd.data import DataError, load_test_split, load_valid_split, resolve_data_shape
from fldd.model import CheckpointError, FLDDModel
from fldd.inspection import inspect_data
from fldd.molecules import MissingExtra
from fldd.prepare import INVALID_CHOICES, prepare_csv, prepare_smiles, prepare_text
from fldd.sampler import sample
from fldd.service import model_codec
from fldd.train import NonFiniteLossError
from pipelines.logs import quiet_logs
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


# which input kind each `fldd data prepare` option belongs to
FLAG_SOURCE = {"--seq-len": "--text", "--alphabet": "--text", "--bytes": "--text", "--unknown": "--text",
               "--lowercase": "--text", "--columns": "--csv", "--column": "--smiles", "--invalid": "--smiles"}


def cmd_data_prepare(args: argparse.Namespace) -> int:
    common = {"valid_fraction": args.valid_fraction, "test_fraction": args.test_fraction, "seed": args.seed,
              "force": args.force}
    flags = {"--seq-len": args.seq_len is not None, "--alphabet": args.alphabet is not None, "--bytes": args.bytes,
             "--unknown": args.unknown is not None, "--lowercase": args.lowercase, "--columns": bool(args.columns),
             "--column": args.column is not None, "--invalid": args.invalid is not None}
    source = "--smiles" if args.smiles else "--csv" if args.csv else "--text"
    wrong = [f"{flag}: for {FLAG_SOURCE[flag]} only" for flag, on in flags.items() if on and FLAG_SOURCE[flag] != source]
    if wrong:
        raise DataError("; ".join(wrong))
    if args.smiles:
        result = prepare_smiles(args.smiles, args.out, column=args.column, invalid=args.invalid or "refuse", **common)
    elif args.csv:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        result = prepare_csv(args.csv, columns, args.out, **common)
    else:
        result = prepare_text(args.text, args.out, seq_len=64 if args.seq_len is None else args.seq_len,
                              alphabet=args.alphabet, use_bytes=args.bytes, unknown=args.unknown,
                              lowercase=args.lowercase, **common)
    print(result.summary())
    where = Path(result.out).resolve()
    preset = "moses" if args.smiles else "text"
    print(f"next:\n  fldd data inspect {where}\n  fldd train --config {preset} --set data.path={where}"
          "   # seq_len, vocab_size and codec come from the table")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Exit 0: a sound table; 1: problems found (listed); 2: unreadable."""
    report = inspect_data(args.path, column=args.column, top=args.top)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_inspect(report))
    return 1 if report["problems"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole product on one machine: sweep -> promotion -> Serve -> HTTP requests -> summary."""
    from pipelines.registry import RegistryError  # lazy: start-up time
    from tune.sweep import SweepError, SweepInterrupted  # lazy: start-up time

    options = demo.DemoOptions(train_steps=args.train_steps, budgets=args.budgets, port=args.port,
                               keep_serving=args.keep_serving, address=args.address, verbose=args.verbose,
                               model_name=args.model_name)
    if args.config:
        options.sweep_config = Path(args.config)
    start = time.perf_counter()
    try:
        demo.run_demo(options)
    except (KeyboardInterrupt, SweepInterrupted):  # Tune turns the first Ctrl-C into SweepInterrupted
        print("\nfldd demo: interrupted; Serve and the demo's Ray cluster are stopped. Rerun the same command "
              "to resume: finished trials are kept.", file=sys.stderr)
        return 130
    except (demo.DemoError, SweepError, RegistryError) as error:
        print(f"fldd demo: error: {error}", file=sys.stderr)
        return 1
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s.")
    if not options.keep_serving:
        print(f"The demo stopped Serve and its Ray cluster. Serve the promoted models again with\n"
              f"  fldd serve --model-name {options.model_name} --port {options.port}\n"
              f"(then the curl line above works), or run `fldd demo --keep-serving` to keep the endpoint up.")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A Ray Tune sweep: one experiment per step budget, trials through the one training launcher."""
    from tune.spec import SweepSpec  # lazy: start-up time
    from tune.sweep import SweepInterrupted, run_sweep  # lazy: start-up time

    spec = SweepSpec.from_yaml(args.config, CONFIG_DIR)
    try:
        outcome = run_sweep(spec, name=args.name, address=args.address, storage=args.storage, samples=args.samples,
                            verbose=args.verbose)
    except SweepInterrupted as error:
        print(f"fldd sweep: {error}", file=sys.stderr)
        return 130
    print(f"\nsweep {outcome.name!r} finished in {outcome.wall_seconds:.0f} s (best per T on the validation split):")
    print(format_table(outcome))
    print(f"\nMLflow parent run {outcome.parent_run_id}; trials.csv and quality_vs_steps.png are attached to it.\n"
          f"Promote the winners: fldd promote --sweep {outcome.name}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Exit 0: every decision promoted (or already in place); 1: a refusal or an impossible
    rollback (one line each on stderr); 2: bad input."""
    from pipelines import aliases, registry  # lazy: start-up time

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per decision, no bars

    def fail(message: str, code: int) -> int:
        print(f"fldd promote: {message}", file=sys.stderr)
        return code

    try:
        if args.rollback:
            if args.sweep or args.run or args.margin is not None:
                return fail("error: --rollback takes only --model-name and --budget", 2)
            if not args.model_name:
                return fail("error: --rollback needs --model-name", 2)
            moved = aliases.rollback(args.model_name, args.budget)
            print(f"rolled back {args.model_name}: " + ", ".join(f"{a} -> version {v}" for a, v in moved.items()))
            return 0
        if bool(args.sweep) == bool(args.run):
            return fail("error: give --sweep NAME [--budget T], --run RUN_ID, or --rollback --model-name NAME", 2)
        if args.run and args.budget is not None:
            return fail("error: --budget goes with --sweep (a run has its own T)", 2)
        decisions = registry.promote(sweep=args.sweep, budget=args.budget, run_id=args.run, model_name=args.model_name,
                                     margin=args.margin, passes=args.passes, seed=args.seed)
    except aliases.RollbackError as error:
        return fail(f"refused: {error}", 1)
    except registry.RegistryError as error:
        return fail(f"error: {error}", 2)
    for decision in decisions:
        print(format_decision(decision))
    refused = [d for d in decisions if d.decision == registry.REFUSED]
    for decision in refused:
        print(f"fldd promote: refused (T={decision.budget}): {decision.reason}", file=sys.stderr)
    return 1 if refused else 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipelines import model_store  # lazy: start-up time

    try:
        rows = model_store.list_models(args.name)
    except model_store.RegistryError as error:
        print(f"fldd models: error: {error}", file=sys.stderr)
        return 2
    print(format_models(rows) if rows else "no registered models")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The generation endpoint (Ray Serve + FastAPI) over the registry's champions, until Ctrl-C / SIGTERM."""
    from serving.run import DEFAULT_CONFIG, serve_until_stopped  # lazy: start-up time

    try:
        return serve_until_stopped(args.config or DEFAULT_CONFIG, models=args.model_name, port=args.port,
                                   address=args.address)
    except ValueError as error:  # a bad config file or settings (serving.settings.SettingsError)
        print(f"fldd serve: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fldd", description="Forward-Learned Discrete Diffusion: train (Ray Train + MLflow), evaluate and "
        "sample few-step discrete generators.",
        epilog="Project home: $FLDD_HOME (default ./.fldd) holds mlflow.db, checkpoints and run outputs.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    add_data_parser(sub)

    p = sub.add_parser(
        "demo", help="the whole pipeline on one machine: sweep, promotion, Serve, HTTP requests (a few minutes)",
        description="A Ray Tune sweep (learned forward fldd-mask-carry against the fixed masked-x0 with the same "
        "reverse parameterization, at two step budgets, trained with Ray Train), promotion of the best model per "
        "budget through the MLflow registry gate, Ray Serve on 127.0.0.1, generation requests over HTTP (two "
        "budgets and a conditional one), then a summary and a picture of samples per budget. Embedded defaults: "
        "a local Ray cluster, MLflow in SQLite under $FLDD_HOME. Rerunning resumes: finished trials are kept.")
    p.add_argument("--config", help="sweep YAML of the demo (default: configs/sweep-demo.yaml)")
    p.add_argument("--train-steps", type=int, help="optimizer steps per trial (default: the sweep file's)")
    p.add_argument("--budgets", type=int, nargs="+", metavar="T", help="step budgets (default: the sweep file's)")
    p.add_argument("--model-name", default=demo.DEMO_MODEL, help="registered model to promote into and serve")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint on 127.0.0.1")
    p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up after the summary until Ctrl-C")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "sweep", help="Ray Tune sweep over step budgets and parameterizations (ASHA per budget, MLflow runs)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a sweep defined in a YAML file (configs/sweep-*.yaml): one Tune experiment per step budget "
        "T, so early stopping only compares trials of the same T; every trial is an ordinary Ray Train run and an "
        "MLflow child run of the sweep's parent run. Trials are chosen on validation NELBO (bits/token).\n"
        "Rerunning the same command with the same --name resumes: finished trials are kept, unfinished ones "
        "continue from their checkpoints, failed ones start again.",
        epilog="examples:\n  fldd sweep --config sweep-smoke\n"
        "  fldd sweep --config configs/sweep-toy2d.yaml --address 10.0.0.1:6379 --storage /mnt/shared/fldd\n"
        "  fldd sweep --config configs/sweep-digits.yaml --storage s3://bucket/fldd  # with MLFLOW_TRACKING_URI")
    p.add_argument("--config", required=True, help="sweep YAML path, or a preset name in configs/ (sweep-smoke)")
    p.add_argument("--name", help="sweep name (default: the file's `name:`); the same name resumes")
    p.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT "
                   "(default: RAY_ADDRESS, else a new local cluster)")
    p.add_argument("--storage", help="where Tune and Train keep state: a local path, a directory shared by every "
                   "node, or s3://... (default $FLDD_HOME/ray_results)")
    p.add_argument("--samples", type=int, help="override the file's `samples:` (draws per grid point)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "promote", help="gate a trained model into the MLflow model registry (alias champion-t<T>)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Register a candidate as a version of a registered model and move alias champion-t<T> to it\n"
        "only if it beats the current holder on the held-out TEST split: both are evaluated in this call\n"
        "on the same examples with the same seeds, and the paired per-example NELBO difference\n"
        "(holder - candidate) must exceed the margin (default: 2 x its standard error). Alias champion\n"
        "moves with champion-t<T> when T is the model's default budget (the T of its first version).\n\n"
        "Refused, with no alias moved: missing or non-finite final validation metrics, a collapsed learned\n"
        "forward, a data set / vocabulary / sequence length other than the registered model's (nothing is\n"
        "registered then), a non-finite test NELBO, or a candidate not better than the holder by more\n"
        "than the margin. Every decision and its numbers are kept as version tags (fldd.decision,\n"
        "fldd.test_nelbo_bits, fldd.paired_difference_bits, ...); `fldd models` lists them.",
        epilog="exit status: 0 promoted (or already champion), 1 refused, 2 bad input.\n"
        "examples:\n  fldd promote --sweep toy2d-grid --budget 4\n  fldd promote --run 0123abcd --model-name fldd-toy2d\n"
        "  fldd promote --rollback --model-name fldd-toy2d --budget 4")
    which = p.add_argument_group("candidate (one of)")
    which.add_argument("--sweep", metavar="NAME", help="the best finished trial of this sweep by final validation "
                       "NELBO (collapsed and non-finite runs skipped); one decision per budget")
    which.add_argument("--run", metavar="RUN_ID", help="this MLflow training run")
    p.add_argument("--budget", type=int, metavar="T", help="with --sweep: only this step budget; with --rollback: "
                   "the alias champion-t<T> to roll back (default: the model's default budget)")
    p.add_argument("--model-name", metavar="NAME",
                   help="registered model (default fldd-<dataset>: data.name or the Parquet path's stem)")
    p.add_argument("--margin", type=float, metavar="M", help="absolute margin in bits/token the candidate must win "
                   "by (default: 2 x the standard error of the paired difference)")
    p.add_argument("--passes", type=int, default=10, help="Monte Carlo passes over z_t per test example (default 10)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed, the same for candidate and holder")
    p.add_argument("--rollback", action="store_true", help="give champion-t<T> (and champion, if it moved with it) "
                   "back to its previous holder; repeat to go back further")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("models", help="registered models: versions, aliases, T, test NELBO, gate decisions",
                       description="List the versions of one registered model (or of all): aliases, step budget T, "
                       "parameterization, validation and test NELBO (bits/token) and the promotion decision.")
    p.add_argument("name", nargs="?", help="registered model name (default: all)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "serve", help="serve few-step generation from the registry's champions over HTTP (Ray Serve)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start the generation endpoint (POST /v1/generate, GET /v1/models, /healthz, /readyz, /docs) on\n"
        "a new local Ray cluster (or the one --address names) and block until Ctrl-C or SIGTERM; then Serve\n"
        "is shut down and so is the cluster this command started. Each step budget T is served by the\n"
        "version holding alias champion-t<T>; requests without `steps` get the `champion` alias's T. The\n"
        "aliases are re-read every poll_interval_s (default 10 s): `fldd promote` and rollbacks reach the\n"
        "endpoint without a restart.",
        epilog="examples:\n  fldd serve --model-name fldd-toy2d\n"
        "  fldd serve --config configs/serve.yaml --port 8080\n"
        "  curl -s -X POST http://127.0.0.1:8000/v1/generate -H 'Content-Type: application/json' "
        "-d '{\"num_samples\": 4, \"steps\": 4, \"seed\": 0}'")
    p.add_argument("--config", help="Ray Serve config YAML (default: configs/serve.yaml); its first application is "
                   "served, with its args (models, limits, batching, replicas, poll interval)")
    p.add_argument("--model-name", action="append", metavar="NAME",
                   help="registered model to serve, instead of the config's `models` (repeatable; the first is the "
                   "default of a request)")
    p.add_argument("--port", type=int, help="HTTP port (the host is the config's http_options.host, 127.0.0.1 by default; default port: the config's http_options.port)")
    p.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: RAY_ADDRESS, else a new local "
                   "cluster that stops with this command)")
    p.set_defaults(func=cmd_serve)
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true",
                             help="show Ray's and MLflow's INFO logs, Tune's tables and every worker's output")
    return parser


TRAIN_EPILOG = """\
your own data:
  fldd train --config text --set data.path=DIR     a Parquet token table; seq_len, vocab_size and the
                                                   codec come from the table (fldd data prepare makes one)
on your own cluster:
  fldd train --address HEAD:6379 --workers 8 --storage s3://bucket/runs --set data.path=s3://bucket/tok
exit status: 0 done, 2 bad input (config, data, cluster address), 1 the run failed, 130 interrupted
"""

DATA_PREPARE_HELP = """\
Turn text files or a categorical CSV table into a token table that `fldd train` reads as is:
DIR/train/part-*.parquet (blocks of rows dealt at random, with --seed, to parts of about 50k
rows each, at most 64 parts; rows shuffled within each row group: training streams them),
DIR/valid.parquet and DIR/test.parquet (column "tokens", fixed-length lists of int64, schema
metadata fldd.vocab_size and fldd.codec), and DIR/fldd_data.json describing them.

text: the files (in the order given; globs are expanded, '**' recurses) are read as one stream
and cut into non-overlapping rows of --seq-len tokens; the tail shorter than that is dropped
(and reported). Tokens are characters (UTF-8, line endings read as \\n) over an alphabet - by
default the sorted set of characters found in the corpus; with --alphabet, a character outside it
is an error naming file, line and column, unless --unknown CHAR maps such characters to CHAR -
or bytes (--bytes: vocabulary 256, any encoding).

smiles: one molecule per row (a .csv's SMILES column, named with --column if it is not called
SMILES; or .txt / .smi files, one SMILES per line; .gz too), as atom-level SMILES tokens (bracket
atoms, Cl / Br and %nn ring bonds are one token each), padded at the end to the longest
molecule. RDKit must parse each SMILES (the molecules extra: pip install 'fldd[molecules]'): one
it cannot is refused with its file and line, or left out and counted with --invalid skip.

csv: one row per record, one token per --columns entry (position j = column j). Each column's
vocabulary is its sorted distinct values as strings (an empty cell is the category ""); token ids
start at 0 in every column; vocab_size is the largest column's.

splits: blocks of up to 32 consecutive rows (fewer for small data) go whole to train, valid or
test, drawn with --seed, so neighbouring rows rarely straddle two splits. Every split must be
non-empty. The input is read twice, a block at a time: memory does not grow with the corpus."""


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare text, SMILES or CSV files as token tables, and inspect token tables",
                       description="Prepare text, SMILES or categorical CSV files as token tables (train/valid/test "
                       "with a codec that decodes samples back to text, SMILES or table rows), and inspect token "
                       "tables.")
    data = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,inspect}")

    q = data.add_parser(
        "prepare", help="text, SMILES or CSV files -> DIR/train/part-*.parquet, valid.parquet, test.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=DATA_PREPARE_HELP,
        epilog="exit status: 0 written, 2 bad input (one line naming the problem).\n"
        "examples:\n  fldd data prepare --text 'corpus/**/*.txt' --out data/corpus --seq-len 128\n"
        "  fldd data prepare --text notes.md --out data/notes --alphabet 'abcdefghijklmnopqrstuvwxyz .' "
        "--lowercase --unknown ' '\n"
        "  fldd data prepare --text dump.bin --bytes --out data/bytes\n"
        "  fldd data prepare --csv survey.csv --columns age_band,region,answer --out data/survey\n"
        "  fldd data prepare --smiles molecules.csv.gz --column smiles --invalid skip --out data/molecules\n"
        "then: fldd data inspect data/corpus; fldd train --config text --set data.path=$PWD/data/corpus")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", metavar="FILE_OR_GLOB", help="text files (quote globs)")
    source.add_argument("--csv", nargs="+", metavar="FILE_OR_GLOB",
                        help="CSV file(s) with a header row (several files need the chosen columns)")
    source.add_argument("--smiles", nargs="+", metavar="FILE_OR_GLOB",
                        help="SMILES: .csv (with a SMILES column), .txt or .smi (one per line); .gz too")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty, else --force)")
    q.add_argument("--column", metavar="NAME", help="--smiles with a .csv: the SMILES column (default: the one "
                   "called SMILES or smiles)")
    q.add_argument("--invalid", choices=INVALID_CHOICES, help="--smiles: a SMILES RDKit cannot parse is refused "
                   "with its line number (refuse, the default) or left out and counted (skip)")
    q.add_argument("--columns", metavar="A,B,C", help="--csv: the columns to keep, in order (comma-separated)")
    q.add_argument("--seq-len", type=int, metavar="N", help="--text: tokens per row (default 64)")
    vocabulary = q.add_mutually_exclusive_group()
    vocabulary.add_argument("--alphabet", metavar="CHARS", help="--text: the characters, token i = CHARS[i] "
                            "(in bash, $'...' writes a newline as \\n); default: those found in the corpus")
    vocabulary.add_argument("--bytes", action="store_true", help="--text: byte-level tokens (vocabulary 256)")
    q.add_argument("--unknown", metavar="CHAR", help="--text with --alphabet: map characters outside the alphabet "
                   "to CHAR (one of the alphabet) instead of stopping with an error")
    q.add_argument("--lowercase", action="store_true", help="--text: lowercase the text first")
    q.add_argument("--valid-fraction", type=float, default=0.05, metavar="F",
                   help="share of rows held out for validation (default 0.05)")
    q.add_argument("--test-fraction", type=float, default=0.05, metavar="F",
                   help="share of rows held out for the final test (default 0.05)")
    q.add_argument("--seed", type=int, default=0, metavar="S", help="which blocks go to which split and train part, and the row order in a "
                   "row group (default 0)")
    q.add_argument("--force", action="store_true", help="write into a non-empty DIR (replacing the splits and "
                   "fldd_data.json there; other files are left alone)")
    q.set_defaults(func=cmd_data_prepare)

    q = data.add_parser(
        "inspect", help="rows per split, shape, vocabulary, codec, token histogram, copies across splits, examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Report on a token table: a prepared directory, any directory with train/valid/test splits\n"
        "(split.parquet files or split/ directories), any other directory of .parquet files, or one file.\n"
        "Rows per split, sequence length, vocabulary size and where it comes from (the fldd.vocab_size\n"
        "metadata, else the largest token + 1), the codec, the most frequent tokens (decoded where a\n"
        "codec exists), how many valid/test rows are exact copies of a train row (64-bit row hashes), and\n"
        "decoded example rows. Streams over row groups: memory grows only with the train rows' hashes.",
        epilog="exit status: 0 no problems, 1 problems found (listed as `problem:`), 2 unreadable table.")
    q.add_argument("path", metavar="DIR_OR_FILE")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--column", default="tokens", help="the token column (default tokens)")
    q.add_argument("--top", type=int, default=10, metavar="N", help="tokens in the histogram (default 10)")
    q.set_defaults(func=cmd_data_inspect)
    for command in data.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show INFO logs")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logs(args.verbose)
    if not args.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Train/Tune status tables on the driver
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny download
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # MLflow resolves some URIs (LoggedModels, registry sources) through its process-wide store
    # whatever client is used: point that at the project's store too, never at ./mlflow.db
    from pipelines.tracking import tracking_uri  # lazy: start-up time

    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, CodecError, FileNotFoundError, MissingExtra) as error:
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        print(f"fldd {command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # training failures: one clear line, details above in the log
        from mlflow.exceptions import MlflowException  # lazy: start-up time

        from pipelines.train import TrainingError  # lazy: start-up time
        from tune.sweep import SweepError  # lazy: start-up time

        if isinstance(error, (TrainingError, NonFiniteLossError, MlflowException, SweepError)):
            print(f"fldd {args.command}: error: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
