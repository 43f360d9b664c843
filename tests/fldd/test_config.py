import pytest

from pathlib import Path

from fldd.config import CONFIG_DIR, PARAMETERIZATIONS, ConfigError, FLDDConfig

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_round_trip(tmp_path):
    cfg = FLDDConfig().with_overrides(["process.method=masked", "process.num_steps=8", "train.lr=3e-4"])
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = FLDDConfig.from_yaml(path)
    assert again == cfg
    assert again.train.lr == pytest.approx(3e-4)
    assert again.num_states == cfg.vocab_size + 1  # masked adds the MASK state


@pytest.mark.parametrize("override, field", [
    ({"process.num_steps": 0}, "process.num_steps=0"),
    ({"process.method": "diffusion"}, "process.method='diffusion'"),
    ({"train.estimator": "loo", "train.num_zt_samples": 1}, "train.num_zt_samples=1"),
    ({"train.batch_size": 7}, "train.batch_size=7"),
    ({"reverse_network.arch": "transformer", "reverse_network.heads": 3}, "reverse_network.heads=3"),
    ({"process.warm_start": "masked", "process.prior": "uniform"}, "process.prior='uniform'"),
    ({"vocab_size": 1}, "vocab_size=1"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        FLDDConfig().with_overrides(override)


def test_unknown_and_mistyped_keys():
    with pytest.raises(ConfigError, match="train.lrr"):
        FLDDConfig().with_overrides(["train.lrr=1"])
    with pytest.raises(ConfigError, match="process.num_steps='two'"):
        FLDDConfig.from_dict({"process": {"num_steps": "two"}})
    with pytest.raises(ConfigError, match="key=value"):
        FLDDConfig().with_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        FLDDConfig.from_yaml("/nonexistent/config.yaml")


def test_state_space_follows_method():
    toy = FLDDConfig(vocab_size=50)
    assert toy.with_overrides({"process.method": "uniform"}).num_states == 50
    assert toy.with_overrides({"process.method": "fldd-mask"}).num_states == 51
    assert toy.with_overrides({"process.prior": "mask"}).num_states == 51


@pytest.mark.parametrize("name", sorted(PARAMETERIZATIONS))
def test_parameterization_presets_round_trip(name):
    cfg = FLDDConfig().with_parameterization(name)
    assert cfg.parameterization == name
    assert {"process.method", "process.reverse_parameterization"} <= PARAMETERIZATIONS[name].keys()


def test_parameterization_names_the_pair():
    assert set(PARAMETERIZATIONS) == {"fldd", "fldd-mask", "fldd-mask-carry", "masked", "masked-x0", "uniform"}
    cfg = FLDDConfig().with_parameterization("masked-x0")
    assert (cfg.process.method, cfg.process.reverse_parameterization) == ("masked", "x0")
    # applying a preset replaces both halves: masked-x0 -> fldd does not keep x0 (invalid for fldd)
    assert cfg.with_parameterization("fldd").process.reverse_parameterization == "direct"
    odd = FLDDConfig().with_overrides({"process.method": "masked", "process.reverse_parameterization": "carry-over"})
    assert odd.parameterization == "masked+carry-over"


def test_unknown_parameterization_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"parameterization='mdlm'.*masked-x0"):
        FLDDConfig().with_parameterization("mdlm")


def test_cli_method_applies_the_preset():
    from commands.cli import build_parser
    from commands.model_commands import build_config

    cfg = build_config(build_parser().parse_args(["train", "--method", "masked-x0", "--steps", "4"]))
    assert (cfg.process.method, cfg.process.reverse_parameterization, cfg.process.num_steps) == ("masked", "x0", 4)
    assert cfg.parameterization == "masked-x0"
    with pytest.raises(SystemExit):  # argparse rejects names outside PARAMETERIZATIONS
        build_parser().parse_args(["train", "--method", "mdlm"])


def test_auto_start_is_random_at_two_steps_and_masked_above_with_the_phase_that_start_needs():
    """warm_start: auto and forward_freeze_fraction: auto (the toy2d preset) follow T: a random start
    with no reverse-only phase at T <= 2, the masked warm start with a 30% one above; a learned
    masking order keeps its reverse-only phase; a number or a fixed start is kept as given."""
    from fldd.train import TrainSchedule

    auto = FLDDConfig(seq_len=2, vocab_size=5).with_overrides(
        {"process.warm_start": "auto", "train.forward_freeze_fraction": "auto", "train.steps": 100})
    two, four = (auto.with_overrides({"process.num_steps": T}) for T in (2, 4))
    assert (two.resolved_warm_start, two.resolved_freeze_fraction, two.num_states) == ("none", 0.0, 5)
    assert (four.resolved_warm_start, four.resolved_freeze_fraction, four.num_states) == ("masked", 0.3, 6)
    assert auto.with_overrides({"process.num_steps": 16, "process.warm_start": "none"}).resolved_freeze_fraction == 0.0
    mask_order = two.with_parameterization("fldd-mask-carry")
    assert mask_order.resolved_freeze_fraction == 0.3
    assert two.with_overrides({"train.forward_freeze_fraction": 0.1}).resolved_freeze_fraction == 0.1
    # the schedule runs on the resolved fraction; the raw word alone is refused, not read as 0
    assert TrainSchedule(four.train, True, freeze_fraction=four.resolved_freeze_fraction).phase(29).name == "reverse-only"
    assert TrainSchedule(two.train, True, freeze_fraction=two.resolved_freeze_fraction).phase(0).name != "reverse-only"
    with pytest.raises(ValueError, match="resolved_freeze_fraction"):
        TrainSchedule(four.train, True)
    for bad, message in (("often", "must be in \\[0, 1\\) or 'auto'"), (True, "expected a number")):
        with pytest.raises(ConfigError, match=message):
            auto.with_overrides({"train.forward_freeze_fraction": bad})
    assert FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml").with_overrides(
        {"process.num_steps": 8, "seq_len": 2, "vocab_size": 50}).resolved_warm_start == "masked"


def test_auto_prior_follows_the_warm_start():
    """process.prior: auto (the default) is MASK for a masked warm start and uniform otherwise (the
    paper's random start); an explicit prior is kept, and a contradictory one is refused."""
    base = FLDDConfig(seq_len=2, vocab_size=5)
    assert base.process.prior == "auto" and base.process.warm_start == "masked"
    assert base.resolved_prior == "mask" and base.num_states == 6
    random = base.with_overrides({"process.warm_start": "none"})
    assert random.resolved_prior == "uniform" and random.num_states == 5
    assert random.with_overrides({"process.prior": "mask"}).num_states == 6
    assert base.with_overrides({"process.warm_start": "uniform"}).resolved_prior == "uniform"
    with pytest.raises(ConfigError, match="process.prior='uniform'"):
        base.with_overrides({"process.prior": "uniform"})
    auto = base.with_overrides({"process.warm_start": "auto", "process.num_steps": 4})
    with pytest.raises(ConfigError, match="warm_start=auto means 'masked' at T=4"):  # not a start the user wrote
        auto.with_overrides({"process.prior": "uniform"})
    with pytest.raises(ConfigError, match="process.forward_floor"):
        base.with_overrides({"process.method": "masked", "process.forward_floor": 0.01})
