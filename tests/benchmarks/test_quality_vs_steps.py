"""The quality-vs-steps benchmark's --quick preset, end to end, plus the T=1 invariant on its output."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fldd.datasets import toy2d_pmf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """The --quick preset exactly as a user runs it (a subprocess; it must finish well under 3 minutes)."""
    out = tmp_path_factory.mktemp("quality")
    result = subprocess.run([sys.executable, "-m", "benchmarks.quality_vs_steps", "--quick",
                             "--out-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "[20/20]" in result.stdout  # progress is shown
    return out


def test_quick_run_writes_records_tables_and_plots(quick_results):
    records = json.loads((quick_results / "results" / "quality_vs_steps.json").read_text())
    assert {tuple(sorted(r)) for r in records} == {("dataset", "method", "metric", "seed", "steps", "value")}
    for dataset, metric in (("toy2d", "kl"), ("digits-binary", "digits_fd")):
        for method in ("fldd", "fldd-mask", "masked", "masked-x0", "uniform"):
            for T in (1, 2):
                values = [r["value"] for r in records if (r["dataset"], r["method"], r["steps"], r["metric"])
                          == (dataset, method, T, metric)]
                assert len(values) == 1 and math.isfinite(values[0])
    table = (quick_results / "results" / "quality_vs_steps.md").read_text()
    assert "## toy2d: kl" in table and "## digits-binary: digits_fd" in table and "cost vs masked" in table
    for name in ("quality_vs_steps_toy2d.png", "quality_vs_steps_digits-binary.png",
                 "samples_toy2d_fldd_T2.png", "samples_digits-binary_masked_T1.png"):
        assert (quick_results / "plots" / name).stat().st_size > 1000


def test_one_step_models_are_no_better_than_the_product_of_marginals(quick_results):
    """T=1 is an invariant: a factorized model is at best the product of per-position marginals."""
    pmf = toy2d_pmf().view(50, 50)
    product = pmf.sum(1)[:, None] * pmf.sum(0)[None, :]
    floor = (pmf * (pmf.log() - product.log())).sum().item()  # KL(data || product of marginals)
    records = json.loads((quick_results / "results" / "quality_vs_steps.json").read_text())
    one_step = [r["value"] for r in records if r["dataset"] == "toy2d" and r["steps"] == 1 and r["metric"] == "kl"]
    assert len(one_step) == 5 and all(kl >= floor - 1e-6 for kl in one_step)


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.quality_vs_steps", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_merge_replaces_only_the_cells_it_trains(quick_results, tmp_path):
    shutil.copytree(quick_results, tmp_path, dirs_exist_ok=True)
    before = json.loads((tmp_path / "results" / "quality_vs_steps.json").read_text())
    result = run_benchmark("--datasets", "toy2d", "--methods", "masked", "--steps", "2", "--many-steps", "0",
                           "--seeds", "0", "--train-steps", "20", "--split", "valid", "--merge",
                           "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    after = json.loads((tmp_path / "results" / "quality_vs_steps.json").read_text())

    def cell(r):
        return r["dataset"], r["method"], r["steps"], r["seed"]

    retrained = ("toy2d", "masked", 2, 0)
    assert [r for r in after if cell(r) != retrained] == [r for r in before if cell(r) != retrained]
    old = {r["metric"]: r["value"] for r in before if cell(r) == retrained}
    new = {r["metric"]: r["value"] for r in after if cell(r) == retrained}
    assert new.keys() == old.keys() and new["kl"] != old["kl"]  # replaced (20 steps, not 150), not duplicated
    assert "valid split" in (tmp_path / "results" / "quality_vs_steps.md").read_text()


def test_unknown_override_fails_before_training(tmp_path):
    result = run_benchmark("--quick", "--set", "train.no_such_knob=1", "--out-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown config key 'train.no_such_knob'" in result.stderr
    assert not (tmp_path / "results" / "quality_vs_steps.json").exists()
