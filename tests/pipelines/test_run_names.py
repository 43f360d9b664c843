"""Default run names: two configs that differ in any model-defining setting never share a run
(on shared storage they would resume each other); extending a run keeps its name."""

from pipelines.train import default_run_name
from tests.pipelines.conftest import toy_config


def test_default_name_tells_parameterizations_and_hyperparameters_apart():
    base = toy_config()
    names = {default_run_name(cfg) for cfg in (
        base, base.with_parameterization("masked"), base.with_parameterization("masked-x0"),
        base.with_overrides({"train.lr": 3e-4}), base.with_overrides({"train.forward_lr": 1e-4}),
        base.with_overrides({"process.num_steps": 4}), base.with_overrides({"train.seed": 1}))}
    assert len(names) == 7
    assert default_run_name(base.with_parameterization("masked-x0")).startswith("toy2d-masked-x0-T2-seed0-")


def test_default_name_survives_a_longer_run():
    base = toy_config()
    longer = base.with_overrides({"train.steps": 10 * base.train.steps, "train.log_every": 7})
    assert default_run_name(longer) == default_run_name(base)
