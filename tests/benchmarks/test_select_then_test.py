"""The select-on-validation, report-on-test protocol: how a value is chosen, what the cache accepts,
and the --quick preset end to end (a subprocess, as a user runs it)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.select_then_test import (ProtocolMismatch, cell_overrides, choose, config_keys, main, parse_args,
                                         read_cache, run_key, summary_table)

ROOT = Path(__file__).resolve().parents[2]


def run(value: float, seed: int, nelbo: float) -> dict:
    return {"overrides": {"train.forward_lr": value}, "seed": seed, "values": {"nelbo_bits": nelbo}}


def test_the_value_with_the_lowest_mean_wins_not_the_luckiest_seed():
    runs = [run(1e-3, 0, 4.50), run(1e-3, 1, 4.90), run(1e-3, 2, 4.90),
            run(1e-4, 0, 4.60), run(1e-4, 1, 4.62), run(1e-4, 2, 4.58),
            run(3e-5, 0, 4.70), run(3e-5, 1, 4.70), run(3e-5, 2, 4.70)]
    choice = choose(runs, "train.forward_lr")
    assert choice["value"] == 1e-4 and not choice["at_grid_edge"]
    assert choice["valid_nelbo_mean_by_value"]["0.0001"] == pytest.approx(4.60)


def test_a_value_that_diverged_or_gave_nan_on_one_seed_is_never_chosen_and_edges_are_flagged():
    runs = [run(1e-3, 0, 4.40), run(1e-3, 1, math.inf), run(1e-4, 0, 4.60), run(1e-4, 1, 4.61),
            run(3e-5, 0, math.nan), run(3e-5, 1, 4.0)]
    choice = choose(runs, "train.forward_lr")
    assert choice["value"] == 1e-4 and not choice["at_grid_edge"]
    edge = choose([run(1e-3, 0, 4.5), run(1e-4, 0, 4.6)], "train.forward_lr")
    assert edge["value"] == 1e-3 and edge["at_grid_edge"]
    with pytest.raises(RuntimeError, match="diverged"):
        choose([run(1e-3, 0, math.inf)], "train.forward_lr")


def test_a_recipe_value_sets_the_start_its_phase_and_the_forward_rate_and_selection_groups_by_its_name():
    always = {"train.forward_lr_ref_steps": 0}
    random = cell_overrides("fldd", "recipe", "random/1e-3", always)
    assert config_keys(random) == {"train.forward_lr_ref_steps": 0, "process.warm_start": "none",
                                   "train.forward_freeze_fraction": 0.0, "train.forward_lr": 1e-3}
    warm = cell_overrides("fldd", "recipe", "masked-warm/3e-4", always)
    assert (warm["process.warm_start"], warm["train.forward_freeze_fraction"]) == ("masked", 0.3)
    # the learned masking order keeps its own reverse-only phase whatever its rate
    assert cell_overrides("fldd-mask-carry", "train.forward_lr", 3e-3, always)["train.forward_freeze_fraction"] == 0.3
    runs = [{"overrides": o, "seed": s, "values": {"nelbo_bits": v}}
            for o, s, v in [(random, 0, 4.53), (random, 1, 4.90), (warm, 0, 4.56), (warm, 1, 4.57)]]
    choice = choose(runs, "recipe")
    assert choice["value"] == "masked-warm/3e-4" and not choice["at_grid_edge"]  # its start's only rate
    # with a second rate for that start, the higher one winning sits at the grid's edge
    faster = cell_overrides("fldd", "recipe", "masked-warm/1e-3", always)
    runs += [{"overrides": faster, "seed": s, "values": {"nelbo_bits": 4.50}} for s in (0, 1)]
    choice = choose(runs, "recipe")
    assert choice["value"] == "masked-warm/1e-3" and choice["at_grid_edge"]


def test_the_cache_refuses_runs_of_another_protocol_and_skips_a_line_cut_short(tmp_path):
    cache = tmp_path / "c.runs.jsonl"
    protocol = {"dataset": "toy2d", "train_steps": 3000, "num_samples": 2000,
                "grids": {"masked-x0": {"knob": "train.lr", "values": [1e-3, 2e-3]}}}
    header, done = read_cache(cache, protocol)  # a new cache gets a header with the starting commit
    assert done == {} and header["protocol"] == protocol and header["git_commit"]
    key = run_key("select", {"dataset": "toy2d", "method": "masked-x0", "steps": 2, "seed": 0}, {"train.lr": 1e-3})
    with cache.open("a") as out:
        out.write(json.dumps({"key": key, "values": {"nelbo_bits": 4.7}}) + "\n")
        out.write('{"key": "half a li')  # killed mid-write
    assert list(read_cache(cache, protocol)[1]) == [key]
    with pytest.raises(ProtocolMismatch, match="train_steps"):
        read_cache(cache, {**protocol, "train_steps": 6000})
    # a wider grid trains its shared values the same way: the cache serves it
    wider = {**protocol, "grids": {"masked-x0": {"knob": "train.lr", "values": [5e-4, 1e-3, 2e-3]}}}
    assert list(read_cache(cache, wider)[1]) == [key]
    # keep_best trains differently: refused either way, while a header without it matches when off
    with pytest.raises(ProtocolMismatch, match="keep_best"):
        read_cache(cache, {**protocol, "keep_best": True})
    kept = tmp_path / "kept.runs.jsonl"
    read_cache(kept, {**protocol, "keep_best": True})
    with pytest.raises(ProtocolMismatch, match="keep_best"):
        read_cache(kept, protocol)


@pytest.mark.parametrize("grid, message", [(["masked-x0=1e-3"], "at least two values"),
                                           (["masked-x0=1e-3,fast"], "numbers"),
                                           (["masked-x0=1e-3,inf"], "finite and positive"),
                                           (["fldd-mask=1e-3,2e-3"], "not one of the methods"),
                                           (["fldd=random/1e-3,warm/1e-3"], "the start must be one of"),
                                           (["fldd=random/1e-3,random/fast"], "forward learning rate"),
                                           (["masked-x0=1e-3,2e-3", "masked-x0=4e-3,8e-3"], "has a --grid already")])
def test_a_bad_grid_is_refused_before_any_training(tmp_path, grid, message, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", *(f"--grid={g}" for g in grid), "--out", str(tmp_path / "q.json")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


def test_another_grid_needs_its_own_output(capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--grid", "masked-x0=1e-3,2e-3"])
    assert "--grid needs --out" in capsys.readouterr().err


def test_quick_shortens_the_default_grids_but_keeps_a_users_grid_whole():
    _, args, knobs = parse_args(["--quick", "--grid", "masked-x0=1e-4,2e-4,3e-4", "--out", "x.json"])
    assert knobs["masked-x0"] == ("train.lr", [1e-4, 2e-4, 3e-4])
    assert knobs["fldd-mask-carry"] == ("train.forward_lr", [3e-4, 1e-3])  # the default's middle two
    assert (args.steps, args.select_seeds, args.report_seeds, args.train_steps) == ([2], [0], [10], 150)


def test_a_one_value_grid_needs_single_value_and_is_shown_as_fixed(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--grid", "masked-x0=1e-3", "--out", "x.json"])
    assert "a grid needs at least two values" in capsys.readouterr().err
    _, _, knobs = parse_args(["--dataset", "moses", "--grid", "masked-x0=1e-3", "--single-value", "--out", "x.json"])
    assert knobs["masked-x0"] == ("train.lr", [1e-3])
    choice = choose([{"values": {"nelbo_bits": 1.04}, "overrides": {"train.lr": 1e-3}}], "train.lr")
    report = [{"method": "masked-x0", "steps": 10, "seed": 10, "values": {"fcd": 38.7, "nelbo_bits": 1.06}}]
    table = summary_table(report, {("masked-x0", 10): choice}, "moses")
    assert "lr=0.001 (fixed, not searched)" in table and "test fcd" in table


def test_quick_protocol_chooses_on_valid_and_reports_test_on_other_seeds(tmp_path):
    out, cache = tmp_path / "quick.json", tmp_path / "quick.runs.jsonl"
    command = [sys.executable, "-m", "benchmarks.select_then_test", "--quick", "--keep-best",
               "--out", str(out), "--cache", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    record = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    protocol = record["protocol"]
    assert protocol["selection"] == {"split": "valid", "metric": "nelbo_bits (mean over seeds)", "seeds": [0]}
    assert protocol["report"] == {"split": "test", "seeds": [10]} and protocol["git_commit"]
    assert {r["split"] for r in record["selection_runs"]} == {"valid"}
    assert {r["seed"] for r in record["report_runs"]} == {10}
    # selection never saw a distribution metric; the report has them
    assert all(set(r["values"]) <= {"nelbo_bits", "nelbo_stderr", "train_seconds", "collapsed", "diverged",
                                    "best_step", "valid_evaluations"} for r in record["selection_runs"])
    # --keep-best: every 7th of the 150 steps and the last, 22 evaluations in every run, and the
    # weights kept are one of them
    runs = record["selection_runs"] + record["report_runs"]
    assert protocol["keep_best"] and protocol["always"]["train.eval_every"] == 7
    assert [r["values"]["valid_evaluations"] for r in runs] == [22] * len(runs)
    assert all(r["values"]["best_step"] == 150 or r["values"]["best_step"] % 7 == 0 for r in runs)
    assert all("kl" in r["values"] for r in record["report_runs"])
    for choice in record["choices"]:  # the reported value is the chosen one, and it has the lowest mean
        means = choice["valid_nelbo_mean_by_value"]
        assert means[str(choice["value"])] == min(means.values())
        assert all(r["overrides"][choice["knob"]] == choice["value"] for r in record["report_runs"]
                   if r["method"] == choice["method"])
    # rerunning resumes from the cache: nothing trains again
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "runs to do" not in again.stdout
