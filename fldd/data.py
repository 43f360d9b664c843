"""Token data: Parquet token tables, built-in data sets generated offline, and batch iteration.

A token table is a Parquet file (or a directory of them) with a fixed-length integer list column
(default "tokens") and the vocabulary size in the schema metadata (`fldd.vocab_size`) or given by
the caller. `read_token_table` validates everything before any training starts and names the
file, row and column of the first problem.

toy2d (EVALUATION.md): D=2, K=50, pmf on {0..49}^2 proportional to an equal mixture of two
isotropic Gaussians with means (12,12) and (37,37) and std 4, normalised over the grid. Its exact
pmf is known, so quality can be measured exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from fldd.config import FLDDConfig

VOCAB_KEY = b"fldd.vocab_size"


class DataError(ValueError):
    """A token table is malformed; the message names the file, and the row and column if any."""


def write_token_table(path: str | Path, tokens: Tensor | np.ndarray, vocab_size: int, column: str = "tokens") -> Path:
    """Write (N, D) integer tokens as a Parquet token table with its vocabulary size."""
    array = np.asarray(tokens, dtype=np.int64)
    if array.ndim != 2:
        raise DataError(f"tokens must be 2-D (rows, positions), got shape {array.shape}")
    values = pa.array(array.reshape(-1))
    column_array = pa.FixedSizeListArray.from_arrays(values, array.shape[1]) if array.shape[1] else None
    table = pa.table({column: column_array}).replace_schema_metadata({VOCAB_KEY: str(vocab_size).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def parquet_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no .parquet files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return [path]


def read_token_table(path: str | Path, column: str = "tokens", vocab_size: int = 0) -> tuple[Tensor, int]:
    """Read and validate a token table: returns ((N, D) int64 tokens, vocab_size)."""
    chunks, seq_len = [], None
    for file in parquet_files(path):
        try:
            table = pq.read_table(file)
        except Exception as error:  # pyarrow raises several types for unreadable files
            raise DataError(f"{file}: not a readable Parquet file ({error})") from error
        metadata = table.schema.metadata or {}
        if not vocab_size and VOCAB_KEY in metadata:
            vocab_size = int(metadata[VOCAB_KEY])
        tokens = _validate_column(table, file, column)
        if seq_len is not None and tokens.shape[1] != seq_len:
            raise DataError(f"{file}: row 0, column {column!r}: length {tokens.shape[1]}, but earlier files "
                            f"have length {seq_len}")
        seq_len = tokens.shape[1]
        chunks.append((file, tokens))
    if not vocab_size:
        raise DataError(f"{path}: vocabulary size unknown: no {VOCAB_KEY.decode()!r} metadata; set data.vocab_size")
    for file, tokens in chunks:
        bad_rows = np.nonzero(((tokens < 0) | (tokens >= vocab_size)).any(axis=1))[0]
        if bad_rows.size:
            row = int(bad_rows[0])
            value = int(tokens[row][(tokens[row] < 0) | (tokens[row] >= vocab_size)][0])
            kind = "negative token" if value < 0 else "token outside [0, vocab_size)"
            raise DataError(f"{file}: row {row}, column {column!r}: {kind} {value} (vocab_size={vocab_size})")
    return torch.from_numpy(np.concatenate([t for _, t in chunks])), vocab_size


def _validate_column(table: pa.Table, file: Path, column: str) -> np.ndarray:
    if column not in table.column_names:
        raise DataError(f"{file}: column {column!r} is missing (columns: {table.column_names})")
    if table.num_rows == 0:
        raise DataError(f"{file}: column {column!r}: the table is empty")
    data = table.column(column).combine_chunks()
    kind = data.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_integer(kind.value_type):
        raise DataError(f"{file}: column {column!r} has type {kind}; expected a list of integers")
    nulls = np.nonzero(np.asarray(data.is_null()))[0]
    if nulls.size:
        raise DataError(f"{file}: row {int(nulls[0])}, column {column!r}: null row")
    lengths = np.asarray(pc.list_value_length(data))
    ragged = np.nonzero(lengths != lengths[0])[0]
    if ragged.size:
        row = int(ragged[0])
        raise DataError(f"{file}: row {row}, column {column!r}: ragged row of length {lengths[row]}, "
                        f"row 0 has length {lengths[0]}")
    flat = np.asarray(pc.list_flatten(data)).astype(np.int64)
    return flat.reshape(table.num_rows, int(lengths[0]))


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


def load_splits(cfg: FLDDConfig) -> tuple[Tensor, Tensor]:
    """(train, valid) tokens for a config: a Parquet token table at data.path, or a built-in data set.

    A directory holding train.parquet and valid.parquet is used as split; any other table is split
    by data.valid_fraction with data.seed. Shapes and vocabulary must match the model's config.
    """
    d = cfg.data
    if not d.path:
        return load_builtin(cfg)
    root = Path(d.path)
    if root.is_dir() and (root / "train.parquet").is_file() and (root / "valid.parquet").is_file():
        train, vocab = read_token_table(root / "train.parquet", d.column, d.vocab_size)
        valid, _ = read_token_table(root / "valid.parquet", d.column, vocab)
    else:
        tokens, vocab = read_token_table(root, d.column, d.vocab_size)
        if tokens.shape[0] < 2:
            raise DataError(f"{root}: {tokens.shape[0]} row(s) cannot be split into train and valid")
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(d.seed))
        num_valid = max(1, int(round(d.valid_fraction * tokens.shape[0])))
        valid, train = tokens[order[:num_valid]], tokens[order[num_valid:]]
    if vocab != cfg.vocab_size:
        raise DataError(f"{root}: vocabulary size {vocab} does not match the config's vocab_size={cfg.vocab_size}")
    if train.shape[1] != cfg.seq_len:
        raise DataError(f"{root}: rows have length {train.shape[1]}, the config's seq_len={cfg.seq_len}")
    return train, valid
