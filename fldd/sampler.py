"""Ancestral few-step sampling (paper Alg. 2): exactly T reverse-network calls, float64 categoricals.

Only the reverse network runs; the forward process contributes nothing but its fixed prior pi.
Sampling never changes the model (no eval()/train() switch, no gradients): one model may be shared
by concurrent requests. The networks have no dropout or batch norm, so the mode does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fldd.model import FLDDModel
from fldd.objective import sample_categorical
from fldd.tokens import check_tokens


@dataclass
class Draw:
    """One independent group of rows in a batched pass: its own generator and its own clamp.

    condition / condition_mask: (D,) or (num_samples, D); positions where the mask is True are
    clamped to `condition` at every step. Already checked by the caller (see `sample`).
    """

    num_samples: int
    generator: torch.Generator | None = None
    condition: Tensor | None = None
    condition_mask: Tensor | None = None


@torch.no_grad()
def sample(model: FLDDModel, num_samples: int, *, generator: torch.Generator | None = None,
           condition: Tensor | None = None, condition_mask: Tensor | None = None,
           batch_size: int = 1024, device: torch.device | str | None = None) -> Tensor:
    """Draw `num_samples` sequences (num_samples, D) of data tokens.

    condition / condition_mask (both (D,) or (num_samples, D)): positions where the mask is True are
    clamped to `condition` at every step (infill, prefix completion).
    generator: seeds z_T and every categorical draw; same seed, same samples.
    """
    D = model.config.seq_len
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: must be >= 1")
    if (condition is None) != (condition_mask is None):
        raise ValueError("condition and condition_mask must be given together")
    if condition is not None:
        condition = torch.as_tensor(condition).expand(num_samples, D)
        condition_mask = torch.as_tensor(condition_mask, dtype=torch.bool).expand(num_samples, D)
        check_tokens(torch.where(condition_mask, condition, 0).long(), model.config.vocab_size, D, name="condition")
    chunks = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        clamp = {} if condition is None else {"condition": condition[start:start + n],
                                              "condition_mask": condition_mask[start:start + n]}
        chunks.extend(sample_batch(model, [Draw(n, generator, **clamp)], device=device))
    return torch.cat(chunks)


@torch.no_grad()
def sample_batch(model: FLDDModel, draws: Sequence[Draw], *,
                 device: torch.device | str | None = None) -> list[Tensor]:
    """One batched T-step pass for several independent draws: every reverse-network call sees all
    their rows at once, but each draw takes its z_T and its categoricals from its own generator, in
    the same order as alone. So a draw's samples depend on its seed and the model, not on what else
    shares the batch (up to float rounding of the batched network call). Returns one (n, D) tensor
    per draw, in order."""
    cfg = model.config
    D, T = cfg.seq_len, model.num_steps
    if device is None:
        device = next(model.reverse.parameters()).device
    sizes = [d.num_samples for d in draws]
    if not draws or min(sizes) < 1:
        raise ValueError(f"draws: need at least one draw of >= 1 samples, got sizes {sizes}")
    prior = torch.log(model.forward_process.prior.double())
    z = torch.cat([sample_categorical(prior.expand(d.num_samples, D, -1), d.generator).to(device)
                   for d in draws])  # z_T ~ pi
    clamps = [None if d.condition is None else
              (torch.as_tensor(d.condition).expand(d.num_samples, D).to(device),
               torch.as_tensor(d.condition_mask, dtype=torch.bool).expand(d.num_samples, D).to(device))
              for d in draws]
    condition = None
    if any(c is not None for c in clamps):
        condition = torch.cat([c[0] if c else torch.zeros(n, D, dtype=torch.long, device=device)
                               for c, n in zip(clamps, sizes)])
        condition_mask = torch.cat([c[1] if c else torch.zeros(n, D, dtype=torch.bool, device=device)
                                    for c, n in zip(clamps, sizes)])
    for t_value in range(T, 0, -1):
        if condition is not None:
            z = torch.where(condition_mask, condition, z)
        t = torch.full((z.shape[0],), t_value, dtype=torch.long, device=device)
        log_probs = model.reverse_log_probs(z, t)
        z = torch.cat([sample_categorical(part, d.generator)
                       for part, d in zip(log_probs.split(sizes), draws)])
    if condition is not None:
        z = torch.where(condition_mask, condition, z)
    return list(z.split(sizes))
