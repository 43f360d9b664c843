"""P1: boundaries exact, rows valid, for every forward-process parameterization."""

import pytest
import torch
import torch.nn.functional as F

from fldd.forward import LOG_ZERO
from tests.conftest import tiny_model


def all_marginals(model, x):
    T = model.num_steps
    t = torch.arange(T + 1).expand(x.shape[0], -1)
    return model.forward_process.log_marginals(x, t)  # (B, T+1, D, S)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_boundaries_exact_and_rows_valid(variant, T):
    model = tiny_model(variant, T=T, K=4, D=3)
    x = torch.randint(0, 4, (16, 3))
    log_u = all_marginals(model, x)
    u = log_u.exp()
    assert torch.isfinite(log_u).all() and (log_u >= LOG_ZERO).all()
    assert (u >= 0).all()
    torch.testing.assert_close(u.sum(-1), torch.ones_like(u.sum(-1)), atol=1e-12, rtol=0)
    assert torch.equal(u[:, 0], F.one_hot(x, model.num_states).double())  # u(x,0) = onehot(x), exactly
    assert torch.equal(u[:, T], model.forward_process.prior.expand_as(u[:, T]))  # u(x,T) = prior, exactly


def test_single_step_query_matches_multi_step_query(variant):
    model = tiny_model(variant, T=3)
    x = torch.randint(0, 3, (5, 2))
    t = torch.randint(0, 4, (5,))
    single = model.forward_process.log_marginals(x, t)
    multi = model.forward_process.log_marginals(x, torch.stack([t, t], dim=1))
    torch.testing.assert_close(single, multi[:, 0])
    torch.testing.assert_close(single, multi[:, 1])


def test_masking_variant_is_monotone_and_only_masks():
    model = tiny_model({"process.method": "fldd-mask"}, T=6, K=4, D=3)
    torch.nn.init.normal_(model.forward_process.network.output_layer.weight, std=1.0)  # non-trivial schedule
    x = torch.randint(0, 4, (32, 3))
    m = model.forward_process.mask_probabilities(x)
    assert (m[..., 1:] >= m[..., :-1]).all() and (m[..., 0] == 0).all() and (m[..., -1] == 1).all()
    u = all_marginals(model, x).exp()
    keep = u.gather(-1, x[:, None, :, None].expand(-1, 7, -1, 1)).squeeze(-1)
    torch.testing.assert_close(keep + u[..., model.mask_id], torch.ones_like(keep))
    torch.testing.assert_close(u[..., model.mask_id], m.transpose(1, 2))
    # data-dependent: different x get different schedules
    assert m.std(dim=0).max() > 1e-3


def test_warm_start_starts_at_the_floored_fixed_marginal():
    model = tiny_model({"process.method": "fldd", "process.prior": "mask", "process.warm_start": "masked",
                        "process.forward_init_scale": 0.0}, T=4)
    x = torch.randint(0, 3, (6, 2))
    u = all_marginals(model, x).exp()[:, 1:4]
    alpha = torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64)[None, :, None, None]
    eps, S = 1e-3, model.num_states
    fixed = alpha * F.one_hot(x, S).double()[:, None] + (1 - alpha) * F.one_hot(torch.tensor(3), S).double()
    torch.testing.assert_close(u, (1 - eps) * fixed + eps / S)


def test_fixed_masked_schedules():
    for schedule in ("linear", "cosine"):
        model = tiny_model({"process.method": "masked", "process.schedule": schedule}, T=4)
        x = torch.zeros(1, 2, dtype=torch.long)
        keep = all_marginals(model, x).exp()[0, :, 0, 0]
        assert keep[0] == 1 and keep[-1] == 0
        assert (keep[1:] < keep[:-1]).all()


def test_forward_floor_keeps_every_interior_state_reachable():
    """process.forward_floor: (1 - eps) softmax + eps / S, so even saturated logits leave every state
    a probability of at least eps / S (a softmax that cannot die); boundaries stay exact."""
    model = tiny_model({"process.method": "fldd", "process.warm_start": "none", "process.prior": "uniform",
                        "process.forward_floor": 0.01}, T=3, K=4, D=3)
    with torch.no_grad():
        model.forward_process.network.output_layer.bias.view(3, 4)[:, 0] += 1e4  # a saturated softmax
    x = torch.randint(0, 4, (16, 3))
    u = all_marginals(model, x).exp()
    interior = u[:, 1:3]
    assert interior.min() >= 0.01 / 4 * (1 - 1e-9) and interior[..., 0].min() > 0.99
    torch.testing.assert_close(interior.sum(-1), torch.ones_like(interior.sum(-1)), atol=1e-12, rtol=0)
    assert torch.equal(u[:, 0], F.one_hot(x, 4).double())


@pytest.mark.parametrize("T", [1, 4, 7])
def test_the_fixed_masked_forward_reveals_every_token_at_the_mean_step(T):
    """Linear schedule: a token is masked at a uniform step tau in 1..T, so revealed at T + 1 - tau,
    (T + 1) / 2 on average, for every x and position."""
    model = tiny_model({"process.method": "masked"}, T=T, K=4, D=3)
    steps = model.reveal_steps(torch.randint(0, 4, (32, 3)))
    torch.testing.assert_close(steps, torch.full_like(steps, (T + 1) / 2))


def test_reveal_step_of_a_known_masking_path(monkeypatch):
    """Paths that keep x^0 for steps 1..2 and mask it at 3 (revealed by the reverse step 3 -> 2, the
    2nd of 4), and mask x^1 at step 1 (revealed last, the 4th)."""
    model = tiny_model({"process.method": "fldd-mask"}, T=4, K=3, D=2)
    kept = {0: (1.0, 1.0), 1: (1.0, 0.0), 2: (1.0, 0.0), 3: (0.0, 0.0), 4: (0.0, 0.0)}  # t -> P(z_t^i = x^i)

    def marginals(x, t):
        p = torch.tensor([kept[int(v)] for v in t], dtype=torch.float64)  # (B, D)
        u = torch.zeros(*x.shape, model.num_states, dtype=torch.float64)
        u.scatter_(-1, x.unsqueeze(-1), p.unsqueeze(-1))
        u[..., model.mask_id] += 1 - p
        return u.clamp_min(1e-300).log()

    monkeypatch.setattr(model.forward_process, "log_marginals", marginals)
    torch.testing.assert_close(model.reveal_steps(torch.tensor([[2, 1], [0, 0]])),
                               torch.tensor([[2.0, 4.0], [2.0, 4.0]], dtype=torch.float64))


def test_a_learned_masking_forward_reveals_within_the_budget():
    model = tiny_model({"process.method": "fldd-mask"}, T=5, K=4, D=3)
    steps = model.reveal_steps(torch.randint(0, 4, (64, 3)))
    assert ((steps >= 1 - 1e-9) & (steps <= 5 + 1e-9)).all()
