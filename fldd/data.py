"""Built-in token data generated offline, and the batch iterator the training loop consumes.

toy2d (EVALUATION.md): D=2, K=50, pmf on {0..49}^2 proportional to an equal mixture of two
isotropic Gaussians with means (12,12) and (37,37) and std 4, normalised over the grid. Its exact
pmf is known, so quality can be measured exactly. Other built-in data sets (digits, text, Parquet
tables) arrive with the data loader.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from fldd.config import FLDDConfig


def gaussian_mixture_pmf(vocab_size: int, means: list[tuple[float, float]], std: float) -> Tensor:
    """(K*K,) float64 pmf of an equal mixture of isotropic 2-D Gaussians on the K x K grid,
    indexed as a * K + b for the sequence (a, b)."""
    grid = torch.arange(vocab_size, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    density = sum(torch.exp(-((a - ma) ** 2 + (b - mb) ** 2) / (2 * std ** 2)) for ma, mb in means)
    return (density / density.sum()).flatten()


def toy2d_pmf() -> Tensor:
    return gaussian_mixture_pmf(50, [(12, 12), (37, 37)], 4.0)


def sample_from_pmf(pmf: Tensor, vocab_size: int, num_samples: int, generator: torch.Generator) -> Tensor:
    """Draw (num_samples, 2) sequences from a pmf over the K x K grid."""
    index = torch.multinomial(pmf, num_samples, replacement=True, generator=generator)
    return torch.stack([index // vocab_size, index % vocab_size], dim=1)


BUILTIN_PMFS = {
    "toy2d": (50, toy2d_pmf),
    # a small two-mode toy for fast tests: K=8
    "mixture8": (8, lambda: gaussian_mixture_pmf(8, [(1.5, 1.5), (5.5, 5.5)], 1.0)),
}


def data_pmf(name: str) -> Tensor:
    if name not in BUILTIN_PMFS:
        raise ValueError(f"data.name={name!r}: unknown built-in data set; expected one of {sorted(BUILTIN_PMFS)}")
    return BUILTIN_PMFS[name][1]()


def load_builtin(cfg: FLDDConfig) -> tuple[Tensor, Tensor]:
    """(train, valid) token tensors for the config's built-in data set, seeded by data.seed."""
    name = cfg.data.name
    if name not in BUILTIN_PMFS:
        raise ValueError(f"data.name={name!r}: unknown built-in data set; expected one of {sorted(BUILTIN_PMFS)}")
    vocab_size, pmf = BUILTIN_PMFS[name]
    if (cfg.seq_len, cfg.vocab_size) != (2, vocab_size):
        raise ValueError(f"data.name={name!r} has seq_len=2 and vocab_size={vocab_size}; the config says "
                         f"seq_len={cfg.seq_len}, vocab_size={cfg.vocab_size}")
    generator = torch.Generator().manual_seed(cfg.data.seed)
    data = sample_from_pmf(pmf(), vocab_size, cfg.data.num_train + cfg.data.num_valid, generator)
    return data[:cfg.data.num_train], data[cfg.data.num_train:]


def infinite_batches(data: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled minibatches of rows, reshuffled every epoch, forever."""
    if data.shape[0] < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the data set ({data.shape[0]} rows)")
    while True:
        order = torch.randperm(data.shape[0], generator=generator)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size]]
