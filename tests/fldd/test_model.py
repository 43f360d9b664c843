"""The model object: bad input, persistence, non-finite losses."""

import pytest
import torch

from fldd.config import ConfigError
from fldd.model import CheckpointError, FLDDModel
from fldd.train import NonFiniteLossError, TrainSchedule, build_optimizer, train_loop
from tests.conftest import tiny_config, tiny_model


@pytest.mark.parametrize("x, message", [
    (torch.tensor([[0, 3]]), "x holds token 3, outside \\[0, 3\\)"),
    (torch.tensor([[-1, 0]]), "x holds token -1"),
    (torch.tensor([[0.0, 1.0]]), "integer token ids"),
    (torch.tensor([[0, 1, 2]]), "shape \\(batch, 2\\)"),
    (torch.tensor([0, 1]), "shape \\(batch, 2\\)"),
])
def test_bad_tokens_are_rejected_by_name(x, message):
    model = tiny_model(T=2)
    with pytest.raises(ValueError, match=message):
        model(x)


def test_bad_configs_raise():
    with pytest.raises(ConfigError, match="process.num_steps=0"):
        FLDDModel(tiny_config({"process.num_steps": 0}))
    cfg = tiny_config()
    cfg.process.method = "gaussian"  # bypassing with_overrides still validates in the model
    with pytest.raises(ConfigError, match="process.method='gaussian'"):
        FLDDModel(cfg)


def test_save_load_round_trip(tmp_path, variant):
    model = tiny_model(variant, T=3, double=False)
    model.collapsed.fill_(True)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = FLDDModel.load(path, expected_config=model.config)
    z, t = torch.tensor([[0, 1], [2, 2]]), torch.tensor([1, 3])
    torch.testing.assert_close(loaded.reverse_log_probs(z, t), model.reverse_log_probs(z, t))
    x = torch.tensor([[0, 1], [2, 2]])
    torch.testing.assert_close(loaded.forward_process.log_marginals(x, t), model.forward_process.log_marginals(x, t))
    assert bool(loaded.collapsed)
    assert loaded.config == model.config


def test_codec_survives_save_and_load(tmp_path):
    from fldd.codec import TokenCodec

    codec = TokenCodec("columns", columns=("size", "colour"), categories=(("L", "M", "S"), ("blue", "réd")))
    model = FLDDModel(tiny_config(K=3, D=2), codec=codec)
    model.save(tmp_path / "with.pt")
    assert FLDDModel.load(tmp_path / "with.pt").codec == codec
    FLDDModel(tiny_config()).save(tmp_path / "without.pt")
    assert FLDDModel.load(tmp_path / "without.pt").codec is None


def test_load_errors(tmp_path):
    model = tiny_model(T=3, double=False)
    path = tmp_path / "model.pt"
    model.save(path)
    other = tiny_config({"process.num_steps": 4})
    with pytest.raises(CheckpointError, match="process.num_steps: expected 4, found 3"):
        FLDDModel.load(path, expected_config=other)
    # train settings may differ: they do not define parameters
    FLDDModel.load(path, expected_config=tiny_config({"process.num_steps": 3, "train.lr": 0.5}))
    with pytest.raises(CheckpointError, match="does not exist"):
        FLDDModel.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        FLDDModel.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an FLDD model checkpoint"):
        FLDDModel.load(tmp_path / "foreign.pt")
    wider = FLDDModel(tiny_config({"process.num_steps": 3}, width=32))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        wider.load_state(model.state_dict())


def test_nan_loss_raises_naming_step_and_term():
    model = tiny_model({"process.method": "masked"}, T=2, double=False)
    optimizer = build_optimizer(model, model.config.train)
    batches = iter([torch.tensor([[0, 1], [1, 2]])] * 5)
    train_loop(model, batches, optimizer, num_steps=2, schedule=TrainSchedule(model.config.train, False))
    with torch.no_grad():
        model.reverse.output_layer.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 2: term\(s\) \['nelbo', 'kl'\]"):
        train_loop(model, batches, optimizer, num_steps=4, start_step=2,
                   schedule=TrainSchedule(model.config.train, False))


def test_forward_returns_a_loss_dict_for_ddp():
    model = tiny_model({"process.method": "fldd"}, T=2, double=False)
    out = model(torch.tensor([[0, 1], [1, 2], [2, 2], [0, 0]]))
    assert set(out) >= {"loss", "nelbo", "kl", "score"}
    out["loss"].backward()
    assert all(p.grad is not None for p in model.reverse_parameters())
    assert all(p.grad is not None for p in model.forward_parameters())


# ---- starting from a trained fixed-forward baseline (train.init_from) ------------------------

MASKED_CARRY = {"process.method": "masked", "process.reverse_parameterization": "carry-over"}
FLDD_MASK_CARRY = {"process.method": "fldd-mask", "process.reverse_parameterization": "carry-over"}


@pytest.mark.parametrize("source_overrides, target", [
    (MASKED_CARRY, FLDD_MASK_CARRY),  # the learned masking order starts on the linear masked schedule
    ({"process.method": "masked"},  # the general learned forward, warm-started with a zero residual
     {"process.method": "fldd", "process.warm_start": "masked", "process.forward_init_scale": 0.0,
      "process.warm_start_floor": 1e-12}),
    (MASKED_CARRY, MASKED_CARRY),  # the same fixed forward: continuing the baseline
], ids=["fldd-mask-carry", "fldd-warm", "masked-carry"])
def test_a_model_started_from_a_baseline_is_that_baseline_at_step_0(source_overrides, target):
    from fldd.exact import enumerate_states, exact_nelbo

    source = tiny_model(source_overrides, seed=1)
    with torch.no_grad():  # a "trained" baseline: reverse weights far from any initialisation
        for parameter in source.reverse.parameters():
            parameter.add_(torch.randn_like(parameter))
    model = tiny_model(target, seed=2)
    x = enumerate_states(2, 3)
    before = exact_nelbo(model, x)
    model.init_from(source)
    torch.testing.assert_close(exact_nelbo(model, x), exact_nelbo(source, x))
    assert not torch.allclose(before, exact_nelbo(source, x))  # the copy is what made them equal
    assert model.forward_process.learned == ("fldd" in target["process.method"])


@pytest.mark.parametrize("source_overrides, message", [
    ({**MASKED_CARRY, "reverse_network.width": 32}, "reverse_network.width"),
    ({"process.method": "masked", "process.reverse_parameterization": "x0"}, "process.reverse_parameterization"),
    (FLDD_MASK_CARRY, "is learned"),
    ({**MASKED_CARRY, "process.schedule": "cosine"}, "linear masked schedule"),
    ({**MASKED_CARRY, "process.num_steps": 3}, "process.num_steps"),
])
def test_an_incompatible_source_is_refused_naming_the_field(source_overrides, message):
    model = tiny_model(FLDD_MASK_CARRY)
    with pytest.raises(ConfigError, match=message):
        model.init_from(tiny_model(source_overrides))


def test_a_general_learned_forward_must_start_exactly_at_the_source():
    warm = {"process.method": "fldd", "process.warm_start": "masked", "process.forward_init_scale": 0.0}
    with pytest.raises(ConfigError, match="warm_start_floor"):  # the default floor 1e-3 is not "at" it
        tiny_model(warm).init_from(tiny_model({"process.method": "masked"}))
    with pytest.raises(ConfigError, match="forward_init_scale"):
        tiny_model({**warm, "process.forward_init_scale": 1.0, "process.warm_start_floor": 1e-12}).init_from(
            tiny_model({"process.method": "masked"}))


def test_a_format_1_checkpoint_is_refused_with_what_to_do(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["format"] = "fldd-model/1"
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="earlier fldd .format fldd-model/1.*train the model again"):
        FLDDModel.load(tmp_path / "old.pt")


def test_an_auto_prior_matches_the_prior_it_stands_for(tmp_path):
    from fldd.model import config_differences

    auto = tiny_config({"process.method": "fldd", "process.warm_start": "none"})
    explicit = auto.with_overrides({"process.prior": "uniform"})
    assert config_differences(auto, explicit) == []
    assert config_differences(auto, auto.with_overrides({"process.prior": "mask"})) != []


def test_auto_start_and_phase_compare_as_what_they_resolve_to_and_only_where_they_mean_something():
    """A run saved with warm_start/forward_freeze_fraction "auto" resumes or loads under the values
    they stand for at its T; a real difference is still named; a fixed forward ignores the warm start."""
    from fldd.model import config_differences

    auto = tiny_config({"process.method": "fldd", "process.num_steps": 4, "process.warm_start": "auto",
                        "train.forward_freeze_fraction": "auto"})
    explicit = auto.with_overrides({"process.warm_start": "masked", "train.forward_freeze_fraction": 0.3})
    assert config_differences(auto, explicit) == []
    assert auto.resolved_flat_dict() == explicit.resolved_flat_dict()
    assert any(d.startswith("process.warm_start") for d in
               config_differences(auto, auto.with_overrides({"process.warm_start": "none"})))
    other_phase = auto.with_overrides({"train.forward_freeze_fraction": 0.1}).resolved_flat_dict()
    assert other_phase["train.forward_freeze_fraction"] == 0.1 != auto.resolved_flat_dict()["train.forward_freeze_fraction"]
    fixed = auto.with_parameterization("masked-x0")
    assert config_differences(fixed, fixed.with_overrides({"process.warm_start": "none"})) == []


@pytest.mark.parametrize("method", ["masked", "uniform"])
def test_the_x0_reverse_is_the_predicted_mixture_of_max_coupling_rows(method):
    """p(z_s | z_t) = sum_c p(x = c | z_t) q(z_s | z_t, x = c), checked against the full coupling
    table of posterior.py at mixed steps t (the model gathers only the rows it needs)."""
    from fldd.posterior import max_coupling_matrix

    torch.manual_seed(0)
    model = FLDDModel(tiny_config({"process.method": method, "process.reverse_parameterization": "x0",
                                   "process.num_steps": 5})).double()
    B, K, T = 9, model.config.vocab_size, model.num_steps
    z_t = torch.randint(0, model.num_states, (B, model.config.seq_len))
    t = torch.randint(1, T + 1, (B,))
    log_p_x = torch.log_softmax(torch.randn(B, model.config.seq_len, K, dtype=torch.float64), dim=-1)
    tokens = torch.arange(K)
    expected = torch.zeros(B, model.config.seq_len, model.num_states, dtype=torch.float64)
    for b in range(B):
        log_u_t = model.forward_process.log_marginals(tokens[None], t[b].expand(1))[0]  # (K, S)
        log_u_s = model.forward_process.log_marginals(tokens[None], (t[b] - 1).expand(1))[0]
        table = max_coupling_matrix(log_u_s, log_u_t)  # (c, from k, to j)
        for d in range(model.config.seq_len):
            expected[b, d] = (log_p_x[b, d].exp()[:, None] * table[:, z_t[b, d]]).sum(dim=0)
    got = model.x0_reverse_log_probs(log_p_x, z_t, t).exp()
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-9, rtol=1e-9)
