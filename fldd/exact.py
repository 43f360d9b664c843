"""Exact computations by enumerating every joint state, for tiny models (S^D up to a few thousand).

Used by the tests (NELBO >= exact NLL, expected gradients) and by the toy2d metric (D=2, K=50),
where the model's sample distribution is computable by summing over all sampling paths.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from fldd.objective import step_kl
from fldd.posterior import max_coupling_posterior

MAX_ENUMERATED_STATES = 10_000


def enumerate_states(seq_len: int, num_states: int, device: torch.device | str = "cpu") -> Tensor:
    """All num_states ** seq_len joint states as a (n, D) long tensor, in lexicographic order."""
    n = num_states ** seq_len
    if n > MAX_ENUMERATED_STATES:
        raise ValueError(f"{num_states}^{seq_len} = {n} joint states is too many to enumerate "
                         f"(limit {MAX_ENUMERATED_STATES})")
    return torch.tensor(list(itertools.product(range(num_states), repeat=seq_len)), dtype=torch.long, device=device)


def log_q_states(log_u: Tensor, states: Tensor) -> Tensor:
    """log q(z|x) = sum_i log u^i[z^i] for every enumerated z: (B, D, S), (n, D) -> (B, n)."""
    B, n = log_u.shape[0], states.shape[0]
    index = states.unsqueeze(0).expand(B, -1, -1).unsqueeze(-1)
    return log_u.unsqueeze(1).expand(-1, n, -1, -1).gather(-1, index).squeeze(-1).sum(-1)


def exact_step_kl(model, x: Tensor, t_value: int, states: Tensor) -> Tensor:
    """E_{q(z_t|x)} KL( q(z_s|z_t,x) || p(z_s|z_t) ) by enumerating z_t: (B,) nats."""
    B, n = x.shape[0], states.shape[0]
    t = torch.full((B,), t_value, dtype=torch.long, device=x.device)
    log_u = model.forward_process.log_marginals(x, torch.stack([t, t - 1], dim=1))
    log_u_t, log_u_s = log_u[:, 0], log_u[:, 1]  # (B, D, S)
    z = states.unsqueeze(0).expand(B, -1, -1)
    q = max_coupling_posterior(z, log_u_s.unsqueeze(1), log_u_t.unsqueeze(1))  # (B, n, D, S)
    log_p = model.reverse_log_probs(states, torch.full((n,), t_value, dtype=torch.long, device=x.device))
    kl = step_kl(q, log_p.unsqueeze(0))  # (B, n)
    return (log_q_states(log_u_t, states).exp() * kl).sum(dim=1)


def exact_nelbo(model, x: Tensor) -> Tensor:
    """NELBO(x) in nats per sequence, every z_t enumerated (no Monte Carlo)."""
    states = enumerate_states(model.config.seq_len, model.num_states, device=x.device)
    return sum(exact_step_kl(model, x, t, states) for t in range(1, model.num_steps + 1))


@torch.no_grad()
def exact_sample_distribution(model) -> Tensor:
    """The model's exact distribution over data sequences, summing every sampling path.

    Returns (K^D,) float64 probabilities, indexed like enumerate_states(D, K). Mass on sequences
    that still hold a MASK at z_0 (there should be none) is dropped, so the result can sum to < 1.
    """
    cfg, device = model.config, next(model.parameters()).device
    S, D = model.num_states, cfg.seq_len
    states = enumerate_states(D, S, device=device)
    prior = model.forward_process.prior.double()
    dist = prior[states].prod(dim=-1)  # p(z_T)
    for t_value in range(model.num_steps, 0, -1):
        t = torch.full((states.shape[0],), t_value, dtype=torch.long, device=device)
        probs = model.reverse_log_probs(states, t).double().exp()  # (n, D, S)
        transition = torch.ones(states.shape[0], states.shape[0], dtype=torch.float64, device=device)
        for i in range(D):  # factorized: p(z_s | z_t) = prod_i p_i(z_s^i | z_t)
            transition *= probs[:, i, states[:, i]]
        dist = dist @ transition
    is_data = (states < cfg.vocab_size).all(dim=-1)
    return dist[is_data].cpu()


@torch.no_grad()
def exact_negative_log_likelihood(model, x: Tensor) -> Tensor:
    """-log p_theta(x) (nats), summing every path: the quantity the NELBO bounds from above."""
    K, D = model.config.vocab_size, model.config.seq_len
    pmf = exact_sample_distribution(model)
    index = (x.cpu() * (K ** torch.arange(D - 1, -1, -1))).sum(dim=-1)
    return -torch.log(pmf[index])
