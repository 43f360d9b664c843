"""The T-step negative ELBO and its gradient estimators (spec sections 4-5).

    NELBO(x) = sum_{t=1..T} E_{q(z_t|x)} KL( q(z_s | z_t, x) || p_theta(z_s | z_t) ),   s = t - 1

The reconstruction and prior terms vanish because u(x,0) = onehot(x) and u(x,T) = prior exactly.
Training samples one t per data point (loss = T * KL_t). z_t is discrete, so phi gets a
score-function term; the baseline never depends on the z_t it multiplies:

    surrogate = L + (log q(z_t|x) - stopgrad(log q(z_t|x))) * (stopgrad(L) - b)

Its value equals L; theta gets the exact pathwise gradient, phi pathwise + score. The credit is
the whole sequence's L: per-position credit is biased (every KL_j depends on all of z_t).
"""

from __future__ import annotations

from collections.abc import Callable

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fldd.posterior import max_coupling_posterior, relaxed_max_coupling_posterior
from fldd.tokens import check_tokens


def kl_divergence(q: Tensor, log_p: Tensor) -> Tensor:
    """KL(q || p) over the last axis, with 0 log 0 = 0 and no NaN gradient at q = 0."""
    positive = q > 0
    log_q = torch.log(torch.where(positive, q, torch.ones_like(q)))
    return torch.where(positive, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1)


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None = None,
                       uniforms: Tensor | None = None) -> Tensor:
    """Inverse-CDF categorical sampling in float64 over the last axis.

    float32 truncation of tiny probabilities lowers the effective temperature (a known trap), so the
    CDF and the uniforms are float64. `uniforms` (shape log_probs.shape[:-1], in [0, 1)) may be
    given for deterministic tests.
    """
    cdf = torch.cumsum(torch.softmax(log_probs.double(), dim=-1), dim=-1)
    if uniforms is None:
        gen_device = generator.device if generator is not None else cdf.device
        uniforms = torch.rand(cdf.shape[:-1], dtype=torch.float64, generator=generator, device=gen_device)
    uniforms = uniforms.to(device=cdf.device, dtype=torch.float64) * cdf[..., -1]
    index = torch.searchsorted(cdf, uniforms.unsqueeze(-1), right=True).squeeze(-1)
    return index.clamp_max(cdf.shape[-1] - 1)


def gumbel_softmax(log_probs: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """A Concrete (relaxed one-hot) sample, reparameterized in log_probs."""
    uniforms = torch.rand(log_probs.shape, generator=generator, device=log_probs.device).clamp(1e-10, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(uniforms))
    return torch.softmax((log_probs + gumbel) / tau, dim=-1)


def step_kl(q_posterior: Tensor, log_p: Tensor) -> Tensor:
    """Per-sequence KL of one step: summed over positions. (B, D, S) -> (B,)."""
    return kl_divergence(q_posterior, log_p).sum(dim=-1)


def leave_one_out_baseline(loss: Tensor, num_samples: int) -> Tensor:
    """b_m = mean of the *other* M-1 samples' loss for the same (x, t); loss grouped as (B*M,)."""
    grouped = loss.view(-1, num_samples)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_samples - 1)
    return others.reshape(-1)


@dataclass
class NELBOEstimate:
    """Held-out T-step NELBO: sum over t of the KL terms, Monte Carlo over z_t."""

    bits_per_token: float
    stderr_bits_per_token: float
    nats_per_sequence: float
    kl_per_step_bits_per_token: list[float]  # index t-1: E[KL_t] in bits/token; sums to the NELBO
    num_examples: int
    num_passes: int
    # (N,) float64 on the CPU: each example's NELBO in bits/token (mean over passes), in data order;
    # the mean is bits_per_token. Two models evaluated on the same data give paired differences.
    per_example_bits: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64), repr=False)

    def __str__(self) -> str:
        return (f"{self.bits_per_token:.4f} +- {self.stderr_bits_per_token:.4f} bits/token "
                f"({self.num_examples} examples x {self.num_passes} passes)")


@torch.no_grad()
def evaluate_nelbo(model, data: Tensor, *, num_passes: int = 10, batch_size: int = 512,
                   generator: torch.Generator | None = None,
                   on_batch: Callable[[int], None] | None = None) -> NELBOEstimate:
    """T-step NELBO of `model` on `data` (N, D), in bits per token with a standard error.

    Every pass visits every t = 1..T with a fresh z_t ~ q(z_t|x); the bound is the *sum* over t.
    `on_batch(rows)` is called after each batch of rows (a progress bar).
    """
    check_tokens(data, model.config.vocab_size, model.config.seq_len, name="data")
    if num_passes < 1:
        raise ValueError(f"num_passes={num_passes!r}: must be >= 1")
    T, D = model.num_steps, model.config.seq_len
    device = next(model.parameters()).device
    per_example, per_step = [], torch.zeros(T, dtype=torch.float64)
    for start in range(0, data.shape[0], batch_size):
        x = data[start:start + batch_size].to(device)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        for t_value in range(1, T + 1):
            t = torch.full((x.shape[0],), t_value, device=device, dtype=torch.long)
            log_u = model.forward_process.log_marginals(x, torch.stack([t, t - 1], dim=1))
            log_u_t, log_u_s = log_u[:, 0], log_u[:, 1]
            for _ in range(num_passes):
                z_t = sample_categorical(log_u_t, generator)
                kl = step_kl(max_coupling_posterior(z_t, log_u_s, log_u_t), model.reverse_log_probs(z_t, t))
                total += kl.double() / num_passes
                per_step[t_value - 1] += kl.double().sum().cpu() / num_passes
        per_example.append(total.cpu())
        if on_batch is not None:
            on_batch(x.shape[0])
    nats = torch.cat(per_example)
    to_bits = 1.0 / (D * math.log(2.0))
    n = nats.numel()
    stderr = (nats.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")
    return NELBOEstimate(
        bits_per_token=nats.mean().item() * to_bits,
        stderr_bits_per_token=stderr * to_bits,
        nats_per_sequence=nats.mean().item(),
        kl_per_step_bits_per_token=(per_step / n * to_bits).tolist(),
        num_examples=n,
        num_passes=num_passes,
        per_example_bits=nats * to_bits,
    )


def training_loss(model, x: Tensor, *, train_forward: bool = True, tau: float | None = None,
                  generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One stochastic NELBO estimate for a batch and its gradient surrogate.

    Returns {"loss": surrogate (backward this), "nelbo": its value in nats/sequence (== loss when
    not relaxed), "kl", "score", ...} with everything but "loss" detached.
    tau: Concrete temperature for the relaxed warm-up (None: exact discrete z_t).
    """
    T, M = model.num_steps, model.samples_per_x
    t = torch.randint(1, T + 1, (x.shape[0],), device=x.device, generator=generator)
    # u(x,t) and u(x,s) in one forward-network call
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_forward):
        log_u = model.forward_process.log_marginals(x, torch.stack([t, t - 1], dim=1))
    log_u_t = log_u[:, 0].repeat_interleave(M, dim=0)
    log_u_s = log_u[:, 1].repeat_interleave(M, dim=0)
    t = t.repeat_interleave(M, dim=0)

    if tau is not None:  # relaxed warm-up: reparameterized, *not* a bound
        z_soft = gumbel_softmax(log_u_t, tau, generator)
        kl = step_kl(relaxed_max_coupling_posterior(z_soft, log_u_s, log_u_t), model.reverse_log_probs(z_soft, t))
        loss = T * kl
        return {"loss": loss.mean(), "relaxed_loss": loss.detach().mean(), "kl": kl.detach().mean(),
                "tau": torch.tensor(tau)}

    z_t = sample_categorical(log_u_t.detach(), generator)
    kl = step_kl(max_coupling_posterior(z_t, log_u_s, log_u_t), model.reverse_log_probs(z_t, t))
    loss = T * kl  # unbiased single-t estimate of the NELBO, per sequence
    out = {"nelbo": loss.detach().mean(), "kl": kl.detach().mean()}
    if train_forward and log_u_t.requires_grad:
        log_q_zt = log_u_t.gather(-1, z_t.unsqueeze(-1)).squeeze(-1).sum(dim=-1)  # whole-sequence log q
        baseline = model.baseline(loss.detach(), t)
        surrogate = reinforce_surrogate(loss, log_q_zt, baseline)
        advantage = loss.detach() - baseline
        out.update(score=(surrogate - loss).detach().mean(), advantage_mean=advantage.mean(),
                   advantage_std=advantage.std(correction=0), baseline_mean=baseline.mean())
        loss = surrogate
    out["loss"] = loss.mean()
    return out


def reinforce_surrogate(loss: Tensor, log_q_zt: Tensor, baseline: Tensor) -> Tensor:
    """loss + (log q - stopgrad(log q)) * (stopgrad(loss) - b): same value as `loss`; its gradient
    adds the score-function term for the discrete z_t. `baseline` must not depend on this z_t."""
    return loss + (log_q_zt - log_q_zt.detach()) * (loss.detach() - baseline.detach())
