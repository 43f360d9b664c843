"""Send each cell's winners through the registry gate (`fldd promote`): the equal-T table as the product decides it.

`select_then_test.py` chooses every method's recipe per step budget on validation and reports test
numbers per seed. This script takes those choices (it reads only the `choices` of that file, which
were made on validation; no test number feeds anything here) and, per budget T, trains with
`fldd train` on one report seed:
  - the fixed forward's winner (`masked-x0` with its chosen learning rate), and
  - each learned forward's winner (`fldd`, `fldd-mask-carry` with their chosen recipes),
then, for each learned method, registers the fixed run as the first version of a model of its own
(`<dataset>-<method>-gate-<digest of the two runs' names>`, so it becomes champion-t<T>; the learned
run's decision must name that version as the holder it was gated against) and sends the learned run through
`fldd promote --run`: the gate evaluates both on the test split, paired (same examples, same z_t
draws), and promotes only if the learned forward wins by more than its margin (2 x the standard
error of the paired difference). The decisions and their numbers are read back from the version
tags the gate writes.

    python -m benchmarks.gate_table --choices docs/results/select_then_test_toy2d.json \\
        --out docs/results/gate_toy2d.json

Training is the product's: `fldd train --workers 0` (Ray Train in local mode, MLflow in SQLite under
--home), the best checkpoint on validation (every --checkpoint-every steps) is the run's model, as for
every `fldd train` run; select_then_test scores the last weights, so the two can differ slightly.
Finished runs are found again by name and decided versions by run, so an interrupted invocation
resumes without training or registering twice (a candidate refused before registering, e.g. a
collapsed forward, is simply refused again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.vocabulary import (DECISION_REASON_TAG, DECISION_TAG, EXPERIMENT, HOLDER_TEST_NELBO_TAG,
                                  HOLDER_VERSION_TAG, MARGIN_TAG, PAIRED_DIFFERENCE_TAG, PAIRED_STDERR_TAG,
                                  RUN_NAME_TAG, TAG_PREFIX, TEST_EXAMPLES_TAG, TEST_NELBO_TAG, TEST_STDERR_TAG)

ROOT = Path(__file__).resolve().parent.parent
FLDD = str(Path(sys.executable).parent / "fldd")
FIXED = "masked-x0"
RECIPE = "recipe"  # select_then_test's knob for a set of overrides, kept by name
PRESETS = {"toy2d": "toy2d", "digits-binary": "digits", "text": "text"}


def overrides_of(choice: dict, selection_runs: list[dict]) -> dict:
    """The config overrides a choice was trained with, as select_then_test recorded them on its runs."""
    for run in selection_runs:
        if (run["method"] == choice["method"] and run["steps"] == choice["steps"]
                and run["overrides"].get(choice["knob"]) == choice["value"]):
            return {k: v for k, v in run["overrides"].items() if k != RECIPE}
    raise ValueError(f"no selection run of {choice['method']} T={choice['steps']} with "
                     f"{choice['knob']}={choice['value']!r}")


def digest(*parts) -> str:
    """8 hex digits naming what a run or model was made from, so a rerun with other choices, steps or
    seed trains and registers afresh instead of finding the old ones by name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


class Runner:
    def __init__(self, home: Path, dataset: str, train_steps: int, checkpoint_every: int, seed: int):
        self.home, self.dataset, self.train_steps = home, dataset, train_steps
        self.checkpoint_every, self.seed = checkpoint_every, seed
        self.env = {**os.environ, "FLDD_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
        self.log = home / "runs.log"

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.env["MLFLOW_TRACKING_URI"])

    def finished_run(self, name: str) -> str | None:
        experiment = self.client().get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return None
        runs = self.client().search_runs([experiment.experiment_id],
                                         filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}' and attributes.status = 'FINISHED'")
        return runs[0].info.run_id if runs else None

    def train(self, name: str, method: str, T: int, overrides: dict) -> str:
        done = self.finished_run(name)
        if done:
            return done
        command = [FLDD, "train", "--config", PRESETS[self.dataset], "--method", method, "--steps", str(T),
                   "--seed", str(self.seed), "--train-steps", str(self.train_steps), "--workers", "0",
                   "--name", name, "--set", f"train.checkpoint_every={self.checkpoint_every}",
                   "--set", f"train.log_every={self.checkpoint_every}"]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        start = time.perf_counter()
        with self.log.open("a") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            finished = subprocess.run(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if finished.returncode != 0:
            raise RuntimeError(f"{name}: exited {finished.returncode} (see {self.log})")
        run_id = self.finished_run(name)
        print(f"  trained {name}: run {run_id}, {time.perf_counter() - start:.0f} s", flush=True)
        return run_id

    def promote(self, run_id: str, model_name: str) -> dict:
        """`fldd promote --run`; the decision as the gate recorded it on the version it registered."""
        command = [FLDD, "promote", "--run", run_id, "--model-name", model_name]
        query = f"name = '{model_name}' and run_id = '{run_id}'"
        decided = [v for v in self.client().search_model_versions(query) if DECISION_TAG in v.tags]
        if decided:  # a rerun: the gate decided already; promoting again would register another version
            versions = decided[-1:]
            finished = subprocess.CompletedProcess(command, 0 if versions[0].tags[DECISION_TAG] != "refused" else 1,
                                                   stdout="(decided in an earlier invocation)")
        else:
            finished = subprocess.run(command, env=self.env, capture_output=True, text=True)
            if finished.returncode not in (0, 1):  # 0 promoted, 1 refused, 2 bad input
                raise RuntimeError(f"{' '.join(command)} exited {finished.returncode}: {finished.stderr[-2000:]}")
            versions = self.client().search_model_versions(query)
        tags = versions[0].tags if versions else {}
        recorded = {"decision": tags.get(DECISION_TAG), "reason": tags.get(DECISION_REASON_TAG),
                    **{tag.removeprefix(TAG_PREFIX): int(tags[tag]) if tag == TEST_EXAMPLES_TAG else float(tags[tag])
                       for tag in NUMBER_TAGS if tag in tags},
                    "holder_version": tags.get(HOLDER_VERSION_TAG)}
        output = finished.stdout.strip()
        if not versions:  # refused before registering (a collapsed forward, a failed check): no tags
            if not output.startswith("REFUSED"):  # exit 1 from a crash is not a decision
                raise RuntimeError(f"{' '.join(command)} exited {finished.returncode} without a decision: "
                                   f"{finished.stderr[-2000:]}")
            recorded.update(decision=output.split(":", 1)[0].lower(),
                            reason=output.split("reason:", 1)[-1].split("\n", 1)[0].strip())
        return {"command": " ".join(["fldd"] + command[1:]), "exit_code": finished.returncode,
                "version": str(versions[0].version) if versions else None, **recorded, "output": output}


NUMBER_TAGS = (TEST_NELBO_TAG, TEST_STDERR_TAG, HOLDER_TEST_NELBO_TAG, PAIRED_DIFFERENCE_TAG, PAIRED_STDERR_TAG,
               MARGIN_TAG, TEST_EXAMPLES_TAG)  # the gate's numbers, recorded without the tag prefix


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--choices", type=Path, required=True, help="a select_then_test results JSON")
    parser.add_argument("--seed", type=int, default=10, help="training seed of every gated run (a report seed)")
    parser.add_argument("--steps", type=int, nargs="+", help="budgets T to gate (default: every T in --choices)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--processes", type=int, default=2, help="trainings at a time")
    parser.add_argument("--home", type=Path, help="project home of these runs (default .fldd/gate-<dataset>)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.choices.is_file():
        parser.error(f"--choices {args.choices}: no such file (run benchmarks/select_then_test.py first)")
    selected = json.loads(args.choices.read_text())
    dataset, train_steps = selected["protocol"]["dataset"], selected["protocol"]["train_steps"]
    choices = {(c["method"], c["steps"]): c for c in selected["choices"]}
    budgets = sorted({T for _, T in choices}) if not args.steps else args.steps
    learned = sorted({m for m, _ in choices if m != FIXED})
    missing = [(m, T) for T in budgets for m in [FIXED, *learned] if (m, T) not in choices]
    if missing or not learned:
        parser.error(f"--choices has no choice for {missing or 'any learned method'}")
    home = (args.home or ROOT / ".fldd" / f"gate-{dataset}").resolve()
    home.mkdir(parents=True, exist_ok=True)
    runner = Runner(home, dataset, train_steps, args.checkpoint_every, args.seed)

    overrides = {(m, T): overrides_of(choices[(m, T)], selected["selection_runs"]) for T in budgets
                 for m in [FIXED, *learned]}

    def name(method: str, T: int) -> str:  # the digest: a changed choice is a new run, not the old one resumed
        made_of = digest(overrides[(method, T)], train_steps, args.checkpoint_every)
        return f"gate-{dataset}-{method}-T{T}-seed{args.seed}-{made_of}"

    jobs = [(method, T, overrides[(method, T)]) for T in budgets for method in [FIXED, *learned]]
    print(f"{len(jobs)} trainings ({train_steps} steps each, seed {args.seed}) under {home}", flush=True)
    with ThreadPoolExecutor(args.processes) as pool:
        runs = dict(zip([(m, T) for m, T, _ in jobs],
                        pool.map(lambda job: runner.train(name(job[0], job[1]), *job), jobs)))

    cells = []
    for T in budgets:
        for method in learned:
            # one model per pair of runs: its first version at T is the fixed run, so it holds champion-t<T>
            model = f"{dataset}-{method}-gate-{digest(name(FIXED, T), name(method, T))}"
            holder = runner.promote(runs[(FIXED, T)], model)
            decision = runner.promote(runs[(method, T)], model)
            # the tag is a string; "none" where the learned run was the first version (the fixed one refused)
            if decision.get("holder_version") not in (None, "none", str(holder["version"])):
                raise RuntimeError(f"{model}: the learned run was gated against version "
                                   f"{decision['holder_version']}, not the fixed run's version {holder['version']}")
            cells.append({"steps": T, "model_name": model, "seed": args.seed,
                          "fixed": {"method": FIXED, "run_id": runs[(FIXED, T)], "choice": choices[(FIXED, T)]["value"],
                                    "overrides": overrides[(FIXED, T)],
                                    "registration": holder},
                          "learned": {"method": method, "run_id": runs[(method, T)],
                                      "choice": choices[(method, T)]["value"],
                                      "overrides": overrides[(method, T)]},
                          "gate": decision})
            print(f"T={T} {method} vs {FIXED}: {decision.get('decision')} (paired difference "
                  f"{decision.get('paired_difference_bits')} +- {decision.get('paired_difference_stderr')}, "
                  f"margin {decision.get('margin_bits')})", flush=True)
    command = "python -m benchmarks.gate_table " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command, "choices_file": str(args.choices), "dataset": dataset, "train_steps": train_steps,
              "checkpoint_every": args.checkpoint_every, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
