"""The coordinate-wise maximum-coupling posterior q(z_s | z_t, x) (spec section 2, Eq. 11 corrected).

Per position, with u_s = u(x, s), u_t = u(x, t) and z_t = k:

    stay_k = min(u_s^k, u_t^k) / u_t^k          probability of keeping z_s = k
    m      = max(0, u_s - u_t) / sum(...)         where the moving mass goes (independent of k)
    q(z_s = j | z_t = k, x) = stay_k [j == k] + (1 - stay_k) m_j

It is consistent (sum_k u_t^k q(j|k) = u_s^j) and maximal (P(z_s = z_t) = sum_k min(u_s^k, u_t^k)).
Everything is computed from log-marginals with a finite log 0, so u_s = u_t, u_t^k = 0 and s = 0
give finite rows and finite gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def coupling_parts(log_u_s: Tensor, log_u_t: Tensor) -> tuple[Tensor, Tensor]:
    """stay (..., S): P(z_s = k | z_t = k); move (..., S): where the rest of the mass goes."""
    # exp(min(log u_s - log u_t, 0)) == min(u_s, u_t) / u_t, finite when both are log 0
    stay = torch.exp(torch.clamp(log_u_s - log_u_t, max=0.0))
    deficit = torch.relu(log_u_s.exp() - log_u_t.exp())
    total = deficit.sum(dim=-1, keepdim=True)
    # total == 0 means u_s == u_t: every stay_k is 1 and `move` is never used
    move = deficit / total.clamp_min(1e-30)
    return stay, move


def relaxed_max_coupling_posterior(z_t: Tensor, log_u_s: Tensor, log_u_t: Tensor) -> Tensor:
    """q(z_s | zbar, x) = sum_k zbar^k q(z_s | z_t = k, x) for soft one-hot zbar (paper Eq. 14).

    z_t: (..., S) soft one-hot (or one-hot); returns (..., S) probabilities. Differentiable in
    z_t and in both marginals.
    """
    stay, move = coupling_parts(log_u_s, log_u_t)
    leave = (z_t * (1.0 - stay)).sum(dim=-1, keepdim=True)
    return z_t * stay + leave * move


def max_coupling_posterior(z_t: Tensor, log_u_s: Tensor, log_u_t: Tensor) -> Tensor:
    """q(z_s | z_t, x) for hard states z_t (...,) -> (..., S) probabilities."""
    onehot = torch.nn.functional.one_hot(z_t, log_u_t.shape[-1]).to(log_u_t.dtype)
    return relaxed_max_coupling_posterior(onehot, log_u_s, log_u_t)


def max_coupling_matrix(log_u_s: Tensor, log_u_t: Tensor) -> Tensor:
    """The full transition table (..., S_from = k, S_to = j) of q(z_s = j | z_t = k, x)."""
    stay, move = coupling_parts(log_u_s, log_u_t)
    return torch.diag_embed(stay) + (1.0 - stay).unsqueeze(-1) * move.unsqueeze(-2)
