"""`fldd demo` end to end in a reduced configuration, on the session's Ray cluster and a fresh
project home: the sweep trains every cell, promotion moves the champion aliases, Serve answers over
real HTTP at every budget (and a conditional request keeps its clamp), and a second run reuses
everything: no trial retrained, no alias moved."""

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from commands.demo import DEMO_APP, DEMO_SWEEP, DemoOptions, demo_spec, run_demo
from fldd.config import CONFIG_DIR
from pipelines import registry
from pipelines.tracking import tracking_uri
from pipelines.vocabulary import SWEEP_TAG
from tests.servers import free_port

SMALL = {"train.steps": 60, "train.checkpoint_every": 30, "train.log_every": 30, "data.num_train": 2000,
         "data.num_valid": 300, "reverse_network.width": 32, "forward_network.width": 32}


@pytest.fixture
def small_demo(tmp_path) -> DemoOptions:
    spec = yaml.safe_load(DEMO_SWEEP.read_text())
    spec["set"] = SMALL
    path = tmp_path / "sweep-demo-small.yaml"
    path.write_text(yaml.safe_dump(spec))
    return DemoOptions(sweep_config=path, budgets=[2, 3], port=free_port(), picture_samples=200, latency_requests=2)


def test_demo_runs_sweep_promotion_serving_and_requests_and_a_rerun_reuses_them(ray_cluster, home, small_demo):
    from ray import serve

    try:
        first = run_demo(small_demo)
        # stage 1: both parameterizations trained at both budgets, as MLflow child runs of the sweep
        assert [b.budget for b in first.budgets] == [2, 3]
        client = MlflowClient(tracking_uri())
        for summary in first.budgets:
            assert set(summary.rows) == {"fldd-mask-carry", "masked-x0"}
            for row in summary.rows.values():
                assert row.steps_trained == 60 and torch.isfinite(torch.tensor(row.valid_nelbo_bits))
                assert client.get_run(row.run_id).data.tags[SWEEP_TAG] == first.sweep_name
            # toy2d is enumerable: the exact KL of each trained model is finite and positive
            assert all(0 < kl < 5 for kl in summary.kl.values())
        # stage 2: the first promotion at each budget moves champion-t<T>; `champion` follows T=2
        aliases = client.get_registered_model(small_demo.model_name).aliases
        for summary in first.budgets:
            assert summary.decision.promoted
            assert str(aliases[f"champion-t{summary.budget}"]) == summary.decision.version
            best = min(summary.rows.values(), key=lambda r: r.valid_nelbo_bits)
            assert summary.decision.run_id == best.run_id  # chosen on validation
        assert str(aliases["champion"]) == first.budgets[0].decision.version
        # stage 3 and 4: the endpoint served each budget's promoted version over HTTP
        for summary in first.budgets:
            assert summary.served_version == summary.decision.version
            assert len(summary.latency_ms) == 2 and all(ms > 0 for ms in summary.latency_ms)
        clamp = first.conditional["given"]["tokens"][0]
        assert first.conditional["steps"] == 2 and len(first.conditional["tokens"]) == 8
        assert all(row[0] == clamp for row in first.conditional["tokens"])
        assert Path(first.picture).stat().st_size > 1000 and first.picture.suffix == ".png"
        # the picture compares: both forwards at both budgets, the served champion's samples from HTTP
        assert set(first.picture_sources) == {(p, T) for p in ("fldd-mask-carry", "masked-x0") for T in (2, 3)}
        for summary in first.budgets:
            served = {p for (p, T), source in first.picture_sources.items() if T == summary.budget
                      and source == f"served v{summary.served_version}, over HTTP"}
            promoted = next(p for p, row in summary.rows.items() if row.run_id == summary.decision.run_id)
            assert served == {promoted}, first.picture_sources
        # Serve's application is gone once the demo returns (it did not keep serving)
        assert DEMO_APP not in serve.status().applications
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"{first.url}/readyz", timeout=5)

        # a rerun: the sweep is restored (same runs, nothing retrained), the gate changes nothing
        def logged(outcome):  # validation reports per trial run: a retrained trial would add more
            return {row.run_id: len(client.get_metric_history(row.run_id, "valid_nelbo_bits"))
                    for summary in outcome.budgets for row in summary.rows.values()}

        before = logged(first)
        second = run_demo(small_demo)
        assert logged(second) == before
        assert second.sweep_name == first.sweep_name
        for before, after in zip(first.budgets, second.budgets):
            assert {k: r.run_id for k, r in after.rows.items()} == {k: r.run_id for k, r in before.rows.items()}
            assert after.decision.decision == registry.UNCHANGED
            assert after.served_version == before.served_version
        assert client.get_registered_model(small_demo.model_name).aliases == aliases
        assert len(client.search_model_versions(f"name = '{small_demo.model_name}'")) == 2
    finally:
        serve.shutdown()  # the next module starts Serve on a port of its own


def test_demo_spec_names_the_sweep_by_the_digest_its_resume_checks(small_demo, tmp_path):
    same = demo_spec(small_demo)
    assert demo_spec(small_demo).name == same.name and same.name.startswith("demo-")
    assert same.name == f"demo-{same.digest()[:8]}"
    small_demo.train_steps = 40
    changed = demo_spec(small_demo)
    assert changed.name != same.name and changed.base.train.steps == 40 and changed.budgets == [2, 3]
    # a change outside the sweep file (its base config; a new default) is a new sweep, not a refused resume
    base = tmp_path / "base.yaml"
    base.write_text((CONFIG_DIR / "toy2d.yaml").read_text())
    sweep = yaml.safe_load(small_demo.sweep_config.read_text())
    small_demo.sweep_config.write_text(yaml.safe_dump({**sweep, "base": str(base)}))
    before = demo_spec(small_demo).name
    base.write_text(base.read_text().replace("  seed: 0\ndata:", "  seed: 0\n  weight_decay: 0.5\ndata:"))
    assert "weight_decay: 0.5" in base.read_text()
    assert demo_spec(small_demo).name != before


@pytest.mark.parametrize("raised, code", [("SweepInterrupted", 130), ("KeyboardInterrupt", 130),
                                          ("SweepError", 1), ("RegistryError", 1), ("DemoError", 1)])
def test_fldd_demo_turns_interrupts_and_stage_failures_into_exit_codes(raised, code, monkeypatch, capsys):
    import commands.demo
    from pipelines import registry
    from commands.cli import main
    from tune import sweep

    errors = {"SweepInterrupted": sweep.SweepInterrupted("interrupted"), "KeyboardInterrupt": KeyboardInterrupt(),
              "SweepError": sweep.SweepError("a trial failed"), "RegistryError": registry.RegistryError("no such run"),
              "DemoError": commands.demo.DemoError("port in use")}

    def fail(options):
        raise errors[raised]

    monkeypatch.setattr(commands.demo, "run_demo", fail)
    assert main(["demo"]) == code
    err = capsys.readouterr().err
    assert ("interrupted" in err and "Rerun the same command" in err) if code == 130 else "fldd demo: error:" in err
