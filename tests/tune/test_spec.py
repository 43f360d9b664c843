"""Sweep files: parsing, the checks that fail before Ray starts, and what a trial's config becomes."""

import pytest
from ray.tune.search.variant_generator import generate_variants

from fldd.config import CONFIG_DIR, ConfigError
from tune.spec import SweepSpec

BASE = {"base": "toy2d", "set": {"train.steps": 100, "train.checkpoint_every": 20}, "budgets": [2, 4]}


def spec(**changes) -> SweepSpec:
    return SweepSpec.from_dict({**BASE, **changes}, CONFIG_DIR)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("sweep-*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_parse(path):
    loaded = SweepSpec.from_yaml(path, CONFIG_DIR)
    assert loaded.budgets and loaded.metric == "valid_nelbo_bits" and loaded.trials_per_budget() >= 1


def test_trial_config_applies_preset_then_values_then_budget():
    s = spec(space={"parameterization": {"grid": ["masked-x0", "fldd-mask-carry"]},
                    "train.lr": {"loguniform": [1e-4, 1e-2]}})
    cfg = s.trial_config({"parameterization": "masked-x0", "train.lr": 5e-4}, 4)
    assert (cfg.process.method, cfg.process.reverse_parameterization) == ("masked", "x0")
    assert cfg.train.lr == 5e-4 and cfg.process.num_steps == 4 and cfg.train.steps == 100
    assert s.trials_per_budget() == 2 and s.reports_per_trial == 5


def test_only_keys_leave_other_parameterizations_at_the_base_value():
    s = spec(space={"parameterization": {"grid": ["masked-x0", "fldd-mask-carry"]},
                    "train.forward_lr": {"loguniform": [1e-5, 1e-3], "only": ["fldd-mask-carry"]}},
             samples=3)
    variants = [config for seed in range(3) for _, config in generate_variants(s.param_space(), random_state=seed)]
    assert sorted(v["parameterization"] for v in variants) == ["fldd-mask-carry"] * 3 + ["masked-x0"] * 3
    for values in variants:
        if values["parameterization"] == "masked-x0":
            assert values["train.forward_lr"] is None  # the trial keeps the base value
            assert s.trial_config(values, 2).train.forward_lr == s.base.train.forward_lr
        else:
            assert 1e-5 <= values["train.forward_lr"] <= 1e-3
            assert s.trial_config(values, 2).train.forward_lr == values["train.forward_lr"]


@pytest.mark.parametrize("steps, every, grace", [(110, 20, 1), (4000, 500, 2), (3000, 500, 2), (100, 20, 1)])
def test_reports_count_the_final_checkpoint_and_asha_never_stops_a_trial_at_its_end(steps, every, grace):
    from tune.sweep import _scheduler

    s = spec(set={"train.steps": steps, "train.checkpoint_every": every},
             scheduler={"type": "asha", "grace_period": grace, "reduction_factor": 2})
    assert s.reports_per_trial == -(-steps // every)  # e.g. 110/20: reports at 20, 40, ..., 100 and 110
    asha = _scheduler(s)
    reports = sorted({*range(every, steps + 1, every), steps})
    milestones = [milestone for bracket in asha._brackets for milestone, _ in bracket._rungs]
    assert asha._time_attr == "step" and milestones and min(milestones) == every * grace
    # every rung is decided at a report before the last one (4000/500: a rung at 4000 killed
    # finished trials before their final evaluation)
    assert all(milestone <= reports[-2] for milestone in milestones)


def test_the_digest_tells_sweeps_apart():
    assert spec().digest() == spec().digest()
    assert spec().digest() != spec(samples=2).digest()
    assert spec().digest() != spec(budgets=[2, 8]).digest()


@pytest.mark.parametrize("changes, message", [
    ({"metric": "test_nelbo_bits"}, "validation"),
    ({"budgets": [2, 2]}, "repeats"),
    ({"budgets": [0]}, "budgets"),
    ({"space": {"process.num_steps": {"grid": [2, 4]}}}, "budgets"),
    ({"space": {"parameterization": {"grid": ["mdlm"]}}}, "unknown 'mdlm'"),
    ({"space": {"parameterization": "mdlm"}}, "unknown 'mdlm'"),
    ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "0 < low"),
    ({"space": {"train.lr": {"normal": [0, 1]}}}, "exactly one of"),
    ({"space": {"train.lr": {"grid": [1e-3], "only": ["fldd"]}}}, "not grid"),
    ({"space": {"train.nope": {"choice": [1]}}}, "unknown config key 'train.nope'"),
    # a corner of the space that is no valid config fails before Ray starts, naming the field
    ({"space": {"parameterization": {"grid": ["fldd", "masked"]},
                "train.num_zt_samples": {"choice": [1, 2]}}}, "train.num_zt_samples"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type"),
    ({"resources": {"workers_per_trial": 0}}, "workers_per_trial"),
    ({"resources": {"gpus": 1}}, "resources.gpus"),
    ({"resources": {"gpus_per_worker": 0.5}}, "must be 0 or 1"),
    ({"resources": {"cpus_per_worker": "0.9"}}, "must be a number"),
    # both ends of a range are checked: width 0 is no network
    ({"space": {"reverse_network.width": {"randint": [0, 64]}}}, "reverse_network.width"),
    ({"samples": 0}, "samples"),
    # a config under several seeds is ranked by its mean: no random key, no early stopping of single seeds
    ({"space": {"train.seed": {"grid": [0, 1]}, "train.lr": {"loguniform": [1e-4, 1e-3]}},
      "scheduler": {"type": "fifo"}}, "'train.lr' is random"),
    ({"space": {"train.seed": {"grid": [0, 1]}}, "scheduler": {"type": "asha"}}, "fifo"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    # the wrong shape is named, not a TypeError
    ({"resources": 5}, "resources=5 must be a mapping"),
    ({"scheduler": "asha"}, "scheduler='asha' must be a mapping"),
    ({"space": ["train.lr"]}, "space=.* must be a mapping"),
    ({"set": [1]}, "set=.* must be a mapping"),
    ({"budgets": 4}, "budgets=4 must be a list"),
])
def test_bad_sweeps_fail_naming_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        spec(**changes)


def test_missing_sweep_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SweepSpec.from_yaml(tmp_path / "nope.yaml", CONFIG_DIR)
