"""Ancestral few-step sampling (paper Alg. 2): exactly T reverse-network calls, float64 categoricals.

Only the reverse network runs; the forward process contributes nothing but its fixed prior pi.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fldd.model import FLDDModel
from fldd.objective import sample_categorical
from fldd.tokens import check_tokens


@torch.no_grad()
def sample(model: FLDDModel, num_samples: int, *, generator: torch.Generator | None = None,
           condition: Tensor | None = None, condition_mask: Tensor | None = None,
           batch_size: int = 1024, device: torch.device | str | None = None) -> Tensor:
    """Draw `num_samples` sequences (num_samples, D) of data tokens.

    condition / condition_mask (both (D,) or (num_samples, D)): positions where the mask is True are
    clamped to `condition` at every step (infill, prefix completion).
    generator: seeds z_T and every categorical draw; same seed, same samples.
    """
    cfg = model.config
    D, T = cfg.seq_len, model.num_steps
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: must be >= 1")
    if device is None:
        device = next(model.reverse.parameters()).device
    if (condition is None) != (condition_mask is None):
        raise ValueError("condition and condition_mask must be given together")
    if condition is not None:
        condition = torch.as_tensor(condition).expand(num_samples, D).to(device)
        condition_mask = torch.as_tensor(condition_mask, dtype=torch.bool).expand(num_samples, D).to(device)
        check_tokens(torch.where(condition_mask, condition, 0).long(), cfg.vocab_size, D, name="condition")

    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        prior_logits = torch.log(model.forward_process.prior.double()).expand(n, D, -1)
        z = sample_categorical(prior_logits, generator).to(device)  # z_T ~ pi
        clamp = None if condition is None else (condition[start:start + n], condition_mask[start:start + n])
        for t_value in range(T, 0, -1):
            if clamp is not None:
                z = torch.where(clamp[1], clamp[0], z)
            t = torch.full((n,), t_value, dtype=torch.long, device=device)
            z = sample_categorical(model.reverse_log_probs(z, t), generator)
        if clamp is not None:
            z = torch.where(clamp[1], clamp[0], z)
        chunks.append(z)
    model.train(was_training)
    return torch.cat(chunks)
