"""P6-P11, P15: the NELBO, its estimators, and its reporting."""

import itertools
import math
import statistics

import pytest
import torch

from fldd.exact import enumerate_states, exact_negative_log_likelihood, exact_nelbo, exact_step_kl, log_q_states
from fldd.objective import (
    evaluate_nelbo, kl_divergence, leave_one_out_baseline, reinforce_surrogate, step_kl, training_loss,
)
from fldd.posterior import max_coupling_posterior
from tests.conftest import RANDOM_FLDD, tiny_model

X = torch.tensor([[0, 2], [1, 1], [2, 0]])


def step_parts(model, x, t_value):
    t = torch.full((x.shape[0],), t_value)
    log_u = model.forward_process.log_marginals(x, torch.stack([t, t - 1], dim=1))
    return t, log_u[:, 0], log_u[:, 1]


def test_kl_handles_zeros():
    q = torch.tensor([0.0, 0.5, 0.5], requires_grad=True)
    log_p = torch.log(torch.tensor([0.2, 0.4, 0.4]))
    kl = kl_divergence(q, log_p)
    torch.testing.assert_close(kl, torch.tensor(math.log(0.5 / 0.4)))
    kl.backward()
    assert torch.isfinite(q.grad).all()


def test_nelbo_bounds_the_exact_nll(variant):  # P8
    for T in (1, 2, 3):
        model = tiny_model(variant, T=T)
        with torch.no_grad():
            for p in model.reverse.parameters():  # a non-trivial reverse model
                p.add_(0.5 * torch.randn_like(p))
        x = enumerate_states(2, 3)
        nelbo = exact_nelbo(model, x)
        nll = exact_negative_log_likelihood(model, x)
        assert (nelbo >= nll - 1e-9).all(), (T, (nelbo - nll).min())
        assert exact_sample_pmf_sums_to_one(model)


def exact_sample_pmf_sums_to_one(model):
    from fldd.exact import exact_sample_distribution
    return abs(exact_sample_distribution(model).sum().item() - 1) < 1e-6


def test_t1_term_is_reconstruction():  # P6: the t=1 term is -log p(z_0 = x | z_1)
    model = tiny_model({"process.method": "fldd"}, T=3)
    states = enumerate_states(2, model.num_states)
    t, log_u_1, _ = step_parts(model, X, 1)
    log_p = model.reverse_log_probs(states, torch.ones(len(states), dtype=torch.long))  # (n, D, S)
    recon = -sum(log_p[:, i, X[:, i]] for i in range(2)).T  # (B, n): -log p(x | z_1) for every z_1
    expected = (log_q_states(log_u_1, states).exp() * recon).sum(1)
    torch.testing.assert_close(exact_step_kl(model, X, 1, states), expected)


def test_frozen_masked_equals_discrete_absorbing_nelbo():  # P7
    """An independent D3PM/MDLM-absorbing NELBO: enumerate which positions are masked."""
    T = 4
    model = tiny_model({"process.method": "masked"}, T=T)
    M = model.mask_id
    alpha = [1 - t / T for t in range(T + 1)]
    expected = torch.zeros(len(X), dtype=torch.float64)
    for b, x in enumerate(X):
        for t in range(1, T + 1):
            a_s, a_t = alpha[t - 1], alpha[t]
            for masked in itertools.product([False, True], repeat=2):
                z = torch.where(torch.tensor(masked), torch.tensor(M), x)
                prob = math.prod((1 - a_t) if m else a_t for m in masked)
                log_p = model.reverse_log_probs(z[None], torch.tensor([t]))[0]
                kl = 0.0
                for i, m in enumerate(masked):
                    if not m:  # unmasked tokens stay: q = delta_x
                        kl += -log_p[i, x[i]]
                    else:  # masked: reveal x w.p. (a_s - a_t)/(1 - a_t), stay masked otherwise
                        q_x, q_m = (a_s - a_t) / (1 - a_t), (1 - a_s) / (1 - a_t)
                        for q, j in ((q_x, x[i]), (q_m, M)):
                            if q > 0:
                                kl += q * (math.log(q) - log_p[i, j])
                expected[b] += prob * kl
    torch.testing.assert_close(exact_nelbo(model, X), expected)


def test_loss_is_kl_not_cross_entropy():  # P9
    model = tiny_model({**RANDOM_FLDD, "process.forward_init_scale": 5.0}, T=2)
    states = enumerate_states(2, model.num_states)
    t, log_u_t, log_u_s = step_parts(model, X, 2)
    z = states.unsqueeze(0).expand(len(X), -1, -1)
    q = max_coupling_posterior(z, log_u_s[:, None], log_u_t[:, None])
    log_p = model.reverse_log_probs(states, torch.full((len(states),), 2))[None]
    weights = log_q_states(log_u_t, states).exp()
    kl = (weights * step_kl(q, log_p)).sum()
    cross_entropy = (weights * -(q * log_p).sum((-1, -2))).sum()
    entropy = (weights * -(torch.special.xlogy(q, q)).sum((-1, -2))).sum()
    torch.testing.assert_close(kl, cross_entropy - entropy)
    phi = model.forward_parameters()
    g_kl = torch.autograd.grad(kl, phi, retain_graph=True)
    g_ce = torch.autograd.grad(cross_entropy, phi)
    difference = sum((a - b).norm() ** 2 for a, b in zip(g_kl, g_ce)).sqrt()
    assert difference > 0.1 * sum(a.norm() ** 2 for a in g_kl).sqrt()


def expected_surrogate_gradients(model, x, t_value, num_samples, baseline_fn):
    """E over all M-tuples of z_t of the surrogate's phi-gradient, by enumeration."""
    states = enumerate_states(2, model.num_states)
    t, log_u_t, log_u_s = step_parts(model, x, t_value)
    z_all = states.unsqueeze(0).expand(len(x), -1, -1)
    q = max_coupling_posterior(z_all, log_u_s[:, None], log_u_t[:, None])
    log_p = model.reverse_log_probs(states, torch.full((len(states),), t_value))[None]
    loss = step_kl(q, log_p)  # (B, n) per z_t
    log_q = log_q_states(log_u_t, states)  # (B, n)
    total = 0.0
    for combo in itertools.product(range(len(states)), repeat=num_samples):
        idx = torch.tensor(combo)
        l_m, lq_m = loss[:, idx].reshape(-1), log_q[:, idx].reshape(-1)  # grouped (B * M,)
        weight = log_q[:, idx].detach().sum(1).exp().repeat_interleave(num_samples)
        surrogate = reinforce_surrogate(l_m, lq_m, baseline_fn(l_m.detach(), num_samples))
        total = total + (weight * surrogate).sum() / num_samples
    return torch.autograd.grad(total, model.forward_parameters())


@pytest.mark.parametrize("t_value", [1, 2])
@pytest.mark.parametrize("estimator", ["none", "loo"])
def test_surrogate_expected_gradient_is_exact(t_value, estimator):  # P10
    model = tiny_model({**RANDOM_FLDD, "process.forward_init_scale": 3.0}, T=2, K=2)
    x = torch.tensor([[0, 1], [1, 1], [1, 0]])
    exact = exact_step_kl(model, x, t_value, enumerate_states(2, 2)).sum()
    g_exact = torch.autograd.grad(exact, model.forward_parameters())
    if estimator == "none":
        g = expected_surrogate_gradients(model, x, t_value, 1, lambda loss, m: torch.zeros_like(loss))
    else:
        g = expected_surrogate_gradients(model, x, t_value, 2, leave_one_out_baseline)
    for a, b in zip(g_exact, g):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert max(a.abs().max() for a in g_exact) > 1e-4  # the check is not vacuous


def test_surrogate_gradient_is_pathwise_plus_score():  # P10
    """d/d loss = 1 (pathwise), d/d log q = loss - b (the score weight), no gradient through b."""
    loss = torch.tensor([1.0, 3.0, 2.0, 5.0], requires_grad=True)
    log_q = torch.tensor([-1.0, -2.0, -0.5, -0.1], requires_grad=True)
    baseline = leave_one_out_baseline(loss, 2)  # [3, 1, 5, 2], still attached to loss's graph
    surrogate = reinforce_surrogate(loss, log_q, baseline)
    torch.testing.assert_close(surrogate, loss)  # its value is the loss
    d_loss, d_log_q = torch.autograd.grad(surrogate.sum(), (loss, log_q))
    torch.testing.assert_close(d_loss, torch.ones(4))
    torch.testing.assert_close(d_log_q, torch.tensor([-2.0, 2.0, -3.0, 3.0]))


@pytest.mark.parametrize("overrides", [
    {**RANDOM_FLDD, "process.forward_init_scale": 3.0},  # leave-one-out, M = 2
    {**RANDOM_FLDD, "process.forward_init_scale": 3.0, "train.estimator": "ema", "train.num_zt_samples": 1},
    {"process.method": "fldd-mask"},
])
def test_training_loss_phi_gradient_is_the_exact_nelbo_gradient(overrides):  # P10, end to end
    """The forward network's gradient of the loss train_loop backpropagates (model(x), one t and M
    z_t per row), averaged over draws, is the exact gradient of the expected NELBO (every z_t
    enumerated), within 4 standard errors. Pathwise-only (no score term) gradients are far off."""
    model = tiny_model(overrides, T=2, K=2)
    with torch.no_grad():  # a reverse whose loss depends on z_t, so the score term matters
        for p in model.reverse.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    phi = model.forward_parameters()
    x = torch.tensor([[0, 1], [1, 1], [1, 0]])
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact_nelbo(model, x).mean(), phi)])
    batch = x.repeat(32, 1)  # one draw = a loss over 96 rows, as in training
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(model(batch, generator=generator)["loss"],
                                                                              phi)])
                         for _ in range(200)])
    mean, stderr = draws.mean(dim=0), draws.std(dim=0) / math.sqrt(len(draws))
    error = (mean - exact).abs()
    # every entry within z SE, z set for all of them at once (Bonferroni: a 1-in-1000 false alarm
    # over the whole gradient, about 4.9 SE for ~2000 entries; a fixed 4 SE fails by chance)
    z = statistics.NormalDist().inv_cdf(1 - 0.0005 / error.numel())
    assert (error <= z * stderr + 1e-8).all(), f"max error {(error / stderr.clamp_min(1e-12)).max():.1f} SE (bound {z:.1f})"
    assert exact.abs().max() > 10 * stderr.max()  # the estimate resolves the gradient: not vacuous


def test_per_position_credit_is_biased():  # P11
    model = tiny_model({**RANDOM_FLDD, "process.forward_init_scale": 3.0}, T=3)
    with torch.no_grad():  # a reverse that reads z_t, so KL_j depends on every z_t^i (the bias's source)
        for p in model.reverse.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    states = enumerate_states(2, model.num_states)
    t_value = 2  # a learned u_t, so a score term exists
    exact = exact_step_kl(model, X, t_value, states).sum()
    g_exact = torch.autograd.grad(exact, model.forward_parameters())
    t, log_u_t, log_u_s = step_parts(model, X, t_value)
    z_all = states.unsqueeze(0).expand(len(X), -1, -1)
    q = max_coupling_posterior(z_all, log_u_s[:, None], log_u_t[:, None])
    log_p = model.reverse_log_probs(states, torch.full((len(states),), t_value))[None]
    kl_i = kl_divergence(q, log_p)  # (B, n, D)
    log_q_i = log_u_t[:, None].expand(-1, len(states), -1, -1).gather(-1, z_all[..., None]).squeeze(-1)
    per_position = (kl_i + (log_q_i - log_q_i.detach()) * kl_i.detach()).sum(-1)  # credit KL_i to log u^i only
    weights = log_q_i.detach().sum(-1).exp()
    g_biased = torch.autograd.grad((weights * per_position).sum(), model.forward_parameters())
    error = sum((a - b).norm() ** 2 for a, b in zip(g_exact, g_biased)).sqrt()
    assert error > 0.05 * sum(a.norm() ** 2 for a in g_exact).sqrt()


def test_baselines_do_not_depend_on_their_own_sample():  # P11
    loss = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    b = leave_one_out_baseline(loss, 3)
    torch.testing.assert_close(b, torch.tensor([2.5, 2.0, 1.5, 25.0, 20.0, 15.0]))
    changed = loss.clone()
    changed[1] = 100.0
    assert leave_one_out_baseline(changed, 3)[1] == b[1]
    # EMA baseline per t: read before the batch updates it
    model = tiny_model({"train.estimator": "ema", "train.num_zt_samples": 1}, T=2)
    t = torch.tensor([1, 2, 2])
    first = model.baseline(torch.tensor([4.0, 6.0, 8.0], dtype=torch.float64), t)
    assert (first == 0).all() and model.baseline_ema[2] == 7.0 and model.baseline_ema[1] == 4.0
    second = model.baseline(torch.tensor([100.0, 100.0, 100.0], dtype=torch.float64), t)
    torch.testing.assert_close(second, torch.tensor([4.0, 7.0, 7.0], dtype=torch.float64))


def test_training_loss_groups_the_m_samples_of_each_x_and_t(monkeypatch):
    """Leave-one-out must compare samples of the same (x, t): rows are grouped M at a time."""
    model = tiny_model({**RANDOM_FLDD, "train.num_zt_samples": 4}, T=5)
    seen = {}
    real = model.baseline

    def spy(loss, t):
        seen["t"] = t.clone()
        return real(loss, t)

    monkeypatch.setattr(model, "baseline", spy)
    training_loss(model, torch.randint(0, 3, (16, 2), generator=torch.Generator().manual_seed(0)))
    groups = seen["t"].view(-1, 4)
    assert (groups == groups[:, :1]).all() and groups[:, 0].unique().numel() > 1


def test_training_loss_value_is_the_nelbo_estimate():
    model = tiny_model({"process.method": "fldd"}, T=3)
    out = training_loss(model, X)
    torch.testing.assert_close(out["loss"], out["nelbo"])
    assert out["loss"].requires_grad and not out["nelbo"].requires_grad


def test_evaluate_nelbo_is_the_sum_over_t_in_bits(variant):  # P15
    model = tiny_model(variant, T=3)
    data = enumerate_states(2, 3).repeat(20, 1)
    estimate = evaluate_nelbo(model, data, num_passes=10, generator=torch.Generator().manual_seed(0))
    exact_bits = exact_nelbo(model, data).mean().item() / (2 * math.log(2))
    assert abs(estimate.bits_per_token - exact_bits) < 4 * estimate.stderr_bits_per_token + 1e-9
    assert sum(estimate.kl_per_step_bits_per_token) == pytest.approx(estimate.bits_per_token)
    assert estimate.nats_per_sequence / (2 * math.log(2)) == pytest.approx(estimate.bits_per_token)


def test_evaluate_nelbo_rejects_bad_data():
    model = tiny_model(T=2)
    with pytest.raises(ValueError, match="data holds token 3"):
        evaluate_nelbo(model, torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="num_passes=0"):
        evaluate_nelbo(model, torch.tensor([[0, 1]]), num_passes=0)
