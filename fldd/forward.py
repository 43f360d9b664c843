"""Forward (noising) processes, all behind one interface: log-marginals log u(x, t).

A forward process is defined by its marginals q(z_t | x) = prod_i Cat(z_t^i; u^i(x, t)) with the
boundaries u(x, 0) = onehot(x) and u(x, T) = prior, exactly. Its posteriors come from the maximum
coupling (fldd.posterior), so no forward transition is ever needed.

All processes return *log* marginals with a finite stand-in LOG_ZERO for log 0, so that the
posterior never computes -inf - (-inf) (spec section 5b, numerics).

States are the K data tokens, plus MASK = K when the process uses an absorbing state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fldd.config import FLDDConfig
from fldd.networks import TokenNetwork

LOG_ZERO = -1e4  # finite log 0: exp(LOG_ZERO) == 0 in float32 and float64


def safe_log(p: Tensor) -> Tensor:
    return torch.where(p > 0, torch.log(p.clamp_min(1e-38)), torch.full_like(p, LOG_ZERO))


def signal_schedule(t: Tensor, num_steps: int, schedule: str) -> Tensor:
    """alpha_t: the probability of keeping the data token at step t, with alpha_0=1, alpha_T=0 exactly."""
    frac = t.double() / num_steps
    alpha = 1.0 - frac if schedule == "linear" else torch.cos(0.5 * math.pi * frac)
    return torch.where(t >= num_steps, torch.zeros_like(alpha), alpha).clamp(0.0, 1.0)


class ForwardProcess(nn.Module):
    """log u(x, t) for a batch of data x (B, D) and steps t (B,) or (B, n)."""

    learned: bool = False
    # u(x,t) is a softmax of network logits, which can saturate (one-hot, zero gradient); a masking
    # forward's deterministic reveal order is a legitimate solution, not a dead softmax
    saturable: bool = False
    entropy_floor_bits: float = 0.0  # the least entropy an interior u(x,t) can have per position

    def __init__(self, cfg: FLDDConfig):
        super().__init__()
        self.num_steps = cfg.process.num_steps
        self.vocab_size = cfg.vocab_size
        self.num_states = cfg.num_states
        self.mask_id = cfg.vocab_size if cfg.uses_mask_state else None
        prior = torch.zeros(self.num_states)
        if self.mask_id is not None:
            prior[self.mask_id] = 1.0
        else:
            prior[:] = 1.0 / self.num_states
        self.register_buffer("prior", prior, persistent=False)

    def log_marginals(self, x: Tensor, t: Tensor) -> Tensor:
        """(B, D) data and (B,) or (B, n) steps -> (B, D, S) or (B, n, D, S) log-probabilities."""
        multi = t.dim() == 2
        tt = t if multi else t[:, None]
        log_u = self._log_marginals(x, tt)
        return log_u if multi else log_u[:, 0]

    def _log_marginals(self, x: Tensor, t: Tensor) -> Tensor:  # t: (B, n) -> (B, n, D, S)
        raise NotImplementedError

    # Helpers shared by the implementations --------------------------------------------------
    def _log_onehot(self, x: Tensor, n: int) -> Tensor:
        onehot = F.one_hot(x, self.num_states).to(self.prior.dtype)
        return safe_log(onehot).unsqueeze(1).expand(-1, n, -1, -1)

    def _override_boundaries(self, log_u: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """u(x,0) = onehot(x) and u(x,T) = prior, exactly, whatever the interior parameterization."""
        n = t.shape[1]
        at_zero = (t == 0)[..., None, None]
        at_end = (t == self.num_steps)[..., None, None]
        log_prior = safe_log(self.prior).expand_as(log_u)
        log_u = torch.where(at_end, log_prior, log_u)
        return torch.where(at_zero, self._log_onehot(x, n), log_u)

    def _fixed_log_marginals(self, x: Tensor, t: Tensor, schedule: str) -> Tensor:
        """alpha_t onehot(x) + (1 - alpha_t) prior: masked (absorbing) or uniform."""
        alpha = signal_schedule(t, self.num_steps, schedule).to(self.prior.dtype)[..., None, None]  # (B,n,1,1)
        onehot = F.one_hot(x, self.num_states).to(self.prior.dtype).unsqueeze(1)  # (B, 1, D, S)
        return safe_log(alpha * onehot + (1 - alpha) * self.prior)


class FixedForward(ForwardProcess):
    """Fixed masked (absorbing, MDLM / D3PM-absorbing) or uniform forward process."""

    def __init__(self, cfg: FLDDConfig):
        super().__init__(cfg)
        self.schedule = cfg.process.schedule

    def _log_marginals(self, x: Tensor, t: Tensor) -> Tensor:
        return self._fixed_log_marginals(x, t, self.schedule)


class LearnedForward(ForwardProcess):
    """General learned marginals: u(x,t) = softmax(f_phi(x,t)) for 0 < t < T, boundaries overridden.

    With a warm start, u(x,t) = softmax(log ubar_t(x) + g_phi(x,t)) where ubar is a fixed masked or
    uniform marginal floored at eps, and g's output layer starts at zero (so the model starts *as*
    the fixed-forward model; spec section 5b: train the reverse first, then the forward).
    """

    learned = True
    saturable = True

    def __init__(self, cfg: FLDDConfig):
        super().__init__(cfg)
        self.warm_start = cfg.resolved_warm_start
        self.schedule = cfg.process.schedule
        self.floor = cfg.process.warm_start_floor
        self.marginal_floor = cfg.process.forward_floor
        if self.marginal_floor > 0:  # a floored one-hot: (1 - eps + eps/S, eps/S, ...)
            eps, S = self.marginal_floor, self.num_states
            probs = [1 - eps + eps / S] + [eps / S] * (S - 1)
            self.entropy_floor_bits = -sum(p * math.log2(p) for p in probs)
        self.network = TokenNetwork(cfg.forward_network, seq_len=cfg.seq_len, num_inputs=cfg.vocab_size,
                                    num_outputs=self.num_states, num_steps=self.num_steps, time_in_trunk=False)
        with torch.no_grad():  # scale 0 with a warm start: the model starts *as* the fixed one
            self.network.output_layer.weight.mul_(cfg.process.forward_init_scale)
            if self.warm_start != "none":
                self.network.output_layer.bias.zero_()

    def _log_marginals(self, x: Tensor, t: Tensor) -> Tensor:
        logits = self.network(x, t)
        if self.warm_start != "none":
            ubar = self._fixed_log_marginals(x, t, self.schedule).exp()
            ubar = (1 - self.floor) * ubar + self.floor / self.num_states
            logits = torch.log(ubar) + logits
        log_u = F.log_softmax(logits, dim=-1)
        if self.marginal_floor > 0:  # (1 - eps) u + eps / S, in log space
            log_u = torch.logaddexp(log_u + math.log1p(-self.marginal_floor),
                                    torch.full_like(log_u, math.log(self.marginal_floor / self.num_states)))
        return self._override_boundaries(log_u, x, t)


class LearnedMaskingForward(ForwardProcess):
    """Masking-only learned process (paper section 4.3): u^i = (1 - m^i) onehot(x^i) + m^i e_MASK.

    m^i(x, t) = cumsum(softplus(h^i(x)))_t / sum(softplus(h^i(x))) is monotone in t with m(x,0)=0
    and m(x,T)=1 by construction: the model learns which tokens to reveal first, given all of x.
    """

    learned = True

    def __init__(self, cfg: FLDDConfig):
        super().__init__(cfg)
        # one output per step increment; time is the output index, so no time input is needed
        self.network = TokenNetwork(cfg.forward_network, seq_len=cfg.seq_len, num_inputs=cfg.vocab_size,
                                    num_outputs=self.num_steps, num_steps=self.num_steps, time_in_trunk=False)
        # start near the linear schedule: equal increments
        nn.init.zeros_(self.network.output_layer.weight)
        nn.init.zeros_(self.network.output_layer.bias)

    def _masked_so_far(self, x: Tensor) -> Tensor:
        """(B, D, T+1) cumulative increments c_t, with c_0 = 0."""
        zero_step = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        increments = F.softplus(self.network(x, zero_step)) + 1e-6  # (B, D, T), strictly positive
        return F.pad(torch.cumsum(increments, dim=-1), (1, 0))

    def mask_probabilities(self, x: Tensor) -> Tensor:
        """(B, D, T+1) probabilities m(x, t) that position i is masked at step t."""
        masked_so_far = self._masked_so_far(x)
        return masked_so_far / masked_so_far[..., -1:]

    def _log_marginals(self, x: Tensor, t: Tensor) -> Tensor:
        masked_so_far = self._masked_so_far(x)
        remaining = masked_so_far[..., -1:] - masked_so_far  # exactly 0 at t = T
        log_total = torch.log(masked_so_far[..., -1:])
        # log m_t = log c_t - log c_T and log(1 - m_t) = log(c_T - c_t) - log c_T: no 1 - m cancellation
        log_masked = torch.where(masked_so_far > 0, safe_log(masked_so_far) - log_total, LOG_ZERO)
        log_kept = torch.where(remaining > 0, safe_log(remaining) - log_total, LOG_ZERO)
        index = t[:, None, :].expand(-1, x.shape[1], -1)  # (B, D, n)
        log_m = log_masked.gather(-1, index).transpose(1, 2)[..., None]  # (B, n, D, 1)
        log_keep = log_kept.gather(-1, index).transpose(1, 2)[..., None]
        is_data_token = F.one_hot(x, self.num_states).bool().unsqueeze(1)  # (B, 1, D, S)
        is_mask = torch.arange(self.num_states, device=x.device) == self.mask_id
        log_u = torch.where(is_data_token, log_keep, torch.where(is_mask, log_m, LOG_ZERO))
        return self._override_boundaries(log_u, x, t)


def build_forward_process(cfg: FLDDConfig) -> ForwardProcess:
    method = cfg.process.method
    if method == "fldd":
        return LearnedForward(cfg)
    if method == "fldd-mask":
        return LearnedMaskingForward(cfg)
    if method in ("masked", "uniform"):
        return FixedForward(cfg)
    raise ValueError(f"unknown forward process method={method!r}; expected one of fldd, fldd-mask, masked, uniform")
