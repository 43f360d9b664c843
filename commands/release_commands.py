"""From sweep to endpoint: `fldd demo` (all of it on one machine), `fldd sweep` (Ray Tune),
`fldd promote` (the registry gate), `fldd models` (the registry's versions) and `fldd serve` (Ray Serve)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from commands import demo
from commands.formatting import format_decision, format_models, format_table
from fldd.config import CONFIG_DIR


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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The demo, sweep, promote, models and serve commands."""
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
