"""P2-P6, P12: the maximum-coupling posterior."""

import pytest
import torch
import torch.nn.functional as F

from fldd.forward import safe_log
from fldd.posterior import max_coupling_matrix, max_coupling_posterior, relaxed_max_coupling_posterior
from tests.conftest import tiny_model



@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_simplex(*shape, sparsity=0.0, generator=None):
    p = torch.rand(*shape, generator=generator) ** 3
    if sparsity:
        p = p * (torch.rand(*shape, generator=generator) > sparsity)
        p[..., 0] += 1e-3 * (p.sum(-1) == 0)
    return p / p.sum(-1, keepdim=True)


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    u_s = random_simplex(64, 5, 7, sparsity=0.4, generator=g)
    u_t = random_simplex(64, 5, 7, sparsity=0.4, generator=g)
    return u_s, u_t


def test_rows_are_distributions(pairs):  # P2
    u_s, u_t = pairs
    Q = max_coupling_matrix(safe_log(u_s), safe_log(u_t))
    assert torch.isfinite(Q).all() and (Q >= 0).all()
    reachable = u_t > 0
    torch.testing.assert_close(Q.sum(-1)[reachable], torch.ones_like(Q.sum(-1)[reachable]))


def test_consistency(pairs):  # P3: sum_k u_t^k q(j | k) = u_s^j
    u_s, u_t = pairs
    Q = max_coupling_matrix(safe_log(u_s), safe_log(u_t))
    torch.testing.assert_close(torch.einsum("...k,...kj->...j", u_t, Q), u_s)


def test_maximal_coupling(pairs):  # P4: P(z_s = z_t) = sum_k min(u_s^k, u_t^k)
    u_s, u_t = pairs
    Q = max_coupling_matrix(safe_log(u_s), safe_log(u_t))
    p_same = (u_t * torch.diagonal(Q, dim1=-2, dim2=-1)).sum(-1)
    torch.testing.assert_close(p_same, torch.minimum(u_s, u_t).sum(-1))


def test_edge_cases_are_finite():  # P2 edge cases
    u = torch.tensor([0.5, 0.5, 0.0])
    # u_s == u_t: delta at z_t
    Q = max_coupling_matrix(safe_log(u), safe_log(u))
    torch.testing.assert_close(Q[:2], torch.eye(3)[:2])
    # u_t^k == 0 for k = 2: still a finite row, no NaN anywhere
    u_s = torch.tensor([0.2, 0.3, 0.5])
    Q = max_coupling_matrix(safe_log(u_s), safe_log(u))
    assert torch.isfinite(Q).all()
    # gradients stay finite at u_s == u_t and at zeros
    log_u = safe_log(u).requires_grad_()
    q = max_coupling_posterior(torch.tensor(0), log_u, safe_log(torch.tensor([0.5, 0.3, 0.2])))
    q.sum().backward()
    assert torch.isfinite(log_u.grad).all()


def test_posterior_to_step_zero_is_delta_x():  # P6
    x = torch.tensor([2, 0, 1])
    u_0 = F.one_hot(x, 4).double()
    u_t = random_simplex(3, 4, generator=torch.Generator().manual_seed(1))
    for k in range(4):
        q = max_coupling_posterior(torch.full((3,), k), safe_log(u_0), safe_log(u_t))
        torch.testing.assert_close(q, u_0)


def test_chain_of_posteriors_reproduces_the_marginals(variant):  # P5
    model = tiny_model(variant, T=5, K=3, D=2)
    x = torch.tensor([[0, 2], [1, 1]])
    T = model.num_steps
    log_u = model.forward_process.log_marginals(x, torch.arange(T + 1).expand(2, -1))
    with torch.no_grad():
        marginal = model.forward_process.prior.expand(2, 2, -1)
        for t in range(T, 0, -1):
            Q = max_coupling_matrix(log_u[:, t - 1], log_u[:, t])
            marginal = torch.einsum("bdk,bdkj->bdj", marginal, Q)
            torch.testing.assert_close(marginal, log_u[:, t - 1].exp(), atol=1e-10, rtol=0)


def test_masking_marginals_give_the_absorbing_posterior():
    a_s, a_t = 0.7, 0.3
    u_s = torch.tensor([a_s, 0, 0, 1 - a_s])  # x = 0, MASK = 3
    u_t = torch.tensor([a_t, 0, 0, 1 - a_t])
    q_mask = max_coupling_posterior(torch.tensor(3), safe_log(u_s), safe_log(u_t))
    expected = torch.tensor([(a_s - a_t) / (1 - a_t), 0, 0, (1 - a_s) / (1 - a_t)])
    torch.testing.assert_close(q_mask, expected)
    torch.testing.assert_close(max_coupling_posterior(torch.tensor(0), safe_log(u_s), safe_log(u_t)),
                               torch.tensor([1.0, 0, 0, 0]))


def test_relaxed_posterior(pairs):  # P12
    u_s, u_t = pairs
    log_s, log_t = safe_log(u_s), safe_log(u_t)
    Q = max_coupling_matrix(log_s, log_t)
    for k in range(7):  # at one-hot inputs it equals the hard posterior (computed from the table)
        onehot = F.one_hot(torch.full(u_t.shape[:-1], k), 7).double()
        torch.testing.assert_close(relaxed_max_coupling_posterior(onehot, log_s, log_t), Q[..., k, :])
    # it is the zbar-mixture of hard rows, and differentiable in zbar and both marginals
    zbar = torch.softmax(torch.randn(64, 5, 7), -1).requires_grad_()
    log_s = torch.log_softmax(torch.randn(64, 5, 7), -1).requires_grad_()
    log_t = torch.log_softmax(torch.randn(64, 5, 7), -1).requires_grad_()
    q = relaxed_max_coupling_posterior(zbar, log_s, log_t)
    torch.testing.assert_close(q, torch.einsum("...k,...kj->...j", zbar, max_coupling_matrix(log_s, log_t)))
    (q * torch.randn_like(q)).sum().backward()
    for tensor in (zbar, log_s, log_t):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(relaxed_max_coupling_posterior,
                                    (zbar[:2, :2].detach().requires_grad_(), log_s[:2, :2].detach().requires_grad_(),
                                     log_t[:2, :2].detach().requires_grad_()))
