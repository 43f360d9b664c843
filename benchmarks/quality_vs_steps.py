"""Quality against the number of sampling steps T: FLDD against fixed-forward diffusion at equal T,
the same reverse network, optimizer steps and batch (EVALUATION.md). The table the paper lacks.

Every run goes through the project's one training loop (fldd.train.fit) and its one evaluation
(pipelines.reports.evaluate_model: the metrics `fldd evaluate` reports, recorded without the
split's prefix, nelbo_bits, kl, digits_fd, ...); selection-free: each cell is the configured
recipe, evaluated once on the *test* split.

    python -m benchmarks.quality_vs_steps                          # toy2d + digits-binary, 3 seeds
    python -m benchmarks.quality_vs_steps --datasets text          # text, a separate invocation
    python -m benchmarks.quality_vs_steps --quick                  # < 3 minutes, writes under .fldd/
    python -m benchmarks.quality_vs_steps --split valid --methods fldd --steps 16 \
        --set train.forward_lr=3e-5 --out-dir .fldd/tune/x            # tuning: validation split, no docs/

Writes docs/results/quality_vs_steps.json (records {"dataset", "method", "steps", "seed", "metric",
"value"}), docs/results/quality_vs_steps.md (tables), docs/plots/quality_vs_steps_<data>.png and
sample pictures docs/plots/samples_<data>_<method>_T<T>.png (text: excerpts in the markdown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fldd.config import CONFIG_DIR, ConfigError, FLDDConfig  # noqa: E402
from fldd.data import load_splits, load_test_split  # noqa: E402
from fldd.datasets import builtin, tokens_to_text  # noqa: E402
from fldd.sampler import sample  # noqa: E402
from fldd.train import fit  # noqa: E402
from pipelines.reports import evaluate_model, save_tokens_picture, split_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"toy2d": "toy2d.yaml", "digits-binary": "digits.yaml", "digits": "digits.yaml", "text": "text.yaml",
           "moses": "moses.yaml"}
PRIMARY = {"toy2d": "kl", "digits-binary": "digits_fd", "digits": "digits_fd", "text": "gen_bpc", "moses": "fcd"}
# Method names are fldd.config.PARAMETERIZATIONS presets. fldd-mask-carry is not in the default
# grid (added after it, see docs/benchmarks.md); masked-x0 is the strongest fixed baseline we have,
# the others use the direct parameterization FLDD must use.
LEARNED = ("fldd", "fldd-mask", "fldd-mask-carry")
FIXED = ("masked", "masked-x0", "uniform")
DEFAULT_METHODS = ("fldd", "fldd-mask", "masked", "masked-x0", "uniform")


def grid(datasets: list[str], steps_list: list[int], many_steps: int | None, seeds: list[int],
         methods: tuple[str, ...] = DEFAULT_METHODS) -> list[dict]:
    jobs = []
    for dataset in datasets:
        for method in methods:
            budgets = steps_list + ([many_steps] if many_steps and method in FIXED else [])
            for T in budgets:
                for seed in seeds:
                    jobs.append({"dataset": dataset, "method": method, "steps": T, "seed": seed})
    return jobs


def config_for(job: dict, train_steps: int | None, learned_overrides: list[str] | None = None,
               overrides: dict | None = None) -> FLDDConfig:
    """The job's config: the data set's preset and the method's parameterization; `learned_overrides`
    apply to the learned forwards only, `overrides` (a recipe chosen per cell) to any method."""
    cfg = FLDDConfig.from_yaml(CONFIG_DIR / CONFIGS[job["dataset"]])
    spec = builtin(job["dataset"])
    cell = {"data.name": job["dataset"], "seq_len": spec.seq_len, "vocab_size": spec.vocab_size,
            "process.num_steps": job["steps"], "train.seed": job["seed"], "train.log_every": 10**6}
    if train_steps:
        cell["train.steps"] = train_steps
    cfg = cfg.with_parameterization(job["method"]).with_overrides(cell)
    if job["method"] in LEARNED:  # tuning knobs of the learned forward; fixed baselines keep the config
        cfg = cfg.with_overrides(learned_overrides or [])
    return cfg.with_overrides(overrides or {})


def run_job(job: dict, train_steps: int | None, num_samples: int, plot_dir: str | None,
            split: str = "test", learned_overrides: list[str] | None = None,
            overrides: dict | None = None, keep_best: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    cfg = config_for(job, train_steps, learned_overrides, overrides)
    train, valid = load_splits(cfg)
    # tuning evaluates on the validation split; the reported tables on the test split
    held_out = load_test_split(cfg) if split == "test" else valid
    result = fit(cfg, train, valid, eval_passes=1, keep_best=keep_best)
    model = result.model.eval()
    values = {"train_seconds": result.train_seconds, "seconds_per_step": result.train_seconds / cfg.train.steps,
              "best_step": result.best_step,  # the step whose weights are scored: the last, or keep_best's choice
              "valid_evaluations": sum("valid_nelbo_bits" in h for h in result.history)}  # keep_best's candidates
    start = time.perf_counter()  # evaluate_model's samples (seed 1000 + seed), drawn here to be timed and pictured
    samples = sample(model, num_samples, generator=torch.Generator().manual_seed(1000 + job["seed"]))
    values["sample_seconds_per_sample"] = (time.perf_counter() - start) / num_samples
    # the metrics `fldd evaluate` reports, NELBO with 10 passes (evaluation seed: the run's), the
    # keys without the split's prefix: the split is the invocation's (nelbo_bits, kl, digits_fd, ...)
    measured = evaluate_model(model, held_out, passes=10, seed=job["seed"], num_samples=num_samples, samples=samples)
    values.update(split_metrics(measured, None))
    if result.collapse is not None:  # the training run's own check, on validation rows (as recorded before),
        values["collapsed"] = float(result.collapse.collapsed)  # never on the test split being reported
    if plot_dir and job["seed"] == 0:
        save_samples(job, samples, cfg.vocab_size, Path(plot_dir))
    return [{**job, "metric": k, "value": float(v)} for k, v in values.items()]


def save_samples(job: dict, samples: torch.Tensor, vocab: int, plot_dir: Path) -> None:
    """The library's samples picture (toy2d: a heat map; digits: 64 of them as pictures), text as excerpts."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    name = f"samples_{job['dataset']}_{job['method']}_T{job['steps']}"
    if job["dataset"] == "text":
        (plot_dir / f"{name}.txt").write_text("\n".join(tokens_to_text(samples[:8])) + "\n")
        return
    save_tokens_picture(samples, vocab, plot_dir / f"{name}.png", title=f"{job['method']}, T={job['steps']}",
                        images=job["dataset"].startswith("digits"))


def summarize(records: list[dict]) -> dict:
    cells: dict = defaultdict(list)
    for r in records:
        cells[(r["dataset"], r["method"], r["steps"], r["metric"])].append(r["value"])
    return cells


def mean_spread(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}" if abs(mean) < 10 else f"{mean:.2f} ± {spread:.2f}"


def markdown(records: list[dict], command: str, seeds: list[int], split: str = "test") -> str:
    cells = summarize(records)
    lines = [f"# Quality vs steps\n\nCommand: `{command}`; seeds {seeds}; mean ± standard deviation over seeds, "
             f"{split} split.\n"]
    for dataset in sorted({r["dataset"] for r in records}):
        steps = sorted({r["steps"] for r in records if r["dataset"] == dataset})
        methods = [m for m in LEARNED + FIXED if any(r["method"] == m and r["dataset"] == dataset for r in records)]
        metrics = [PRIMARY[dataset], "nelbo_bits"] + (["tv"] if dataset == "toy2d" else []) \
            + (["classifier_confidence", "copy_rate"] if dataset.startswith("digits") else []) \
            + (["entropy", "distinct4"] if dataset == "text" else [])
        for metric in metrics:
            lines.append(f"\n## {dataset}: {metric}\n")
            lines.append("| method | " + " | ".join(f"T={T}" for T in steps) + " |")
            lines.append("|---|" + "---|" * len(steps))
            for method in methods:
                row = [mean_spread(cells.get((dataset, method, T, metric), [])) for T in steps]
                lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append(f"\n## {dataset}: cost and collapse\n")
        lines.append("| method | train s/step (mean) | cost vs masked | collapsed runs |")
        lines.append("|---|---|---|---|")
        masked = [v for T in steps for v in cells.get((dataset, "masked", T, "seconds_per_step"), [])]
        for method in methods:
            per_step = [v for T in steps for v in cells.get((dataset, method, T, "seconds_per_step"), [])]
            if not per_step:
                continue
            collapsed = [v for T in steps if T > 1 for v in cells.get((dataset, method, T, "collapsed"), [])]
            ratio = statistics.mean(per_step) / statistics.mean(masked) if masked and per_step else math.nan
            collapse = f"{int(sum(collapsed))}/{len(collapsed)} (T>1)" if collapsed else "n/a (fixed forward)"
            lines.append(f"| {method} | {statistics.mean(per_step):.4f} | {ratio:.2f}x | {collapse} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], plot_dir: Path) -> list[Path]:
    cells = summarize(records)
    paths = []
    for dataset in sorted({r["dataset"] for r in records}):
        metric = PRIMARY[dataset]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for method in LEARNED + FIXED:
            steps = sorted({r["steps"] for r in records if r["dataset"] == dataset and r["method"] == method})
            if not steps:
                continue
            means = [statistics.mean(cells[(dataset, method, T, metric)]) for T in steps]
            lows = [min(cells[(dataset, method, T, metric)]) for T in steps]
            highs = [max(cells[(dataset, method, T, metric)]) for T in steps]
            ax.plot(steps, means, "o-", label=method)
            ax.fill_between(steps, lows, highs, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps T")
        ax.set_ylabel(metric)
        if metric == "kl":
            ax.set_yscale("log")
        ax.set_title(f"{dataset}: {metric} vs T (band: min-max over seeds)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / f"quality_vs_steps_{dataset}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["toy2d", "digits-binary"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="sampling steps T")
    parser.add_argument("--many-steps", type=int, default=64, help="extra T for the fixed baselines (0: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, help="optimizer steps (default: each data set's config)")
    parser.add_argument("--num-samples", type=int, default=2000, help="generated samples per run (digits, text)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=LEARNED + FIXED)
    parser.add_argument("--split", choices=["test", "valid"], default="test",
                        help="where runs are evaluated: tune on valid, report on test")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the learned methods only (tuning), e.g. train.forward_lr=1e-4")
    parser.add_argument("--quick", action="store_true", help="T in {1, 2}, 1 seed, 150 steps: a smoke run")
    parser.add_argument("--out-dir", type=Path, help="default: docs/ (full) or .fldd/quality-quick/ (--quick)")
    parser.add_argument("--merge", action="store_true",
                        help="add to the existing results JSON, replacing only the cells this run trains")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the tables and plots from the existing results JSON, without training")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.many_steps, args.seeds = [1, 2], 0, [0]
        args.train_steps, args.num_samples = args.train_steps or 150, min(args.num_samples, 300)
    out = args.out_dir or (ROOT / ".fldd" / "quality-quick" if args.quick else ROOT / "docs")
    results_dir, plot_dir = out / "results", out / "plots"
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.quality_vs_steps " + " ".join(argv if argv is not None else os.sys.argv[1:])

    if args.report_only:
        records = json.loads((results_dir / "quality_vs_steps.json").read_text())
        seeds = sorted({r["seed"] for r in records})
        command = "python -m benchmarks.quality_vs_steps --report-only  # training invocations: docs/benchmarks.md"
        (results_dir / "quality_vs_steps.md").write_text(markdown(records, command, seeds))
        for path in plot(records, plot_dir):
            print(f"wrote {path}")
        return
    jobs = grid(args.datasets, args.steps, args.many_steps, args.seeds, tuple(args.methods))
    try:  # fail before any training on an unknown key or a bad value
        for job in jobs:
            config_for(job, args.train_steps, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    print(f"{len(jobs)} runs on {args.processes} processes: {args.datasets}, T={args.steps} "
          f"(+{args.many_steps} for fixed), seeds {args.seeds}", flush=True)
    records: list[dict] = []
    results_path = results_dir / "quality_vs_steps.json"
    if args.merge and results_path.is_file():  # keep other cells' records; this run's cells are replaced
        ran = {(j["dataset"], j["method"], j["steps"], j["seed"]) for j in jobs}
        records = [r for r in json.loads(results_path.read_text())
                   if (r["dataset"], r["method"], r["steps"], r["seed"]) not in ran]
        command += "  # merged into earlier records; all invocations: docs/benchmarks.md"
    start = time.perf_counter()
    with ProcessPoolExecutor(args.processes) as pool:
        futures = {pool.submit(run_job, job, args.train_steps, args.num_samples, str(plot_dir), args.split,
                               args.overrides): job for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            rows = future.result()
            records.extend(rows)
            value = next(r["value"] for r in rows if r["metric"] == PRIMARY[job["dataset"]])
            elapsed = time.perf_counter() - start
            print(f"[{done}/{len(jobs)}] {job['dataset']} {job['method']} T={job['steps']} seed {job['seed']}: "
                  f"{PRIMARY[job['dataset']]}={value:.4f}  ({elapsed / 60:.1f} min, "
                  f"~{elapsed / done * (len(jobs) - done) / 60:.1f} min left)", flush=True)
            # write as we go: a long run that stops early still leaves its results
            results_path.write_text(json.dumps(sorted(
                records, key=lambda r: (r["dataset"], r["method"], r["steps"], r["seed"], r["metric"])), indent=1))
    seeds = sorted({r["seed"] for r in records})
    (results_dir / "quality_vs_steps.md").write_text(markdown(records, command, seeds, args.split))
    for path in plot(records, plot_dir):
        print(f"wrote {path}")
    print(f"wrote {results_dir / 'quality_vs_steps.json'} and {results_dir / 'quality_vs_steps.md'} "
          f"in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
