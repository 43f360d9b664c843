"""Choose each method's recipe on validation, then report it on the test split with fresh seeds.

The protocol the equal-T table needs (issue 12): for every (method, T) cell, one knob is searched
on a small grid, each value trained on the selection seeds and scored by its **validation NELBO
averaged over those seeds** (nothing else: no exact KL, no test split). The value with the lowest
mean is then trained on the report seeds, which played no part in the choice, and evaluated on the
**test** split. Both arms get the same tuning effort, a 4-value grid of the one knob each is most
sensitive to, 4 values each: the learned masking order (`fldd-mask-carry`) its forward learning
rate, with its own 30% reverse-only phase; the general learned forward (`fldd`) its recipe, a
start (random init, no reverse-only phase / masked warm start, 30% reverse-only) with a forward
learning rate, written "random/1e-3"; the fixed forward (`masked-x0`) its learning rate. The
`(4/T)^2` rule is switched off, so a grid's rate is the rate used; the learned forwards' reverse
learning rate stays at the preset's 1e-3, a point of the fixed arm's grid. A run that diverges scores +inf, and a
collapsed run counts with its (poor) NELBO: a value that fails on one seed of three is not
reliable. Every run is the project's one training loop (`fldd.train.fit`, in-process, as
`quality_vs_steps.py`), equal network, batch and optimizer steps. The choice is made by the rule
the sweeps use (`tune.results.lowest_mean`).

Why this is not a Ray Tune sweep: its unit is a (selection, report) pair of experiments with the
report's grid fixed by the selection's outcome, kept as a resumable JSON-lines record that the docs
cite run by run; a sweep (`fldd sweep`, Tune over Ray Train) does the selection half at cluster
scale, with MLflow runs, and this script is what makes its test-split half reproducible on a laptop.

    python -m benchmarks.select_then_test                       # toy2d, T in {2, 4, 8, 16}: ~80 min on 2 cores
    python -m benchmarks.select_then_test --quick               # a 3-minute smoke run under .fldd/
    python -m benchmarks.select_then_test --grid masked-x0=2.5e-4,5e-4,1e-3 --out docs/results/x.json
    python -m benchmarks.select_then_test --dataset digits-binary --steps 4 --train-steps 4000 --keep-best \
        --out docs/results/select_then_test_digits-binary_keepbest.json     # best of ~20 evaluations per run

Each finished run is appended to a JSON-lines cache (`.fldd/select_then_test/<output name>.runs.jsonl`),
so an interrupted invocation resumes where it stopped; the cache's first line records the protocol
(data set, optimizer steps, samples, grids) and the commit it started at, and a rerun whose runs
would train differently is refused; a wider `--grid` reuses the runs it shares. The output JSON
holds every selection run, the choice per cell with the validation means it was made on, every
report run, and the protocol: selection split and seeds, report split and seeds, the commits of
the code that trained.

With `--keep-best` each run keeps the weights of its best validation evaluation, and selection
then scores that run on the same validation rows: the selection NELBO can be optimistic, more so
for an arm whose checkpoints differ more (on digits, FLDD's validation-to-test gap grew from 0.007
to 0.018 bits/pixel with it, `masked-x0`'s did not), so compare the arms on the report's test
numbers, not on the validation means.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks.quality_vs_steps import PRIMARY, ROOT, config_for, run_job
from fldd.config import ConfigError
from fldd.train import NonFiniteLossError
from pipelines.tracking import git_commit  # HEAD, "-dirty" for uncommitted code
from tune.results import lowest_mean

# How the general learned forward starts and when it begins to learn: a "recipe" grid value is
# "<start>/<forward lr>" and sets all three keys, so that selection chooses the start per T
# (a random start won at T=2 and collapsed at T=8 in configs/sweep-recipe-toy2d.yaml).
RECIPE_STARTS = {
    "random": {"process.warm_start": "none", "train.forward_freeze_fraction": 0.0},
    "masked-warm": {"process.warm_start": "masked", "train.forward_freeze_fraction": 0.3},
}
RECIPE = "recipe"

# the knob each method is tuned on, and its grid: 4 values for every arm, fixed before any test
# number of the new networks was seen (the toy2d table started with 3 each; a random start collapsed
# at T=4 with forward lr 1e-3 and 3e-4 but not 1e-4 on a seed-0 probe, so every arm got a 4th value)
KNOBS = {
    "fldd": (RECIPE, ["random/1e-4", "random/1e-3", "masked-warm/3e-4", "masked-warm/1e-3"]),
    "fldd-mask-carry": ("train.forward_lr", [1e-4, 3e-4, 1e-3, 3e-3]),
    "masked-x0": ("train.lr", [2.5e-4, 5e-4, 1e-3, 2e-3]),
}
# what a method keeps fixed whatever its grid value: the learned masking order's reverse-only
# phase (its own recipe; the toy2d preset's freeze 0 is the general forward's random-start recipe)
METHOD_BASE = {"fldd-mask-carry": {"train.forward_freeze_fraction": 0.3}}
ALWAYS = {"train.forward_lr_ref_steps": 0}  # the grid value is the rate at every T


def recipe_overrides(value: str) -> dict:
    """The config keys a "<start>/<forward lr>" grid value sets."""
    start, _, rate = value.partition("/")
    if start not in RECIPE_STARTS:
        raise ValueError(f"recipe {value!r}: the start must be one of {tuple(RECIPE_STARTS)}")
    try:
        forward_lr = float(rate)
    except ValueError:
        raise ValueError(f"recipe {value!r}: after the '/' comes the forward learning rate") from None
    if not (math.isfinite(forward_lr) and forward_lr > 0):
        raise ValueError(f"recipe {value!r}: the forward learning rate must be finite and positive")
    return {**RECIPE_STARTS[start], "train.forward_lr": forward_lr}


def cell_overrides(method: str, knob: str, value, always: dict) -> dict:
    """A run's overrides: the fixed ones, the method's base, and its grid value (a recipe is kept by
    name too, for selection to group by, and expanded into the keys it sets)."""
    chosen = {RECIPE: value, **recipe_overrides(value)} if knob == RECIPE else {knob: value}
    return {**always, **METHOD_BASE.get(method, {}), **chosen}


def config_keys(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k != RECIPE}
SELECTION_METRIC = "nelbo_bits"  # on the validation split; the only number selection reads


def run_key(phase: str, job: dict, overrides: dict) -> str:
    return json.dumps({"phase": phase, **job, "overrides": overrides}, sort_keys=True)


class ProtocolMismatch(RuntimeError):
    """The cache was written under another protocol (data, steps, samples): its runs do not belong here."""


# what changes a run's result; the grids only say which runs selection reads (each run is keyed by
# its value), so a cache serves a wider grid of the same protocol
RUN_PROTOCOL = ("dataset", "train_steps", "num_samples", "always", "keep_best")
EVALUATIONS_FOR_KEEP_BEST = 20  # every steps // 20 steps, plus the last: the candidates of --keep-best


def read_cache(cache: Path, protocol: dict) -> tuple[dict, dict[str, dict]]:
    """The cache's header (protocol and starting commit) and its runs by key; a new cache gets a header.
    Refused when the header differs in a key of `RUN_PROTOCOL`."""
    if not cache.is_file():
        header = {"protocol": protocol, "git_commit": git_commit()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"header": header}) + "\n")
        return header, {}
    header, done = None, {}
    for line in cache.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the run was killed: that run reruns
            continue
        if "header" in entry:
            header = entry["header"]
        else:
            done[entry["key"]] = entry
    theirs = (header or {}).get("protocol", {})
    changed = sorted(k for k in RUN_PROTOCOL if protocol.get(k) != theirs.get(k))
    if header is None or changed:
        raise ProtocolMismatch(f"{cache} was written for another protocol (differs in {changed}); "
                               "give another --out, or delete the cache to start over")
    return header, done


def run_one(phase: str, job: dict, overrides: dict, train_steps: int | None, num_samples: int,
            keep_best: bool) -> list[dict]:
    """One run; a divergence is a result (+inf), not the end of the protocol."""
    try:
        return run_job(job, train_steps, num_samples, None, "valid" if phase == "select" else "test", None,
                       config_keys(overrides), keep_best)
    except NonFiniteLossError as error:
        return [{**job, "metric": SELECTION_METRIC, "value": math.inf},
                {**job, "metric": "diverged", "value": 1.0}, {**job, "metric": "error", "value": str(error)}]


def run_all(tasks: list[tuple[str, dict, dict]], args: argparse.Namespace, cache: Path,
            done: dict[str, dict], commit: str) -> dict[str, dict]:
    """Run (phase, job, overrides) tasks not yet in the cache, stamped with `commit`; return every
    cached result by key."""
    todo = [t for t in tasks if run_key(*t) not in done]
    if not todo:
        return done
    print(f"{len(todo)} runs to do ({len(tasks) - len(todo)} cached) on {args.processes} processes", flush=True)
    start = time.perf_counter()
    # fork: the workers run the code this process imported, the code its commit stamp names
    with ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("fork")) as pool, \
            cache.open("a") as out:
        futures = {pool.submit(run_one, phase, job, overrides, args.train_steps, args.num_samples, args.keep_best):
                   (phase, job, overrides) for phase, job, overrides in todo}
        for count, future in enumerate(as_completed(futures), 1):
            phase, job, overrides = futures[future]
            values = {r["metric"]: r["value"] for r in future.result()}
            if phase == "select":  # selection sees the validation NELBO only; the exact KL and TV are
                values = {k: v for k, v in values.items() if k in (SELECTION_METRIC, "nelbo_stderr", "best_step",
                                                                    "valid_evaluations",
                                                                    "train_seconds", "collapsed", "diverged")}
            entry = {"key": run_key(phase, job, overrides), "phase": phase, **job, "overrides": overrides,
                     "split": "valid" if phase == "select" else "test", "values": values,
                     "git_commit": commit}
            out.write(json.dumps(entry) + "\n")
            out.flush()
            done[entry["key"]] = entry
            elapsed = time.perf_counter() - start
            shown = f"{SELECTION_METRIC}={values[SELECTION_METRIC]:.4f}"
            print(f"[{count}/{len(todo)}] {phase} {job['method']} T={job['steps']} seed {job['seed']} {overrides}: "
                  f"{shown} ({elapsed / 60:.1f} min, ~{elapsed / count * (len(todo) - count) / 60:.1f} min left)",
                  flush=True)
    return done


def choose(selection: list[dict], knob: str) -> dict:
    """The grid value with the lowest validation NELBO averaged over the selection seeds. A diverged
    run (+inf) rules its value out; a NaN (which should not happen) is treated the same way."""
    by_value: dict[float, list[float]] = {}
    for entry in selection:
        score = entry["values"][SELECTION_METRIC]
        by_value.setdefault(entry["overrides"][knob], []).append(score if math.isfinite(score) else math.inf)
    means = {value: statistics.mean(scores) for value, scores in by_value.items()}
    best = lowest_mean(by_value)  # the sweeps' rule: lowest mean over seeds, a diverged seed rules out
    if best is None:
        raise RuntimeError(f"every value of {knob} diverged on some seed: {by_value}")
    return {"knob": knob, "value": best, "valid_nelbo_mean_by_value": {str(k): v for k, v in sorted(means.items())},
            "valid_nelbo_by_value": {str(k): v for k, v in sorted(by_value.items())},
            "at_grid_edge": at_grid_edge(knob, best, list(means))}


def at_grid_edge(knob: str, best, values: list) -> bool:
    """Whether the chosen value is the lowest or highest of its grid, so the optimum may lie outside
    it. A recipe's edge is its forward rate's among the rates tried with the same start. A one-value
    grid (--single-value) has no edge: nothing was searched."""
    if len(values) < 2:
        return False
    if knob != RECIPE:
        return best in (min(values), max(values))
    start = best.partition("/")[0]
    rates = [float(v.partition("/")[2]) for v in values if v.partition("/")[0] == start]
    return len(rates) > 1 and float(best.partition("/")[2]) in (min(rates), max(rates))


def finite_json(value):
    """JSON has no inf/NaN: write them as strings so strict parsers read the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def summary_table(report: list[dict], choices: dict, dataset: str) -> str:
    metric = PRIMARY[dataset]
    lines = [f"| method | T | chosen on validation | test {metric} (per seed) | test NELBO bits (per seed) |",
             "|---|---|---|---|---|"]
    for (method, T), choice in sorted(choices.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        runs = sorted((e for e in report if e["method"] == method and e["steps"] == T), key=lambda e: e["seed"])
        if not runs:
            continue
        # a diverged report run has no samples to score: NaN in its cell, not a crash after all the training
        prim = [e["values"].get(metric, math.nan) for e in runs]
        nelbo = [e["values"].get("nelbo_bits", math.nan) for e in runs]
        edge = (" (fixed, not searched)" if len(choice["valid_nelbo_mean_by_value"]) == 1
                else " (grid edge)" if choice["at_grid_edge"] else "")
        value = choice["value"] if choice["knob"] == RECIPE else f"{choice['value']:g}"
        lines.append(f"| {method} | {T} | {choice['knob'].split('.')[-1]}={value}{edge} | "
                     f"{statistics.mean(prim):.4f} ({' / '.join(f'{v:.4f}' for v in prim)}) | "
                     f"{statistics.mean(nelbo):.4f} ({' / '.join(f'{v:.4f}' for v in nelbo)}) |")
    return "\n".join(lines)


def plot(report: list[dict], dataset: str, path: Path) -> Path:
    """The report's primary metric against T, one line per method through the seed means, every seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = PRIMARY[dataset]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for index, method in enumerate(sorted({e["method"] for e in report})):
        runs = [e for e in report if e["method"] == method]
        steps = sorted({e["steps"] for e in runs})
        means = [statistics.mean(e["values"].get(metric, math.nan) for e in runs if e["steps"] == T) for T in steps]
        ax.plot(steps, means, "-", color=f"C{index}", label=method)
        ax.scatter([e["steps"] for e in runs], [e["values"].get(metric, math.nan) for e in runs], color=f"C{index}", s=12)
    ax.set_xscale("log", base=2)
    if metric == "kl":
        ax.set_yscale("log")
    ax.set_xlabel("sampling steps T")
    ax.set_ylabel(f"test {metric}")
    seeds = sorted({e["seed"] for e in report})
    ax.set_title(f"{dataset}: chosen on validation, test seeds {seeds}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def job_of(args: argparse.Namespace, knobs: dict) -> dict:
    """A job of this invocation, to read the config's optimizer steps for the protocol."""
    return {"dataset": args.dataset, "method": next(iter(knobs)), "steps": args.steps[0], "seed": args.select_seeds[0]}


def parse_args(argv: list[str] | None = None
               ) -> tuple[argparse.ArgumentParser, argparse.Namespace, dict[str, tuple[str, list[float]]]]:
    """The options, and the grid each method searches: `{method: (knob, values)}`, `--quick` and `--grid` applied."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="toy2d", choices=["toy2d", "digits-binary", "text", "moses"])
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16], help="sampling steps T")
    parser.add_argument("--methods", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    parser.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report-seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument("--train-steps", type=int, help="optimizer steps (default: the data set's config)")
    parser.add_argument("--num-samples", type=int, default=2000, help="generated samples per report run")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: T=2, seeds 0 / 10, 2 grid values, 150 steps (overrides those options)")
    parser.add_argument("--grid", action="append", default=[], metavar="METHOD=V1,V2,...",
                        help="the values of METHOD's knob to search instead of its default grid "
                             f"({'; '.join(f'{m}: {k} {g}' for m, (k, g) in KNOBS.items())}); repeatable")
    parser.add_argument("--keep-best", action="store_true",
                        help=f"evaluate validation NELBO about {EVALUATIONS_FOR_KEEP_BEST} times per run and keep "
                             "the best weights (fit's keep_best, as fldd train keeps its best checkpoint), not the last")
    parser.add_argument("--single-value", action="store_true",
                        help="allow a one-value --grid: no choice is made (the selection runs still record the "
                        "validation NELBO), for a data set where a 4-value grid does not fit the machine")
    parser.add_argument("--out", type=Path, help="default: docs/results/select_then_test_<dataset>.json")
    parser.add_argument("--cache", type=Path, help="finished runs, to resume from "
                        "(default: .fldd/select_then_test/<name of --out>.runs.jsonl)")
    args = parser.parse_args(argv)
    knobs = {m: KNOBS[m] for m in args.methods}
    if args.quick:  # a user's --grid below replaces the shortened default
        args.steps, args.select_seeds, args.report_seeds = [2], [0], [10]
        args.train_steps, args.num_samples = args.train_steps or 150, min(args.num_samples, 300)
        knobs = {m: (knob, grid[1:3]) for m, (knob, grid) in knobs.items()}
    if args.grid and not args.out:
        parser.error("--grid needs --out: results of another grid must not overwrite the default table's files")
    gridded: set[str] = set()
    for item in args.grid:
        method, _, values = item.partition("=")
        if method not in knobs:
            parser.error(f"--grid {item}: {method!r} is not one of the methods run ({', '.join(knobs)})")
        if method in gridded:
            parser.error(f"--grid {item}: {method} has a --grid already; give its values in one list")
        gridded.add(method)
        if knobs[method][0] == RECIPE:
            grid = sorted(set(values.split(",")))
            try:
                for value in grid:
                    recipe_overrides(value)
            except ValueError as error:
                parser.error(f"--grid {item}: {error}")
        else:
            try:
                grid = sorted({float(v) for v in values.split(",")})
            except ValueError:
                parser.error(f"--grid {item}: values must be numbers separated by commas")
            if not all(math.isfinite(v) and v > 0 for v in grid):
                parser.error(f"--grid {item}: learning rates must be finite and positive")
        if len(grid) < 2 and not args.single_value:
            parser.error(f"--grid {item}: a grid needs at least two values, or there is nothing to choose "
                         "(--single-value allows one: a fixed value, reported as such)")
        knobs[method] = (knobs[method][0], grid)
    if set(args.select_seeds) & set(args.report_seeds):
        parser.error("--select-seeds and --report-seeds must not share a seed: report seeds play no part in choosing")
    return parser, args, knobs


def main(argv: list[str] | None = None) -> None:
    parser, args, knobs = parse_args(argv)
    commit = git_commit()  # the code this process imported: its workers fork from it and train with it
    out = args.out or (ROOT / (".fldd/select-quick" if args.quick else "docs/results")
                       / f"select_then_test_{args.dataset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = args.cache or ROOT / ".fldd" / "select_then_test" / f"{out.stem}.runs.jsonl"
    train_steps = config_for(job_of(args, knobs), args.train_steps).train.steps
    always = {**ALWAYS, **({"train.eval_every": max(1, train_steps // EVALUATIONS_FOR_KEEP_BEST)}
                           if args.keep_best else {})}
    protocol = {"dataset": args.dataset, "train_steps": train_steps, "num_samples": args.num_samples,
                "grids": {m: {"knob": k, "values": g} for m, (k, g) in knobs.items()}, "always": always,
                **({"keep_best": True} if args.keep_best else {})}  # absent when off: older caches still match
    try:
        header, done = read_cache(cache, protocol)
    except ProtocolMismatch as error:
        parser.error(str(error))

    def job(method: str, T: int, seed: int) -> dict:
        return {"dataset": args.dataset, "method": method, "steps": T, "seed": seed}

    selection_tasks = [("select", job(m, T, s), cell_overrides(m, knob, value, always))
                       for m, (knob, grid) in knobs.items() for T in args.steps for value in grid
                       for s in args.select_seeds]
    try:  # fail before any training on a bad value
        for _, j, o in selection_tasks:
            config_for(j, args.train_steps, None, config_keys(o))
    except ConfigError as err:
        parser.error(str(err))
    results = run_all(selection_tasks, args, cache, done, commit)

    choices: dict[tuple[str, int], dict] = {}
    for method, (knob, _) in knobs.items():
        for T in args.steps:
            runs = [results[run_key(*t)] for t in selection_tasks if t[1]["method"] == method and t[1]["steps"] == T]
            choices[(method, T)] = choose(runs, knob)
            c = choices[(method, T)]
            print(f"chosen on validation: {method} T={T} {knob}={c['value']}  "
                  f"(mean valid NELBO by value: {c['valid_nelbo_mean_by_value']})", flush=True)

    report_tasks = [("report", job(m, T, s), cell_overrides(m, choices[(m, T)]["knob"], choices[(m, T)]["value"], always))
                    for (m, T) in choices for s in args.report_seeds]
    results = run_all(report_tasks, args, cache, results, commit)
    report = [results[run_key(*t)] for t in report_tasks]
    selection = [results[run_key(*t)] for t in selection_tasks]
    command = ("python -m benchmarks.select_then_test " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    commits = sorted({e.get("git_commit", header["git_commit"]) for e in selection + report})
    record = {
        "protocol": {"command": command, "git_commit": header["git_commit"], "run_commits": commits, **protocol,
                     "selection": {"split": "valid", "metric": f"{SELECTION_METRIC} (mean over seeds)",
                                   "seeds": args.select_seeds},
                     "report": {"split": "test", "seeds": args.report_seeds},
                     "fixed_per_method": {m: METHOD_BASE.get(m, {}) for m in knobs},
                     "untuned": f"every key not in grids, always or fixed_per_method is the preset's "
                                f"(configs/{args.dataset}.yaml), the learned forwards' reverse lr included"},
        "choices": [{"method": m, "steps": T, **c} for (m, T), c in choices.items()],
        "selection_runs": [{k: v for k, v in e.items() if k != "key"} for e in selection],
        "report_runs": [{k: v for k, v in e.items() if k != "key"} for e in report],
    }
    out.write_text(json.dumps(finite_json(record), indent=1, allow_nan=False))
    table = summary_table(report, choices, args.dataset)
    print(table)
    short = [c[:7] + ("-dirty" if c.endswith("-dirty") else "") for c in commits]
    out.with_suffix(".md").write_text(f"Command: `{command}` (runs trained at commits {', '.join(short)})\n\n"
                                      f"Selection: validation NELBO, mean over seeds {args.select_seeds}; "
                                      f"report: test split, seeds {args.report_seeds}.\n\n{table}\n")
    written = [out, out.with_suffix(".md")]
    if len(args.steps) > 1:  # a curve needs two budgets
        plot_dir = ROOT / "docs" / "plots" if out.resolve().parent == ROOT / "docs" / "results" else out.parent
        written.append(plot(report, args.dataset, plot_dir / f"{out.stem}.png"))
    print("wrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
