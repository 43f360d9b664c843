"""Gated promotion in the MLflow model registry (`fldd promote`, `fldd models`) on a real SQLite
store and real tiny training runs: the first version, worse / NaN / collapsed / foreign candidates,
a better one moving champion-t<T> and champion, rollbacks, sweeps, and loading what was promoted."""

import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from commands.cli import main
from fldd.config import CONFIG_DIR, FLDDConfig
from fldd.data import load_test_split
from fldd.model import FLDDModel
from fldd.objective import evaluate_nelbo
from pipelines import aliases as alias_moves, model_store, registry
from pipelines.vocabulary import ALIAS_LOCK_SUFFIX, DEFAULT_BUDGET_TAG, history_tag
from pipelines.tracking import download_model_file, global_tracking_uri, resolve_model, tracking_uri
from pipelines.train import LaunchOptions, launch
from tests.conftest import module_project_home
from tests.pipelines.conftest import toy_config

# toy2d T=2, fldd-mask-carry (a learned forward that keeps information from the first step; the
# general forward's short runs are flagged collapsed, which the gate refuses), same config but for
# training length: validation NELBO about 5.6 / 5.05 / 5.0 bits/token, and the paired test
# differences are many standard errors apart
TRAIN_STEPS = {"weak": 20, "mid": 100, "strong": 300}
PARAMETERIZATION = "fldd-mask-carry"
MASK_CARRY_RECIPE = {"train.forward_lr": 3e-4, "train.forward_freeze_fraction": 0.3}  # its own sweeps' recipe


@pytest.fixture(scope="module")
def registry_home(ray_cluster, tmp_path_factory):
    """One project home (SQLite store) for the module: the trained runs are shared; every test
    registers under its own model name."""
    with module_project_home(tmp_path_factory, "registry") as home:
        yield home


@pytest.fixture(scope="module")
def runs(registry_home):
    """Run ids: toy2d T=2 weak / mid / strong, toy2d T=4, and a tiny digits-binary run."""
    ids = {}
    for name, steps in TRAIN_STEPS.items():
        cfg = toy_config(**{"train.steps": steps, "train.checkpoint_every": steps,
                            "train.log_every": steps, **MASK_CARRY_RECIPE}).with_parameterization(PARAMETERIZATION)
        ids[name] = launch(cfg, LaunchOptions(workers=0, quiet=True, name=f"toy-{name}")).run_id
    cfg = toy_config(**{"process.num_steps": 4, "train.steps": 40, "train.checkpoint_every": 40,
                        **MASK_CARRY_RECIPE}).with_parameterization(PARAMETERIZATION)
    ids["t4"] = launch(cfg, LaunchOptions(workers=0, quiet=True, name="toy-t4")).run_id
    digits = FLDDConfig.from_yaml(CONFIG_DIR / "digits.yaml").with_overrides(
        {"process.num_steps": 2, "train.steps": 10, "train.checkpoint_every": 10, "train.log_every": 10,
         "reverse_network.width": 32, "forward_network.width": 32})
    ids["digits"] = launch(digits, LaunchOptions(workers=0, quiet=True, name="digits-tiny")).run_id
    return ids


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def aliases(name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client().get_registered_model(name).aliases.items()}


def version_tags(name: str, version: str) -> dict[str, str]:
    return client().get_model_version(name, version).tags


def history(name: str, alias: str) -> list[str]:
    return json.loads(client().get_registered_model(name).tags[history_tag(alias)])


def versions_of(name: str) -> list:
    return client().search_model_versions(f"name = '{name}'")


def clone_run(run_id: str, *, tags: dict | None = None, metrics: dict | None = None, drop_metrics=(),
              nan_weights: bool = False, status: str = "FINISHED") -> str:
    """A copy of a real training run (params, tags, final metrics, logged model), changed as asked:
    the trained runs stay untouched for the other tests."""
    c = client()
    source = c.get_run(run_id)
    new = c.create_run(source.info.experiment_id, run_name=f"clone-of-{source.info.run_name}",
                       tags={k: v for k, v in source.data.tags.items()
                             if not k.startswith("mlflow.") and k not in ("fldd.model_id", "model_uri")})
    values = {k: v for k, v in source.data.metrics.items() if k.startswith("final_") and k not in drop_metrics}
    values.update(metrics or {})
    c.log_batch(new.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in values.items()],
                params=[Param(k, v) for k, v in list(source.data.params.items())[:100]],
                tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    with tempfile.TemporaryDirectory() as tmp:
        location, _ = resolve_model(tracking_uri(), f"runs:/{run_id}/model")  # the run's LoggedModel
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                         tracking_uri=tracking_uri()))
        if nan_weights:
            (weights,) = local.rglob("model.pt")
            payload = torch.load(weights, weights_only=True)
            payload["state_dict"] = {k: v.fill_(float("nan")) if v.is_floating_point() and k.startswith("reverse")
                                     else v for k, v in payload["state_dict"].items()}
            torch.save(payload, weights)
        c.log_artifacts(new.info.run_id, str(local), "model")
    c.set_terminated(new.info.run_id, status)
    return new.info.run_id


def test_per_example_nelbo_is_paired_by_example():
    from tests.conftest import tiny_model

    model = tiny_model({"process.method": "masked"}, T=3)
    data = torch.tensor([[0, 1], [2, 2], [1, 0]]).repeat(7, 1)
    estimate = evaluate_nelbo(model, data, num_passes=4, batch_size=5, generator=torch.Generator().manual_seed(0))
    per = estimate.per_example_bits
    assert per.shape == (21,) and per.dtype == torch.float64
    assert per.mean().item() == pytest.approx(estimate.bits_per_token)
    assert (per.std(unbiased=True) / math.sqrt(21)).item() == pytest.approx(estimate.stderr_bits_per_token)
    assert "per_example" not in str(estimate) and "tensor" not in str(estimate)
    # the same seed gives the same per-example values: two models compared on one draw
    again = evaluate_nelbo(model, data, num_passes=4, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(per, again.per_example_bits)


def test_first_version_is_accepted_and_evaluated_on_test(runs):
    run = client().get_run(runs["weak"])
    (decision,) = registry.promote(run_id=runs["weak"], model_name="first")
    assert decision.promoted and decision.version == "1" and decision.holder_version is None
    assert decision.aliases_moved == ["champion-t2", "champion"]
    assert aliases("first") == {"champion-t2": "1", "champion": "1"}
    assert history("first", "champion-t2") == ["1"] and history("first", "champion") == ["1"]
    model_tags = client().get_registered_model("first").tags
    assert model_tags[DEFAULT_BUDGET_TAG] == "2"
    assert [model_tags[f"fldd.{k}"] for k in ("dataset", "vocab_size", "seq_len")] == ["toy2d", "50", "2"]
    tags = version_tags("first", "1")
    assert (tags["fldd.num_steps_T"], tags["fldd.parameterization"], tags["fldd.dataset"]) == ("2", PARAMETERIZATION, "toy2d")
    assert (tags["fldd.seq_len"], tags["fldd.vocab_size"]) == ("2", "50")
    assert float(tags["fldd.valid_nelbo_bits"]) == run.data.metrics["final_valid_nelbo_bits"]
    assert float(tags["fldd.valid_nelbo_stderr"]) == run.data.metrics["final_valid_nelbo_stderr"]
    assert tags["fldd.git_commit"] == run.data.tags["git_commit"] and tags["fldd.source"] == "run"
    assert tags["fldd.decision"] == "promoted" and tags["fldd.holder_version"] == "none"
    # the recorded test number is the test split's NELBO with seed 0, 10 passes (not a validation number)
    path, source_run = download_model_file(tracking_uri(), "models:/first@champion")
    model = FLDDModel.load(path)
    expected = evaluate_nelbo(model, load_test_split(model.config), num_passes=10,
                              generator=torch.Generator().manual_seed(0))
    assert source_run == runs["weak"] and expected.num_examples == 500
    assert tags["fldd.test_examples"] == "500"
    assert tags["fldd.test_split_sha1"] == model_store.split_fingerprint(load_test_split(model.config))
    assert float(tags["fldd.test_nelbo_bits"]) == pytest.approx(expected.bits_per_token, abs=1e-12)
    assert float(tags["fldd.test_nelbo_bits"]) != pytest.approx(run.data.metrics["final_valid_nelbo_bits"], abs=1e-6)
    # promoting the holder again changes nothing
    (again,) = registry.promote(run_id=runs["weak"], model_name="first")
    assert again.decision == "unchanged" and len(versions_of("first")) == 1


def test_worse_candidate_is_refused(runs, capsys):
    registry.promote(run_id=runs["strong"], model_name="worse")
    assert main(["promote", "--run", runs["weak"], "--model-name", "worse"]) == 1
    captured = capsys.readouterr()
    assert "fldd promote: refused (T=2): not better than holder version 1" in captured.err
    assert "REFUSED" in captured.out and "paired difference" in captured.out
    assert aliases("worse") == {"champion-t2": "1", "champion": "1"}
    assert history("worse", "champion-t2") == ["1"]
    tags = version_tags("worse", "2")
    assert tags["fldd.decision"] == "refused" and tags["fldd.holder_version"] == "1"
    assert float(tags["fldd.holder_test_nelbo_bits"]) < float(tags["fldd.test_nelbo_bits"]) - 0.3
    difference, stderr = float(tags["fldd.paired_difference_bits"]), float(tags["fldd.paired_difference_stderr"])
    assert difference == pytest.approx(float(tags["fldd.holder_test_nelbo_bits"]) - float(tags["fldd.test_nelbo_bits"]))
    assert difference < 0 and 0 < stderr < 0.2
    assert float(tags["fldd.margin_bits"]) == pytest.approx(2 * stderr)


def test_margin_refuses_a_small_win_and_a_retry_gets_a_version_of_its_own(runs):
    registry.promote(run_id=runs["weak"], model_name="margin")
    (within,) = registry.promote(run_id=runs["mid"], model_name="margin", margin=100.0)
    assert within.decision == "refused" and within.reason.startswith("within the margin of holder version 1")
    assert 10 * within.difference_stderr < within.difference_bits < 100.0 and within.margin_bits == 100.0
    assert version_tags("margin", "2")["fldd.margin_rule"] == "absolute (--margin)"
    assert aliases("margin")["champion-t2"] == "1"
    with pytest.raises(registry.RegistryError, match="margin=-1.0"):
        registry.promote(run_id=runs["mid"], model_name="margin", margin=-1.0)
    (retry,) = registry.promote(run_id=runs["mid"], model_name="margin", seed=1)  # default margin: 2 x stderr
    assert retry.promoted and retry.version == "3" and len(versions_of("margin")) == 3
    assert version_tags("margin", "2")["fldd.decision"] == "refused"  # the refusal stays on record
    assert version_tags("margin", "3")["fldd.decision"] == "promoted"
    assert version_tags("margin", "3")["fldd.eval_seed"] == "1"
    assert aliases("margin") == {"champion-t2": "3", "champion": "3"}


def test_nan_candidates_are_refused(runs):
    registry.promote(run_id=runs["weak"], model_name="nan")
    nan_metric = clone_run(runs["strong"], metrics={"final_valid_nelbo_bits": float("nan")})
    (decision,) = registry.promote(run_id=nan_metric, model_name="nan")
    assert decision.decision == "refused"
    assert "non-finite validation metric final_valid_nelbo_bits=nan" in decision.reason
    missing = clone_run(runs["strong"], drop_metrics=("final_valid_nelbo_bits",))  # training logs finite values only
    (decision,) = registry.promote(run_id=missing, model_name="nan")
    assert decision.decision == "refused" and "no final_valid_nelbo_bits metric" in decision.reason
    assert len(versions_of("nan")) == 1  # neither was registered

    # finite validation metrics, NaN weights: only the test evaluation can tell
    nan_weights = clone_run(runs["strong"], nan_weights=True)
    assert main(["promote", "--run", nan_weights, "--model-name", "nan"]) == 1
    (row,) = [v for v in versions_of("nan") if v.run_id == nan_weights]
    tags = row.tags
    assert tags["fldd.decision"] == "refused"
    assert "non-finite test NELBO of the candidate" in tags["fldd.decision_reason"]
    assert math.isnan(float(tags["fldd.test_nelbo_bits"])) and math.isfinite(float(tags["fldd.holder_test_nelbo_bits"]))
    assert aliases("nan") == {"champion-t2": "1", "champion": "1"}
    assert history("nan", "champion-t2") == ["1"]


def test_collapsed_candidate_is_refused(runs, capsys):
    registry.promote(run_id=runs["weak"], model_name="collapsed")
    collapsed = clone_run(runs["strong"], tags={"collapsed": "True"})
    assert main(["promote", "--run", collapsed, "--model-name", "collapsed"]) == 1
    assert "collapsed forward process" in capsys.readouterr().err
    assert len(versions_of("collapsed")) == 1 and aliases("collapsed")["champion-t2"] == "1"
    # the same weights with the tag cleared are better than the holder: the tag alone refused it
    (decision,) = registry.promote(run_id=clone_run(runs["strong"], tags={"collapsed": "False"}),
                                   model_name="collapsed")
    assert decision.promoted and aliases("collapsed")["champion-t2"] == "2"


def test_candidate_for_another_data_set_is_refused(runs, capsys):
    registry.promote(run_id=runs["weak"], model_name="toy")
    before = client().get_registered_model("toy").tags
    assert main(["promote", "--run", runs["digits"], "--model-name", "toy"]) == 1
    err = capsys.readouterr().err
    assert "another data set" in err and "dataset 'digits-binary' (model has 'toy2d')" in err
    assert "vocab_size '2' (model has '50')" in err and "seq_len '64' (model has '2')" in err
    assert [v.run_id for v in versions_of("toy")] == [runs["weak"]]  # nothing foreign was registered
    assert client().get_registered_model("toy").tags == before and aliases("toy")["champion-t2"] == "1"
    # without --model-name it goes to a model of its own, named after its data set
    (decision,) = registry.promote(run_id=runs["digits"])
    assert decision.promoted and decision.model_name == "fldd-digits-binary" and decision.test_examples == 284
    assert aliases("fldd-digits-binary") == {"champion-t2": "1", "champion": "1"}


def test_better_candidates_move_both_aliases_and_rollbacks_go_back_step_by_step(runs, capsys):
    name = "ladder"
    registry.promote(run_id=runs["weak"], model_name=name)
    (mid,) = registry.promote(run_id=runs["mid"], model_name=name)
    assert mid.promoted and mid.holder_version == "1" and mid.aliases_moved == ["champion-t2", "champion"]
    assert mid.difference_bits > mid.margin_bits > 0 and mid.margin_bits == pytest.approx(2 * mid.difference_stderr)
    assert mid.holder_test_bits - mid.candidate_test_bits == pytest.approx(mid.difference_bits)
    assert main(["promote", "--run", runs["strong"], "--model-name", name]) == 0
    assert "PROMOTED" in capsys.readouterr().out
    assert aliases(name) == {"champion-t2": "3", "champion": "3"}
    assert history(name, "champion-t2") == ["1", "2", "3"] and history(name, "champion") == ["1", "2", "3"]
    strong = version_tags(name, "3")
    assert strong["fldd.holder_version"] == "2"
    assert float(strong["fldd.paired_difference_bits"]) > float(strong["fldd.margin_bits"]) > 0

    assert alias_moves.rollback(name) == {"champion-t2": "2", "champion": "2"}
    assert aliases(name) == {"champion-t2": "2", "champion": "2"}
    assert history(name, "champion-t2") == ["1", "2"]
    assert main(["promote", "--rollback", "--model-name", name, "--budget", "2"]) == 0
    assert "champion-t2 -> version 1, champion -> version 1" in capsys.readouterr().out
    assert aliases(name) == {"champion-t2": "1", "champion": "1"} and history(name, "champion-t2") == ["1"]
    assert "fldd.rolled_back_at" in version_tags(name, "3") and "fldd.rolled_back_at" in version_tags(name, "2")
    assert main(["promote", "--rollback", "--model-name", name]) == 1
    assert "no previous holder" in capsys.readouterr().err
    assert aliases(name) == {"champion-t2": "1", "champion": "1"}
    # the displaced champion comes back through the gate as a new version (its old record stays)
    (back,) = registry.promote(run_id=runs["strong"], model_name=name)
    assert back.promoted and back.version == "4" and version_tags(name, "3")["fldd.decision"] == "promoted"

    assert main(["models", name]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["model", "ver", "aliases", "T"] and len(table) == 5
    assert table[4].split()[:5] == [name, "4", "champion,champion-t2", "2", PARAMETERIZATION]
    assert main(["models", "no-such-model"]) == 2
    assert main(["promote", "--rollback", "--model-name", "no-such-model"]) == 2


def test_other_budget_has_its_own_alias_and_the_champion_loads(runs, capsys, monkeypatch):
    name = "budgets"
    registry.promote(run_id=runs["mid"], model_name=name)
    (t4,) = registry.promote(run_id=runs["t4"], model_name=name)
    assert t4.promoted and t4.budget == 4 and t4.aliases_moved == ["champion-t4"]
    assert aliases(name) == {"champion-t2": "1", "champion": "1", "champion-t4": "2"}  # champion follows T=2
    assert version_tags(name, "2")["fldd.num_steps_T"] == "4"
    with pytest.raises(alias_moves.RollbackError, match="no previous holder"):
        alias_moves.rollback(name, budget=4)

    # how a user loads it: MLflow's own resolution through the process-wide tracking URI. That is
    # set for this block only (an earlier test may have left it pointing elsewhere), and
    # set_tracking_uri also writes MLFLOW_TRACKING_URI, which monkeypatch restores afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri())
    with global_tracking_uri(tracking_uri()):
        for alias, T in (("champion-t2", 2), ("champion-t4", 4)):
            sampler = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
            samples = sampler.predict(None, params={"num_samples": 5, "seed": 1})
            assert samples.shape == (5, 2) and samples.dtype == np.int64 and ((samples >= 0) & (samples < 50)).all()
            with pytest.raises(Exception, match=f"T={T} grid"):
                sampler.predict(None, params={"num_samples": 2, "steps": T + 1})
        params = {"num_samples": 64, "seed": 3}
        t2 = mlflow.pyfunc.load_model(f"models:/{name}@champion-t2").predict(None, params=params)
        direct = mlflow.pyfunc.load_model(f"runs:/{runs['mid']}/model").predict(None, params=params)
    assert np.array_equal(t2, direct)  # the alias serves the promoted run's model
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the CLI below finds the store via FLDD_HOME
    capsys.readouterr()
    assert main(["evaluate", "--model", f"models:/{name}@champion-t4", "--split", "test", "--passes", "10"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and len([k for k in metrics if k.startswith("test_kl_t")]) == 4
    assert metrics["test_nelbo_bits"] == pytest.approx(float(version_tags(name, "2")["fldd.test_nelbo_bits"]))
    assert "eval_test_nelbo_bits" in client().get_run(runs["t4"]).data.metrics


def test_sweep_promotes_the_best_eligible_trial_at_each_budget(runs, capsys):
    c = client()
    experiment = c.get_experiment_by_name("fldd").experiment_id
    parent = c.create_run(experiment, tags={"fldd.sweep": "grid", "fldd.kind": "sweep"}).info.run_id

    def trial(run_id, budget, **changes):
        tags = {"fldd.sweep": "grid", "fldd.kind": "trial", "num_steps_T": str(budget),
                "mlflow.parentRunId": parent, **changes.pop("tags", {})}
        return clone_run(run_id, tags=tags, **changes)

    weak, mid = trial(runs["weak"], 2), trial(runs["mid"], 2)
    trial(runs["strong"], 2, tags={"collapsed": "True"})  # best validation number, but collapsed
    trial(runs["strong"], 2, status="RUNNING")  # not finished
    trial(runs["strong"], 2, metrics={"final_valid_nelbo_bits": float("inf")})
    t4 = trial(runs["t4"], 4)
    found = registry.find_candidates("grid")
    assert {T: r.info.run_id for T, r in found.items()} == {2: mid, 4: t4}
    assert registry.find_candidate(sweep="grid", budget=4).info.run_id == t4
    with pytest.raises(registry.RegistryError, match=r"budgets \[2, 4\]"):
        registry.find_candidate(sweep="grid")

    assert main(["promote", "--sweep", "grid", "--model-name", "swept"]) == 0
    assert aliases("swept") == {"champion-t2": "1", "champion": "1", "champion-t4": "2"}
    swept = sorted(versions_of("swept"), key=lambda v: int(v.version))
    assert [(v.run_id, v.tags["fldd.sweep"], v.tags["fldd.source"]) for v in swept] == [(mid, "grid", "sweep"),
                                                                                        (t4, "grid", "sweep")]
    assert weak not in {v.run_id for v in versions_of("swept")}

    trial(runs["strong"], 8, tags={"collapsed": "True"})  # a budget with no eligible trial: a refusal
    capsys.readouterr()
    assert main(["promote", "--sweep", "grid", "--budget", "8", "--model-name", "swept"]) == 1
    assert "no eligible trial among 1 at T=8: collapsed forward" in capsys.readouterr().err
    (refused,) = registry.promote(sweep="grid", budget=8)
    assert (refused.decision, refused.model_name, refused.version) == ("refused", "fldd-toy2d", None)
    assert client().get_registered_model("swept").tags[DEFAULT_BUDGET_TAG] == "2"
    assert main(["promote", "--run", parent]) == 2  # the sweep's parent run holds no model
    assert f"run {parent} has no logged model" in capsys.readouterr().err
    assert main(["promote", "--sweep", "no-such-sweep"]) == 2
    assert "has no trial runs" in capsys.readouterr().err
    assert main(["promote", "--run", runs["weak"], "--budget", "2"]) == 2
    assert main(["promote", "--run", "0" * 32]) == 2


def test_ctrl_c_between_the_two_alias_moves_waits_until_both_moved(runs, monkeypatch):
    import signal

    moved = []
    real_move = alias_moves.move_alias

    def move_then_interrupt(client, name, alias, version):  # Ctrl-C right after the first alias moved
        real_move(client, name, alias, version)
        moved.append(alias)
        if len(moved) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(alias_moves, "move_alias", move_then_interrupt)
    # a plain Ctrl-C handler for the test (the session's Ray may have installed its own)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    name = "ctrl-c-model"
    try:
        with pytest.raises(KeyboardInterrupt):
            registry.promote(run_id=runs["mid"], model_name=name, passes=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert moved == ["champion-t2", "champion"]
    aliases = client().get_registered_model(name).aliases
    assert aliases["champion-t2"] == aliases["champion"]


def test_nothing_touched_the_default_store(runs):
    """Registering, judging and loading go through clients on the project store: MLflow's
    process-wide default (./mlflow.db in the working directory) is never created."""
    registry.promote(run_id=runs["weak"], model_name="default-store")
    registry.promote(run_id=runs["strong"], model_name="default-store")
    assert not (Path.cwd() / "mlflow.db").exists() and not (Path.cwd() / "mlruns").exists()


def test_a_candidate_judged_on_another_test_split_is_refused(runs):
    registry.promote(run_id=runs["weak"], model_name="split")
    client().set_model_version_tag("split", "1", "fldd.test_split_sha1", "0123456789abcdef")  # another data draw
    (decision,) = registry.promote(run_id=runs["strong"], model_name="split")
    assert decision.decision == "refused" and "test split" in decision.reason and decision.version is None
    assert aliases("split")["champion-t2"] == "1" and len(versions_of("split")) == 1


def test_a_promotion_judged_against_a_holder_that_moved_meanwhile_is_refused(runs, monkeypatch):
    """While the candidate is evaluated, another promotion moves the alias: the candidate was not
    judged against the new holder, so it must not displace it."""
    name = "moved-meanwhile"
    registry.promote(run_id=runs["weak"], model_name=name)
    evaluate, calls = registry._evaluate, []

    def evaluate_while_another_promotes(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # during the first candidate's evaluation: a second promotion lands
            monkeypatch.setattr(registry, "_evaluate", evaluate)
            (other,) = registry.promote(run_id=runs["mid"], model_name=name)
            assert other.promoted and other.holder_version == "1"
            monkeypatch.setattr(registry, "_evaluate", evaluate_while_another_promotes)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(registry, "_evaluate", evaluate_while_another_promotes)
    (late,) = registry.promote(run_id=runs["strong"], model_name=name)
    assert late.decision == "refused" and late.holder_version == "1" and late.aliases_moved == []
    assert "champion-t2 moved to version 3 while this candidate was judged against 1" in late.reason
    assert aliases(name) == {"champion-t2": "3", "champion": "3"} and history(name, "champion-t2") == ["1", "3"]
    assert version_tags(name, late.version)["fldd.decision"] == "refused"  # the record says what happened
    (again,) = registry.promote(run_id=runs["strong"], model_name=name)  # judged against the new holder now
    assert again.holder_version == "3" and again.decision in ("promoted", "refused")


def test_the_alias_lock_waits_for_its_holder_and_breaks_a_stale_one(runs):
    name = "locked"
    c = client()
    with alias_moves.alias_lock(c, name):
        assert [m.name for m in c.search_registered_models(f"name = '{name}{ALIAS_LOCK_SUFFIX}'")]
        assert name + ALIAS_LOCK_SUFFIX not in {row.name for row in model_store.list_models(client=c)}
        with pytest.raises(model_store.RegistryError, match=r"another promotion or rollback of 'locked' has held"):
            with alias_moves.alias_lock(c, name, wait_s=0.5):
                pass
        with alias_moves.alias_lock(c, name, stale_s=0.3):  # seen unchanged for 0.3 s: left by a killed process
            pass
        # the first holder's lock was broken: leaving, it must not delete a lock someone else holds now
        c.create_registered_model(name + ALIAS_LOCK_SUFFIX, tags={"fldd.lock_owner": "someone-else"})
    assert [m.tags["fldd.lock_owner"] for m in c.search_registered_models(f"name = '{name}{ALIAS_LOCK_SUFFIX}'")] == [
        "someone-else"]
    c.delete_registered_model(name + ALIAS_LOCK_SUFFIX)
    got = []

    def wait_then_hold() -> None:
        with alias_moves.alias_lock(c, name, wait_s=30):
            got.append(time.monotonic())

    with alias_moves.alias_lock(c, name):  # a waiter gets the lock once its holder leaves
        waiter = threading.Thread(target=wait_then_hold)
        waiter.start()
        time.sleep(0.5)
        left = time.monotonic()
    waiter.join(timeout=60)
    assert len(got) == 1 and got[0] >= left
    assert not c.search_registered_models(f"name = '{name}{ALIAS_LOCK_SUFFIX}'")  # released


def test_two_promotion_processes_at_once_keep_one_consistent_history(runs, registry_home):
    """Real concurrent `fldd promote` processes on one model and budget, several rounds: every
    champion was judged against the version it displaced, and the alias history holds every
    version that ever held the alias, in order."""
    name = "concurrent"
    registry.promote(run_id=runs["weak"], model_name=name)
    command = [sys.executable, "-m", "commands.cli", "promote", "--model-name", name, "--passes", "1", "--run"]
    for round_ in range(3):
        candidates = [clone_run(runs["mid"]), clone_run(runs["strong"])]
        processes = [subprocess.Popen(command + [run_id], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=Path(__file__).resolve().parents[2]) for run_id in candidates]
        try:
            outputs = [p.communicate(timeout=180)[0] for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
        # exit 0 promoted, 1 refused (by the gate, or because the other one moved the alias first)
        assert all(p.returncode in (0, 1) for p in processes) and all("Traceback" not in o for o in outputs), outputs
        assert sum("PROMOTED" in o for o in outputs) >= 1 or round_ > 0, outputs
    versions = {str(v.version): v.tags for v in versions_of(name)}
    assert len(versions) == 7  # the first and two per round: no attempt lost, none doubled
    held = history(name, "champion-t2")
    assert held[-1] == aliases(name)["champion-t2"] and len(set(held)) == len(held)
    promoted = [v for v, tags in versions.items() if tags["fldd.decision"] == "promoted"]
    assert sorted(held, key=int) == sorted(promoted, key=int)  # every champion is in the history
    for previous, version in zip(held, held[1:]):
        assert versions[version]["fldd.holder_version"] == previous, (held, versions[version])
