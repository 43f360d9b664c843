"""Token data: Parquet token tables, built-in data sets generated offline, and batch iteration.

A token table is Parquet (a file, or a directory of files; a local path or a URI such as s3://)
with a fixed-length integer list column (default "tokens"). It describes itself: the sequence
length is the list length, the vocabulary size is the schema metadata `fldd.vocab_size` (else
data.vocab_size, else the largest token + 1, said so), and `fldd.codec` says how tokens decode
back to text or table rows. A directory holding `train` and `valid` splits (`train.parquet` or a
`train/` directory of files, likewise `valid` and an optional `test`) is used as split; any other
table is split in memory by data.valid_fraction.

Validation checks every file before any training starts and names the file, row and column of
the first problem; it streams over row groups, so it never holds a whole table. Training reads
a split table's training files as a stream (pipelines.train hands them to Ray Data); the
validation and test splits are small and read whole.

The built-in data sets (fldd.datasets) are produced as Arrow token tables and validated by the
same code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import Tensor

from fldd.codec import TokenCodec, codec_from_metadata
from fldd.config import FLDDConfig
from fldd.datasets import SPLITS, builtin, builtin_codec, builtin_table
from fldd.token_table import VOCAB_KEY, DataError, token_table  # public here too, for callers

SCAN_BATCH_ROWS = 65536  # rows per record batch when streaming over a file
MAX_INFERRED_VOCAB = 1 << 20  # a larger vocabulary is taken from metadata or data.vocab_size, never guessed


def write_token_table(path: str | Path, tokens: Tensor | np.ndarray, vocab_size: int, column: str = "tokens",
                      codec: TokenCodec | None = None) -> Path:
    """Write (N, D) integer tokens as a Parquet token table with its vocabulary size (and codec)."""
    table = token_table(tokens, vocab_size, column, codec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------------------------
# Where a table's files are
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableFiles:
    """The Parquet files of one table (or one split), on one file system (pickles to Ray tasks)."""

    filesystem: pafs.FileSystem
    paths: tuple[str, ...]
    uri_prefix: str = ""  # "s3://" for remote storage: how file names are shown

    def name(self, path: str) -> str:
        return self.uri_prefix + path


def _filesystem(path: str | Path) -> tuple[pafs.FileSystem, str, str]:
    text = str(path)
    if "://" in text:
        try:
            fs, fs_path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"{text}: cannot open this location ({error})") from error
        return fs, fs_path.rstrip("/"), text.split("://", 1)[0] + "://"
    return pafs.LocalFileSystem(), str(Path(text).resolve()), ""


def _parquet_under(fs: pafs.FileSystem, directory: str, shown: str) -> tuple[str, ...]:
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise DataError(f"{shown}: directory holds no .parquet files")
    return tuple(files)


def find_splits(path: str | Path) -> dict[str, TableFiles]:
    """{"train": ..., "valid": ..., ["test": ...]} for a split directory, else {"all": ...}."""
    fs, root, prefix = _filesystem(path)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file or directory")
    if kind == pafs.FileType.File:
        return {"all": TableFiles(fs, (root,), prefix)}
    splits = {}
    for split in SPLITS:
        as_file, as_dir = fs.get_file_info([f"{root}/{split}.parquet", f"{root}/{split}"])
        if as_file.type == pafs.FileType.File:
            splits[split] = TableFiles(fs, (as_file.path,), prefix)
        elif as_dir.type == pafs.FileType.Directory:
            splits[split] = TableFiles(fs, _parquet_under(fs, as_dir.path, prefix + as_dir.path), prefix)
    if splits:
        missing = [s for s in ("train", "valid") if s not in splits]
        if missing:
            raise DataError(f"{path}: has a {' and '.join(sorted(splits))} split but no {' or '.join(missing)}: a "
                            "split table needs train and valid (test is optional)")
        return splits
    return {"all": TableFiles(fs, _parquet_under(fs, root, str(path)), prefix)}


def _open(files: TableFiles, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(files.filesystem.open_input_file(path))
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataError(f"{files.name(path)}: not a readable Parquet file ({error})") from error


# ---------------------------------------------------------------------------------------------
# What a table says about itself
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataDescription:
    """Shape, vocabulary, codec and row counts of a data set, read from the data itself."""

    source: str
    seq_len: int
    vocab_size: int
    vocab_from: str  # "metadata", "data.vocab_size", "largest token + 1" or "built-in"
    codec: TokenCodec | None
    rows: dict[str, int]  # per split ("all" for a table split in memory)
    splits: dict[str, TableFiles] = field(default_factory=dict)  # empty for built-in data sets

    @property
    def streams(self) -> bool:
        """Whether training reads its split as a stream (a split table) rather than from memory."""
        return "train" in self.splits

    def summary(self) -> str:
        rows = ", ".join(f"{split} {count:,}" for split, count in self.rows.items())
        codec = f"; decodes as {self.codec.kind}" if self.codec else ""
        return (f"data {self.source}: seq_len {self.seq_len}, vocab_size {self.vocab_size} (from {self.vocab_from})"
                f"{codec}; rows: {rows}")


def describe_data(cfg: FLDDConfig) -> DataDescription:
    """Read the data's own description: schema and metadata only, except for a table with no
    vocabulary metadata and no data.vocab_size, whose largest token is found by a streaming scan."""
    d = cfg.data
    if not d.path:
        spec = builtin(d.name)
        sizes = {split: len(rows) for split, rows in spec.splits(d).items()}
        return DataDescription(f"built-in {d.name}", spec.seq_len, spec.vocab_size, "built-in",
                               builtin_codec(d.name), sizes)
    splits = find_splits(d.path)
    vocab, vocab_file, codec, seq_len, rows = 0, "", None, 0, {}
    for split, files in splits.items():
        rows[split] = 0
        for path in files.paths:
            parquet = _open(files, path)
            schema = parquet.schema_arrow
            if d.column not in schema.names:
                raise DataError(f"{files.name(path)}: column {d.column!r} is missing (columns: {schema.names})")
            rows[split] += parquet.metadata.num_rows
            metadata = schema.metadata or {}
            if VOCAB_KEY in metadata:
                if vocab and int(metadata[VOCAB_KEY]) != vocab:
                    raise DataError(f"{files.name(path)} says vocab_size={int(metadata[VOCAB_KEY])} in its metadata, "
                                    f"but {vocab_file} says {vocab}: the files of one table must agree")
                vocab, vocab_file = int(metadata[VOCAB_KEY]), files.name(path)
            codec = codec or codec_from_metadata(metadata)
            if not seq_len:
                seq_len = _first_row_length(parquet, schema.field(d.column).type, d.column)
    if not seq_len:
        raise DataError(f"{d.path}: column {d.column!r}: the table is empty")
    if vocab:
        if d.vocab_size and d.vocab_size != vocab:
            raise DataError(f"data.vocab_size={d.vocab_size}, but {d.path} says vocab_size={vocab} in its metadata")
        vocab_from = "metadata"
    elif d.vocab_size or cfg.vocab_size:  # stated: every token is checked against it when the data is validated
        vocab = d.vocab_size or cfg.vocab_size
        vocab_from = "data.vocab_size" if d.vocab_size else "the config's vocab_size"
    else:
        largest = max(_largest_token(files, d.column) for files in splits.values())
        if largest + 1 > MAX_INFERRED_VOCAB:
            raise DataError(f"{d.path}: no {VOCAB_KEY.decode()!r} metadata and the largest token is {largest}: a "
                            f"vocabulary of {largest + 1:,} is implausible; set data.vocab_size (or write the "
                            "metadata) if it is meant")
        vocab, vocab_from = max(largest + 1, 2), "largest token + 1"
    return DataDescription(str(d.path), seq_len, vocab, vocab_from, codec, rows, splits)


def _first_row_length(parquet: pq.ParquetFile, kind: pa.DataType, column: str) -> int:
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size
    for batch in parquet.iter_batches(batch_size=1, columns=[column]):
        if batch.num_rows and batch.column(0)[0].is_valid:
            return len(batch.column(0)[0])
    return 0


def _largest_token(files: TableFiles, column: str) -> int:
    largest = -1
    for path in files.paths:
        for batch in _open(files, path).iter_batches(batch_size=SCAN_BATCH_ROWS, columns=[column]):
            values = pc.list_flatten(batch.column(0))
            if len(values):
                largest = max(largest, pc.max(values).as_py())
    return largest


def resolve_data_shape(cfg: FLDDConfig) -> tuple[FLDDConfig, DataDescription]:
    """The config with seq_len and vocab_size from the data (where they are 0, the default); a
    value the config states must agree with the data, else DataError naming both."""
    described = describe_data(cfg)
    for key, found in (("seq_len", described.seq_len), ("vocab_size", described.vocab_size)):
        stated = getattr(cfg, key)
        if stated and stated != found:  # (a table without metadata takes a stated vocab_size as its own)
            what = "rows of length" if key == "seq_len" else "a vocabulary of"
            raise DataError(f"{key}={stated} in the config, but {described.source} has {what} {found} "
                            f"(vocabulary from {described.vocab_from}): drop {key} from the config (it comes "
                            "from the data) or fix it")
    return cfg.with_overrides({"seq_len": described.seq_len, "vocab_size": described.vocab_size}), described


# ---------------------------------------------------------------------------------------------
# Validation and reading
# ---------------------------------------------------------------------------------------------

def check_token_file(files: TableFiles, path: str, column: str, seq_len: int, vocab_size: int) -> int:
    """Stream over one file, checking type, nulls, lengths and token range; returns its rows.
    DataError names the file, and the row (counted from the file's start) and column."""
    return _scan_file(files, path, column, seq_len, vocab_size, keep=False)[0]


def _scan_file(files: TableFiles, path: str, column: str, seq_len: int, vocab_size: int,
               keep: bool) -> tuple[int, list[np.ndarray]]:
    parquet, name = _open(files, path), files.name(path)
    if column not in parquet.schema_arrow.names:
        raise DataError(f"{name}: column {column!r} is missing (columns: {parquet.schema_arrow.names})")
    offset, kept = 0, []
    batches = parquet.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=[column])
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as error:  # a truncated or corrupt file
            raise DataError(f"{name}: unreadable after row {offset} ({error})") from error
        if batch is None:
            break
        tokens = _validate_column(batch.column(0), name, column, seq_len, offset)
        _check_range(tokens, vocab_size, name, column, offset)
        if keep:
            kept.append(tokens)
        offset += batch.num_rows
    if offset == 0:
        raise DataError(f"{name}: column {column!r}: the table is empty")
    return offset, kept


def check_file_task(one_file: TableFiles, column: str, seq_len: int, vocab_size: int) -> str | None:
    """One file's validation as a (Ray) task: None, or the DataError's message (a plain string
    crosses process boundaries without the exception's class)."""
    try:
        check_token_file(one_file, one_file.paths[0], column, seq_len, vocab_size)
        return None
    except DataError as error:
        return str(error)


def read_split(files: TableFiles, column: str, seq_len: int, vocab_size: int) -> Tensor:
    """A whole split in memory ((N, D) int64), validated file by file."""
    chunks = [t for path in files.paths for t in _scan_file(files, path, column, seq_len, vocab_size, keep=True)[1]]
    return torch.from_numpy(np.concatenate(chunks))


def read_token_table(path: str | Path, column: str = "tokens", vocab_size: int = 0) -> tuple[Tensor, int]:
    """Read and validate a whole token table: returns ((N, D) int64 tokens, vocab_size)."""
    cfg = FLDDConfig().with_overrides({"data.path": str(path), "data.column": column, "data.vocab_size": vocab_size})
    described = describe_data(cfg)
    tokens = torch.cat([read_split(files, column, described.seq_len, described.vocab_size)
                        for files in described.splits.values()])
    return tokens, described.vocab_size


def tokens_from_table(table: pa.Table, source: str, column: str = "tokens") -> tuple[Tensor, int]:
    """Validate an in-memory Arrow token table (built-in data sets take this path too)."""
    metadata = table.schema.metadata or {}
    if VOCAB_KEY not in metadata:
        raise DataError(f"{source}: no {VOCAB_KEY.decode()!r} metadata")
    vocab_size = int(metadata[VOCAB_KEY])
    data = table.column(column).combine_chunks()
    seq_len = len(data[0]) if len(data) and data[0].is_valid else 0
    tokens = _validate_column(data, source, column, seq_len, 0)
    _check_range(tokens, vocab_size, source, column, 0)
    return torch.from_numpy(tokens), vocab_size


def arrow_tokens(column: pa.Array | pa.ChunkedArray, seq_len: int) -> Tensor:
    """A validated list column (a training batch from Ray Data) as (N, D) int64 tokens."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = np.asarray(pc.list_flatten(column)).astype(np.int64)
    return torch.from_numpy(flat.reshape(len(column), seq_len))


def _check_range(tokens: np.ndarray, vocab_size: int, name: str, column: str, offset: int) -> None:
    bad_rows = np.nonzero(((tokens < 0) | (tokens >= vocab_size)).any(axis=1))[0]
    if bad_rows.size:
        row = int(bad_rows[0])
        value = int(tokens[row][(tokens[row] < 0) | (tokens[row] >= vocab_size)][0])
        kind = "negative token" if value < 0 else "token outside [0, vocab_size)"
        raise DataError(f"{name}: row {offset + row}, column {column!r}: {kind} {value} (vocab_size={vocab_size})")


def _validate_column(data: pa.Array, name: str, column: str, seq_len: int, offset: int) -> np.ndarray:
    kind = data.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_integer(kind.value_type):
        raise DataError(f"{name}: column {column!r} has type {kind}; expected a list of integers")
    nulls = np.nonzero(np.asarray(data.is_null()))[0]
    if nulls.size:
        raise DataError(f"{name}: row {offset + int(nulls[0])}, column {column!r}: null row")
    lengths = np.asarray(pc.list_value_length(data))
    ragged = np.nonzero(lengths != seq_len)[0]
    if ragged.size:
        row = int(ragged[0])
        raise DataError(f"{name}: row {offset + row}, column {column!r}: ragged row of length {lengths[row]}, "
                        f"the table's rows have length {seq_len}")
    flat = np.asarray(pc.list_flatten(data)).astype(np.int64)
    return flat.reshape(len(data), seq_len)


def infinite_batches(data: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled minibatches of rows, reshuffled every epoch, forever."""
    if data.shape[0] < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the data set ({data.shape[0]} rows)")
    while True:
        order = torch.randperm(data.shape[0], generator=generator)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size]]


def load_splits(cfg: FLDDConfig) -> tuple[Tensor, Tensor]:
    """(train, valid) tokens in memory: a built-in data set, a split table's train and valid, or a
    single table split by data.valid_fraction with data.seed. The config's seq_len and vocab_size
    come from the data where they are 0, and must agree with it otherwise."""
    cfg, described = resolve_data_shape(cfg)
    if not described.splits:
        return load_builtin_split(cfg, "train"), load_builtin_split(cfg, "valid")
    read = lambda split: read_split(described.splits[split], cfg.data.column, cfg.seq_len, cfg.vocab_size)  # noqa: E731
    if described.streams:
        return read("train"), read("valid")
    return split_in_memory(read("all"), cfg, described.source)


def split_in_memory(tokens: Tensor, cfg: FLDDConfig, source: str) -> tuple[Tensor, Tensor]:
    """(train, valid) of a table without splits: data.valid_fraction of the rows, drawn with data.seed."""
    if tokens.shape[0] < 2:
        raise DataError(f"{source}: {tokens.shape[0]} row(s) cannot be split into train and valid")
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(cfg.data.seed))
    num_valid = max(1, int(round(cfg.data.valid_fraction * tokens.shape[0])))
    return tokens[order[num_valid:]], tokens[order[:num_valid]]


def load_valid_split(cfg: FLDDConfig) -> Tensor:
    """The validation split alone (a split table's train files are not read)."""
    cfg, described = resolve_data_shape(cfg)
    if described.streams:
        return read_split(described.splits["valid"], cfg.data.column, cfg.seq_len, cfg.vocab_size)
    return load_splits(cfg)[1]


def load_builtin_split(cfg: FLDDConfig, split: str) -> Tensor:
    """One split (train, valid, test) of a built-in data set, through the token-table validation."""
    table = builtin_table(cfg.data, split)
    tokens, vocab = tokens_from_table(table, f"built-in {cfg.data.name}/{split}")
    if (tokens.shape[1], vocab) != (cfg.seq_len, cfg.vocab_size):
        raise DataError(f"data.name={cfg.data.name!r} has seq_len={tokens.shape[1]} and vocab_size={vocab}; the "
                        f"config says seq_len={cfg.seq_len}, vocab_size={cfg.vocab_size}")
    return tokens


def load_test_split(cfg: FLDDConfig) -> Tensor:
    """The held-out test split: built-ins have one; a table needs a `test` split."""
    cfg, described = resolve_data_shape(cfg)
    if not described.splits:
        return load_builtin_split(cfg, "test")
    if "test" not in described.splits:
        raise DataError(f"{cfg.data.path}: no test split (test.parquet or test/; only split tables have one)")
    return read_split(described.splits["test"], cfg.data.column, cfg.seq_len, cfg.vocab_size)
