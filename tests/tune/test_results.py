"""Choosing the best config of a sweep from its trials (no Ray: the rows are what collect_rows builds)."""

import math

from commands.formatting import format_table
from tune.results import SweepOutcome, TrialRow, best_per_budget


def row(trial: str, nelbo: float, *, lr: float, seed: int | None = None, budget: int = 2,
        status: str = "finished") -> TrialRow:
    values = {"parameterization": "fldd-mask-carry", "train.forward_lr": lr}
    if seed is not None:
        values["train.seed"] = seed
    return TrialRow(budget=budget, trial_id=trial, status=status, parameterization="fldd-mask-carry",
                    values=values, run_id=f"run-{trial}", valid_nelbo_bits=nelbo, valid_nelbo_stderr=0.01)


def test_a_config_run_under_several_seeds_is_ranked_by_its_mean_not_its_luckiest_seed():
    rows = [row("a0", 4.50, lr=1e-3, seed=0), row("a1", 4.90, lr=1e-3, seed=1), row("a2", 4.90, lr=1e-3, seed=2),
            row("b0", 4.60, lr=1e-4, seed=0), row("b1", 4.62, lr=1e-4, seed=1), row("b2", 4.58, lr=1e-4, seed=2)]
    best = best_per_budget(rows)[2]
    # a0 is the single best trial, but lr=1e-3 averages 4.767 against 4.600 for lr=1e-4
    assert best.values["train.forward_lr"] == 1e-4
    assert best.trial_id == "b2"  # the chosen config's best seed is the run a promotion registers
    assert math.isclose(best.config_mean_valid_nelbo, 4.60) and best.config_trials == 3
    table = format_table(SweepOutcome("s", "parent", rows, {2: best}))
    assert "4.6000 (mean of 3 trials)" in table


def test_a_config_with_a_stopped_or_failed_seed_is_not_chosen():
    rows = [row("a0", 4.40, lr=1e-3, seed=0), row("a1", 4.41, lr=1e-3, seed=1, status="stopped"),
            row("b0", 4.60, lr=1e-4, seed=0), row("b1", 4.61, lr=1e-4, seed=1),
            row("c0", 4.30, lr=3e-4, seed=0), row("c1", math.nan, lr=3e-4, seed=1, status="error")]
    assert best_per_budget(rows)[2].values["train.forward_lr"] == 1e-4


def test_without_seeds_in_the_space_the_best_finished_trial_wins_per_budget():
    rows = [row("a", 4.55, lr=1e-3), row("b", 4.50, lr=1e-4, status="stopped"), row("c", 4.58, lr=3e-4),
            row("d", 4.70, lr=1e-3, budget=4), row("e", 4.65, lr=1e-4, budget=4)]
    best = best_per_budget(rows)
    assert (best[2].trial_id, best[4].trial_id) == ("a", "e")
    assert best[2].config_trials == 1
    assert "(mean of" not in format_table(SweepOutcome("s", "parent", rows, best))


def test_trials_csv_gives_every_row_its_configs_mean(tmp_path):
    import csv

    from tune.results import write_csv

    rows = [row("a0", 4.50, lr=1e-3, seed=0), row("a1", 4.90, lr=1e-3, seed=1),
            row("b0", 4.60, lr=1e-4, seed=0), row("b1", 4.62, lr=1e-4, seed=1, status="stopped"),
            row("c0", 4.80, lr=1e-3, seed=0, budget=4), row("d", 4.75, lr=3e-4, budget=4)]
    with write_csv(rows, tmp_path / "trials.csv").open() as handle:
        written = {r["trial_id"]: r for r in csv.DictReader(handle)}
    # both seeds of lr=1e-3 carry the mean selection ranked them by, not their own number
    assert math.isclose(float(written["a0"]["config_mean_valid_nelbo"]), 4.70)
    assert written["a1"]["config_mean_valid_nelbo"] == written["a0"]["config_mean_valid_nelbo"]
    assert written["a0"]["config_trials"] == "2"
    assert float(written["a0"]["config_mean_valid_nelbo"]) == best_per_budget(rows)[2].config_mean_valid_nelbo
    # a config with a stopped seed has no mean: it could not be chosen
    assert math.isnan(float(written["b0"]["config_mean_valid_nelbo"]))
    assert math.isnan(float(written["b1"]["config_mean_valid_nelbo"]))
    # the same values at another budget are another config; a config of one trial is its own mean
    assert (float(written["c0"]["config_mean_valid_nelbo"]), written["c0"]["config_trials"]) == (4.80, "1")
    assert float(written["d"]["config_mean_valid_nelbo"]) == 4.75


def test_lowest_mean_is_one_rule_a_diverged_seed_rules_its_config_out_and_ties_go_first():
    from tune.results import lowest_mean

    assert lowest_mean({"a": [4.6, 4.4], "b": [4.5, 4.45], "c": [4.0, math.inf]}) == "b"  # c's seed diverged
    assert lowest_mean({"a": [4.5, 4.5], "b": [4.4, 4.6]}) == "a"  # equal means: the first
    assert lowest_mean({"a": [math.nan], "b": []}) is None
