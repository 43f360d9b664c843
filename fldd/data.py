"""Token data: Parquet token tables, built-in data sets generated offline, and batch iteration.

A token table is a Parquet file (or a directory of them) with a fixed-length integer list column
(default "tokens") and the vocabulary size in the schema metadata (`fldd.vocab_size`) or given by
the caller. `read_token_table` validates everything before any training starts and names the
file, row and column of the first problem.

The built-in data sets (fldd.datasets) are produced as Arrow token tables and validated by the
same code.
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
from fldd.datasets import builtin_table
from fldd.token_table import VOCAB_KEY, DataError, token_table  # public here too, for callers


def write_token_table(path: str | Path, tokens: Tensor | np.ndarray, vocab_size: int, column: str = "tokens") -> Path:
    """Write (N, D) integer tokens as a Parquet token table with its vocabulary size."""
    table = token_table(tokens, vocab_size, column)
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
        _check_range(tokens, vocab_size, file, column)
    return torch.from_numpy(np.concatenate([t for _, t in chunks])), vocab_size


def tokens_from_table(table: pa.Table, source: str, column: str = "tokens") -> tuple[Tensor, int]:
    """Validate an in-memory Arrow token table (built-in data sets take this path too)."""
    metadata = table.schema.metadata or {}
    if VOCAB_KEY not in metadata:
        raise DataError(f"{source}: no {VOCAB_KEY.decode()!r} metadata")
    vocab_size = int(metadata[VOCAB_KEY])
    tokens = _validate_column(table, Path(source), column)
    _check_range(tokens, vocab_size, Path(source), column)
    return torch.from_numpy(tokens), vocab_size


def _check_range(tokens: np.ndarray, vocab_size: int, file: Path, column: str) -> None:
    bad_rows = np.nonzero(((tokens < 0) | (tokens >= vocab_size)).any(axis=1))[0]
    if bad_rows.size:
        row = int(bad_rows[0])
        value = int(tokens[row][(tokens[row] < 0) | (tokens[row] >= vocab_size)][0])
        kind = "negative token" if value < 0 else "token outside [0, vocab_size)"
        raise DataError(f"{file}: row {row}, column {column!r}: {kind} {value} (vocab_size={vocab_size})")


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
        return load_builtin_split(cfg, "train"), load_builtin_split(cfg, "valid")
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


def load_builtin_split(cfg: FLDDConfig, split: str) -> Tensor:
    """One split (train, valid, test) of a built-in data set, through the token-table validation."""
    table = builtin_table(cfg.data, split)
    tokens, vocab = tokens_from_table(table, f"built-in {cfg.data.name}/{split}")
    if (tokens.shape[1], vocab) != (cfg.seq_len, cfg.vocab_size):
        raise DataError(f"data.name={cfg.data.name!r} has seq_len={tokens.shape[1]} and vocab_size={vocab}; the "
                        f"config says seq_len={cfg.seq_len}, vocab_size={cfg.vocab_size}")
    return tokens


def load_test_split(cfg: FLDDConfig) -> Tensor:
    """The held-out test split: built-ins have one; a Parquet directory needs test.parquet."""
    if not cfg.data.path:
        return load_builtin_split(cfg, "test")
    test = Path(cfg.data.path) / "test.parquet"
    if not test.is_file():
        raise DataError(f"{cfg.data.path}: no test.parquet (only directories with a test split have one)")
    return read_token_table(test, cfg.data.column, cfg.vocab_size)[0]
