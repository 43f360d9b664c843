"""Reverse parameterizations beyond the direct one: x0 (predict the data; fixed forwards) and
carry-over (masking-only forwards)."""

import pytest
import torch

from fldd.config import ConfigError
from fldd.posterior import max_coupling_posterior
from tests.conftest import tiny_config, tiny_model


@pytest.mark.parametrize("method", ["masked", "uniform"])
def test_a_point_mass_prediction_gives_the_true_posterior(method):
    """With p(x | z_t) = onehot(x), sum_c p(c) q(z_s | z_t, c) must be q(z_s | z_t, x) exactly."""
    model = tiny_model({"process.method": method, "process.reverse_parameterization": "x0"}, T=4, K=3, D=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (16, 5), generator=g)
    for t_value in range(1, 5):
        t = torch.full((16,), t_value)
        log_u = model.forward_process.log_marginals(x, torch.stack([t, t - 1], dim=1))
        z_t = torch.multinomial(log_u[:, 0].exp().reshape(-1, log_u.shape[-1]), 1, generator=g).view(16, 5)
        log_point_mass = torch.log(torch.nn.functional.one_hot(x, 3).double().clamp_min(1e-300))
        p = model.x0_reverse_log_probs(log_point_mass, z_t, t).exp()
        torch.testing.assert_close(p, max_coupling_posterior(z_t, log_u[:, 1], log_u[:, 0]))


def test_masked_x0_carries_revealed_tokens_over_and_never_ends_on_mask():
    model = tiny_model({"process.method": "masked", "process.reverse_parameterization": "x0"}, T=4, K=3, D=6)
    mask = model.mask_id
    z_t = torch.tensor([[0, 1, 2, mask, mask, mask]] * 4)
    for t_value in (1, 2, 4):
        p = model.reverse_log_probs(z_t, torch.full((4,), t_value)).exp()
        torch.testing.assert_close(p.sum(-1), torch.ones(4, 6, dtype=p.dtype))
        assert torch.all(p[:, :3].gather(-1, z_t[:, :3, None]) > 1 - 1e-9)  # revealed tokens stay
        if t_value == 1:
            assert torch.all(p[:, 3:, mask] < 1e-9)  # z_0 is data


def test_x0_needs_a_fixed_forward():
    with pytest.raises(ConfigError, match="reverse_parameterization"):
        tiny_config({"process.method": "fldd", "process.reverse_parameterization": "x0"})


@pytest.mark.parametrize("method", ["masked", "fldd-mask"])
def test_carry_over_keeps_revealed_tokens_and_predicts_masked_ones(method):
    model = tiny_model({"process.method": method, "process.reverse_parameterization": "carry-over"}, T=3, K=3, D=4)
    mask = model.mask_id
    z_t = torch.tensor([[0, 2, mask, mask]] * 5)
    for t_value in (1, 3):
        p = model.reverse_log_probs(z_t, torch.full((5,), t_value)).exp()
        torch.testing.assert_close(p.sum(-1), torch.ones(5, 4, dtype=p.dtype))
        assert torch.all(p[:, 0, 0] > 1 - 1e-9) and torch.all(p[:, 1, 2] > 1 - 1e-9)
        assert torch.all(p[:, 2:].max(dim=-1).values < 1 - 1e-3)  # masked positions: a real prediction


def test_carry_over_needs_a_masking_only_forward():
    with pytest.raises(ConfigError, match="masking-only"):
        tiny_config({"process.method": "fldd", "process.reverse_parameterization": "carry-over"})
