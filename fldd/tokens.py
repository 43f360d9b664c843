"""Input checks for token batches, shared by the model, the objective and the sampler: a module of
its own because fldd.model imports fldd.objective, so the objective cannot import the model."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tokens(x: Tensor, vocab_size: int, seq_len: int, name: str = "x") -> None:
    """Raise ValueError naming `name` and the offending value for bad token batches."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must hold integer token ids, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != seq_len:
        raise ValueError(f"{name} must have shape (batch, {seq_len}), got {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() >= vocab_size):
        bad = x[(x < 0) | (x >= vocab_size)][0].item()
        raise ValueError(f"{name} holds token {bad}, outside [0, {vocab_size})")
