"""Text and CSV files as token tables (`fldd data prepare`), and a streaming report on a token
table (`fldd data inspect`). pyarrow and numpy only.

Text (`prepare_text`): the files, in the order given, are read as one stream (like `cat`) and cut
into non-overlapping rows of `seq_len` tokens; the tail shorter than `seq_len` is dropped (and
counted). Tokens are
- characters (chars codec): by default the alphabet is the sorted set of characters found in
  the corpus; with an explicit alphabet, a character outside it is an error naming the file,
  line and column, unless `unknown` names a character of the alphabet to map such characters to;
  text is read as UTF-8 with universal newlines (\\r\\n and \\r become \\n);
- bytes (bytes codec, vocabulary 256): the raw bytes, any encoding.
The input is read twice (alphabet and size first, then tokens), a block of about a million
characters at a time: memory does not grow with the corpus.

CSV (`prepare_csv`): one row per CSV record, one token per chosen column (position j = column j).
Each column has its own vocabulary: the sorted distinct values as strings (an empty cell is the
category ""); token ids of every column start at 0; the table's vocab_size is the largest
column's. Also read twice, in blocks (pyarrow's streaming CSV reader).

Splits: rows are grouped into blocks of up to 32 consecutive rows (fewer for small data, so the
smallest split still gets at least two blocks), and whole blocks are assigned to train, valid or
test with a seeded permutation, in the proportions asked. Neighbouring rows (the two halves of a
sentence) therefore rarely straddle two splits.

Output: DIR/{train,valid,test}.parquet, token tables as fldd.token_table writes them (column
"tokens", fixed_size_list<int64>, metadata fldd.vocab_size and fldd.codec), written in row groups
with ParquetWriter, plus DIR/fldd_data.json describing how they were made.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fldd.codec import CODEC_KEY, CodecError, TokenCodec, codec_from_metadata
from fldd.token_table import VOCAB_KEY, DataError

SPLITS = ("train", "valid", "test")
DATA_JSON = "fldd_data.json"
DATA_FORMAT = "fldd-data/1"
MAX_BLOCK_ROWS = 32  # consecutive rows kept together in one split
ROW_GROUP_TOKENS = 1 << 20  # tokens per Parquet row group (8 MiB of int64)
READ_CHARS = 1 << 20  # characters (or bytes) read at a time
CSV_BLOCK_BYTES = 1 << 22
SCAN_TOKENS = 1 << 20  # tokens per record batch when inspect streams over a table
MANY_CATEGORIES = 1000  # a column with more categories than this (and mostly distinct values) is flagged


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named or matched by glob patterns (`**` recurses), in order, each once. DataError for
    a pattern that matches no file, or names a directory."""
    if not patterns:
        raise DataError("no input files given")
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            raise DataError(f"{pattern}: is a directory; give its files, e.g. '{pattern.rstrip('/')}/*.txt' "
                            "(quoted, so fldd expands it; '**' recurses)")
        if path.is_file():
            matched = [path]
        else:
            matched = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
            if not matched:
                raise DataError(f"{pattern}: no such file, and no files match it as a pattern")
        files.extend(m for m in matched if m not in files)
    return files


def _text_blocks(file: Path, lowercase: bool) -> Iterator[tuple[str, int]]:
    """(block of text, line number of its first character), about READ_CHARS characters each."""
    try:
        with open(file, encoding="utf-8") as handle:  # universal newlines: \r\n and \r read as \n
            line = 1
            while block := handle.read(READ_CHARS):
                if lowercase:
                    block = block.lower()
                yield block, line
                line += block.count("\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason}, byte 0x{error.object[error.start]:02x}); "
                        "prepare it with --bytes") from None


def _byte_blocks(file: Path, lowercase: bool) -> Iterator[bytes]:
    with open(file, "rb") as handle:
        while block := handle.read(READ_CHARS):
            yield block.lower() if lowercase else block  # ASCII letters only: lengths never change


def _where(file: Path, block: str, line: int, position: int) -> str:
    line += block.count("\n", 0, position)
    column = position - block.rfind("\n", 0, position)  # 1-based (rfind gives -1 on the first line)
    return f"{file}:{line}:{column}"


# ---------------------------------------------------------------------------------------------
# Splits and writing
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitPlan:
    """Row i goes to split assignment[i // block_rows] (0 train, 1 valid, 2 test)."""

    block_rows: int
    assignment: np.ndarray


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for name, value in (("--valid-fraction", valid_fraction), ("--test-fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise DataError(f"{name}={value}: must be in (0, 1) (every split must be non-empty)")
    if valid_fraction + test_fraction >= 1:
        raise DataError(f"--valid-fraction {valid_fraction} + --test-fraction {test_fraction} leave nothing "
                        "to train on: their sum must be below 1")


def plan_splits(num_rows: int, valid_fraction: float, test_fraction: float, seed: int,
                max_block_rows: int = MAX_BLOCK_ROWS) -> SplitPlan:
    """Whole blocks of consecutive rows to each split, chosen by a permutation seeded with `seed`.
    Blocks hold up to max_block_rows rows, fewer when the data is small, so that the smaller held-out
    split still gets about two blocks; every split gets at least one (else DataError)."""
    check_fractions(valid_fraction, test_fraction)
    wanted_blocks = math.ceil(2 / min(valid_fraction, test_fraction))
    block = max(1, min(max_block_rows, num_rows // wanted_blocks))
    num_blocks = math.ceil(num_rows / block)
    num_valid = max(1, round(valid_fraction * num_blocks))
    num_test = max(1, round(test_fraction * num_blocks))
    if num_valid + num_test >= num_blocks:
        raise DataError(f"{num_rows} row(s) are too few to fill train, valid and test: prepare more data, or "
                        "a shorter --seq-len for text")
    order = np.random.default_rng(seed).permutation(num_blocks)
    assignment = np.zeros(num_blocks, dtype=np.int8)
    assignment[order[:num_valid]] = 1
    assignment[order[num_valid:num_valid + num_test]] = 2
    return SplitPlan(block, assignment)


def table_schema(seq_len: int, codec: TokenCodec, column: str = "tokens") -> pa.Schema:
    """A token table's schema, as fldd.token_table.token_table makes it."""
    metadata = {VOCAB_KEY: str(codec.vocab_size).encode(), CODEC_KEY: codec.to_json().encode()}
    return pa.schema([pa.field(column, pa.list_(pa.int64(), seq_len))], metadata=metadata)


class _SplitWriter:
    """Rows in stream order -> train/valid/test Parquet files (under temporary names until commit)."""

    def __init__(self, out: Path, seq_len: int, codec: TokenCodec, plan: SplitPlan):
        self.out, self.seq_len, self.plan = out, seq_len, plan
        self.schema = table_schema(seq_len, codec)
        self.group_rows = max(1, ROW_GROUP_TOKENS // seq_len)
        self.next_row = 0
        self.carry = np.zeros(0, dtype=np.int64)
        self.pending: list[list[np.ndarray]] = [[] for _ in SPLITS]
        self.rows = [0 for _ in SPLITS]
        self.partial = [out / f".{name}.parquet.partial" for name in SPLITS]
        self.writers = [pq.ParquetWriter(path, self.schema) for path in self.partial]

    def add_tokens(self, tokens: np.ndarray) -> None:
        """A stretch of the token stream: complete rows are written, the rest waits for more."""
        stream = np.concatenate([self.carry, tokens.astype(np.int64, copy=False)])
        usable = len(stream) // self.seq_len * self.seq_len
        self.carry = stream[usable:].copy()
        if usable:
            self.add_rows(stream[:usable].reshape(-1, self.seq_len))

    def add_rows(self, rows: np.ndarray) -> None:
        index = self.next_row + np.arange(len(rows))
        self.next_row += len(rows)
        which = self.plan.assignment[index // self.plan.block_rows]
        for split in range(len(SPLITS)):
            chosen = rows[which == split]
            if len(chosen):
                self.pending[split].append(chosen)
                self.rows[split] += len(chosen)
                if sum(len(p) for p in self.pending[split]) >= self.group_rows:
                    self._flush(split)

    def _flush(self, split: int) -> None:
        if not self.pending[split]:
            return
        rows = np.concatenate(self.pending[split])
        self.pending[split] = []
        for start in range(0, len(rows), self.group_rows):
            part = rows[start:start + self.group_rows]
            column = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), self.seq_len)
            self.writers[split].write_table(pa.Table.from_arrays([column], schema=self.schema))

    def commit(self) -> int:
        """Close the files, move them into place; returns the tokens left over (the dropped tail)."""
        for split in range(len(SPLITS)):
            self._flush(split)
        for writer in self.writers:
            writer.close()
        for name, path in zip(SPLITS, self.partial):
            os.replace(path, self.out / f"{name}.parquet")
        return len(self.carry)

    def abort(self) -> None:
        for writer in self.writers:
            try:
                writer.close()
            except Exception:  # already closed, or broken by the error that brought us here
                pass
        for path in self.partial:
            path.unlink(missing_ok=True)


def check_output(out: Path, force: bool) -> None:
    """Refuse a non-empty output directory unless force (checked before any reading)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out}: directory is not empty; choose another, or pass --force to overwrite "
                        "the splits there")


def claim_output(out: Path) -> None:
    """Create the output directory; remove the files a previous `prepare` wrote there (nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in [f"{s}.parquet" for s in SPLITS] + [DATA_JSON]:
        (out / name).unlink(missing_ok=True)


@dataclass
class Prepared:
    """What `prepare_text` / `prepare_csv` made (also written as DIR/fldd_data.json)."""

    out: str
    kind: str  # text | csv
    sources: list[str]
    seq_len: int
    vocab_size: int
    codec: dict[str, Any]
    rows: dict[str, int]
    seed: int
    valid_fraction: float
    test_fraction: float
    block_rows: int
    tokens_total: int  # tokens read (text) or cells (csv)
    tokens_dropped: int  # text: the tail shorter than seq_len
    vocabulary_from: str  # "corpus", "--alphabet", "bytes", "columns"
    lowercase: bool = False
    unknown: str | None = None
    unknown_replaced: int = 0
    notes: list[str] = field(default_factory=list)
    format: str = DATA_FORMAT

    @property
    def token_codec(self) -> TokenCodec:
        return TokenCodec.from_dict(self.codec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        codec = self.token_codec
        what = {"corpus": "the sorted set of characters found in the corpus (fix it with --alphabet)",
                "--alphabet": "given with --alphabet", "bytes": "bytes 0-255 (--bytes)",
                "columns": "one vocabulary per column"}[self.vocabulary_from]
        read = (f"{self.tokens_total:,} {'bytes' if codec.kind == 'bytes' else 'characters'}" if self.kind == "text"
                else f"{sum(self.rows.values()):,} records")
        lines = [f"prepared {len(self.sources)} {self.kind} file(s) ({read}) into {self.out}"]
        if codec.kind == "chars":
            shown = repr(codec.alphabet) if len(codec.alphabet) <= 120 else repr(codec.alphabet[:120]) + " ..."
            lines.append(f"  codec chars: {codec.vocab_size} symbols, {what}: {shown}")
        elif codec.kind == "bytes":
            lines.append(f"  codec bytes: vocabulary 256, {what}")
        else:
            sizes = ", ".join(f"{name} {len(cats)}" for name, cats in zip(codec.columns, codec.categories))
            lines.append(f"  codec columns: {len(codec.columns)} columns, categories per column: {sizes}; "
                         f"vocab_size {codec.vocab_size} (the largest column's)")
        if self.lowercase:
            lines.append("  lowercased")
        if self.unknown is not None:
            lines.append(f"  {self.unknown_replaced:,} character(s) outside the alphabet mapped to {self.unknown!r}")
        rows = " / ".join(f"{split} {self.rows[split]:,}" for split in SPLITS)
        lines.append(f"  rows of {self.seq_len} tokens: {rows} (blocks of {self.block_rows} consecutive rows, "
                     f"seed {self.seed})")
        if self.kind == "text":
            lines.append(f"  dropped the last {self.tokens_dropped:,} token(s): a tail shorter than "
                         f"--seq-len {self.seq_len}" if self.tokens_dropped else "  no tokens dropped")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"  wrote {', '.join(f'{s}.parquet' for s in SPLITS)} and {DATA_JSON}")
        return "\n".join(lines)


def _finish(writer: _SplitWriter, result: Prepared) -> Prepared:
    try:
        result.tokens_dropped = writer.commit()
    except BaseException:
        writer.abort()
        raise
    result.rows = dict(zip(SPLITS, writer.rows))
    out = Path(result.out)
    (out / DATA_JSON).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return result


def _write_all(writer: _SplitWriter, feed: Iterator[None]) -> None:
    try:
        for _ in feed:
            pass
    except BaseException:
        writer.abort()
        raise


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def prepare_text(inputs: Sequence[str], out: str | Path, *, seq_len: int = 64, alphabet: str | None = None,
                 use_bytes: bool = False, unknown: str | None = None, lowercase: bool = False,
                 valid_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                 force: bool = False) -> Prepared:
    """Text files -> DIR/{train,valid,test}.parquet + fldd_data.json (see the module docstring)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"--seq-len={seq_len}: must be an integer >= 1")
    if use_bytes and (alphabet is not None or unknown is not None):
        raise DataError("--bytes takes no --alphabet or --unknown: every byte value is a token")
    if unknown is not None and alphabet is None:
        raise DataError("--unknown needs --alphabet (without one, the alphabet is every character found)")
    if unknown is not None and (len(unknown) != 1 or unknown not in alphabet):
        raise DataError(f"--unknown {unknown!r}: must be one character of the alphabet {alphabet!r}")
    if alphabet is not None:
        TokenCodec("chars", alphabet)  # CodecError: fewer than 2 symbols, or repeated ones
    check_fractions(valid_fraction, test_fraction)
    files = expand_inputs(inputs)
    out = Path(out)
    check_output(out, force)

    # pass 1: size, alphabet, characters outside a given alphabet
    total, seen, replaced = 0, set(), 0
    allowed = set(alphabet) if alphabet is not None else None
    for file in files:
        if use_bytes:
            total += sum(len(block) for block in _byte_blocks(file, lowercase))
            continue
        for block, line in _text_blocks(file, lowercase):
            total += len(block)
            if allowed is None:
                seen.update(block)
                continue
            outside = set(block) - allowed
            if outside and unknown is None:
                position = min(block.index(ch) for ch in outside)
                ch = block[position]
                raise DataError(f"{_where(file, block, line, position)}: character {ch!r} (U+{ord(ch):04X}) is "
                                f"not in the alphabet {alphabet!r}; add it to --alphabet, map such characters with "
                                "--unknown CHAR, or use --bytes")
            replaced += sum(block.count(ch) for ch in outside)
    if total == 0:
        raise DataError(f"{', '.join(map(str, files))}: the corpus is empty")
    if total < seq_len:
        raise DataError(f"the corpus has {total} token(s), fewer than --seq-len {seq_len}: not one complete row")
    if use_bytes:
        codec, source = TokenCodec("bytes"), "bytes"
    elif alphabet is None:
        found = "".join(sorted(seen))
        if len(found) < 2:
            raise DataError(f"the corpus holds a single distinct character {found!r}: nothing to model")
        codec, source = TokenCodec("chars", found), "corpus"
    else:
        codec, source = TokenCodec("chars", alphabet), "--alphabet"

    plan = plan_splits(total // seq_len, valid_fraction, test_fraction, seed)
    result = Prepared(str(out), "text", [str(f) for f in files], seq_len, codec.vocab_size, codec.to_dict(), {},
                      seed, valid_fraction, test_fraction, plan.block_rows, total, 0, source, lowercase, unknown,
                      replaced)
    claim_output(out)
    writer = _SplitWriter(out, seq_len, codec, plan)

    def feed() -> Iterator[None]:  # pass 2: tokens
        if use_bytes:
            for file in files:
                for block in _byte_blocks(file, lowercase):
                    writer.add_tokens(np.frombuffer(block, dtype=np.uint8))
                    yield
            return
        encode = _char_encoder(codec.alphabet, unknown)
        for file in files:
            for block, _ in _text_blocks(file, lowercase):
                writer.add_tokens(encode(block))
                yield

    _write_all(writer, feed())
    return _finish(writer, result)


def _char_encoder(alphabet: str, unknown: str | None):
    """str -> int64 token ids, vectorised over code points (sorted lookup)."""
    points = np.array([ord(ch) for ch in alphabet], dtype=np.uint32)
    order = np.argsort(points)
    keys, ids = points[order], order.astype(np.int64)
    fallback = alphabet.index(unknown) if unknown is not None else -1

    def encode(text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        at = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
        tokens = ids[at]
        outside = keys[at] != codes
        if outside.any():
            if fallback < 0:  # pass 1 found none: the file changed between the passes
                raise DataError("the input changed while it was being prepared (a character outside the alphabet "
                                "appeared in the second pass); run prepare again")
            tokens[outside] = fallback
        return tokens

    return encode


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

def csv_header(file: Path) -> list[str]:
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason})") from None
    except csv.Error as error:
        raise DataError(f"{file}: cannot read the CSV header ({error})") from None
    if not header:
        raise DataError(f"{file}: empty file: no header row")
    return header


def _csv_batches(file: Path, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    convert = pacsv.ConvertOptions(include_columns=list(columns), column_types={c: pa.string() for c in columns},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(file, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                convert_options=convert)
        for batch in reader:
            yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"{file}: {error}") from None


def prepare_csv(inputs: Sequence[str], columns: Sequence[str] | None, out: str | Path, *,
                valid_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                force: bool = False) -> Prepared:
    """Categorical CSV tables -> DIR/{train,valid,test}.parquet + fldd_data.json: one token per
    chosen column, per-column vocabularies (sorted distinct strings; an empty cell is category "")."""
    check_fractions(valid_fraction, test_fraction)
    files = expand_inputs(inputs)
    headers = {file: csv_header(file) for file in files}
    first = headers[files[0]]
    if not columns:
        raise DataError(f"--csv needs --columns a,b,c: the columns of {files[0]} are {first}")
    columns = list(columns)
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"--columns names {repeated} more than once")
    for file, header in headers.items():
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{file}: no column(s) {missing}; its columns are {header}")
        twice = [c for c in columns if header.count(c) > 1]
        if twice:
            raise DataError(f"{file}: column(s) {twice} appear more than once in the header")
    out = Path(out)
    check_output(out, force)

    # pass 1: categories and size
    values: list[set[str]] = [set() for _ in columns]
    records = 0
    for file in files:
        for batch in _csv_batches(file, columns):
            records += batch.num_rows
            for j, name in enumerate(columns):
                values[j].update(pc.unique(batch.column(batch.schema.get_field_index(name))).to_pylist())
    if records == 0:
        raise DataError(f"{', '.join(map(str, files))}: no records below the header")
    categories = tuple(tuple(sorted(v)) for v in values)
    codec = TokenCodec("columns", columns=tuple(columns), categories=categories)
    if codec.vocab_size < 2:
        raise DataError(f"every column holds a single value ({dict(zip(columns, (c[0] for c in categories)))}): "
                        "nothing to model")
    notes = [f"column {name!r} has {len(cats):,} categories for {records:,} records: an identifier? Leave it out "
             "of --columns" for name, cats in zip(columns, categories)
             if len(cats) > MANY_CATEGORIES and len(cats) > records // 2]
    lookups = [pa.array(cats, type=pa.string()) for cats in categories]

    plan = plan_splits(records, valid_fraction, test_fraction, seed)
    result = Prepared(str(out), "csv", [str(f) for f in files], len(columns), codec.vocab_size, codec.to_dict(), {},
                      seed, valid_fraction, test_fraction, plan.block_rows, records * len(columns), 0, "columns",
                      notes=notes)
    claim_output(out)
    writer = _SplitWriter(out, len(columns), codec, plan)

    def feed() -> Iterator[None]:  # pass 2: tokens
        for file in files:
            for batch in _csv_batches(file, columns):
                ids = [pc.index_in(batch.column(batch.schema.get_field_index(name)), value_set=lookup)
                       for name, lookup in zip(columns, lookups)]
                if any(i.null_count for i in ids):
                    raise DataError(f"{file} changed while it was being prepared (a value not seen in the first "
                                    "pass); run prepare again")
                writer.add_rows(np.stack([np.asarray(i, dtype=np.int64) for i in ids], axis=1))
                yield

    _write_all(writer, feed())
    return _finish(writer, result)


# ---------------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------------

def _tables(path: Path) -> dict[str, list[Path]]:
    """{split: files} for a split directory (split.parquet or a split/ directory of files), else
    {"all": every .parquet file} for any other directory or a single file."""
    if path.is_file():
        return {"all": [path]}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    tables = {}
    for split in SPLITS:
        if (path / f"{split}.parquet").is_file():
            tables[split] = [path / f"{split}.parquet"]
        elif (path / split).is_dir():
            tables[split] = sorted(p for p in (path / split).rglob("*.parquet") if p.is_file())
    if not tables:
        tables = {"all": sorted(p for p in path.rglob("*.parquet") if p.is_file())}
    empty = [split for split, files in tables.items() if not files]
    if empty:
        raise DataError(f"{path}: no .parquet files{'' if empty == ['all'] else ' for split ' + empty[0]}")
    return tables


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """64-bit hashes of int64 rows (odd random multipliers, wrapping arithmetic): equal rows hash
    equally; distinct rows collide with probability about 2^-64."""
    multipliers = np.random.default_rng(20240614).integers(1, 2**62, size=rows.shape[1], dtype=np.uint64) * 2 + 1
    with np.errstate(over="ignore"):
        return (rows.astype(np.uint64) * multipliers).sum(axis=1, dtype=np.uint64)


def _batch_tokens(data: pa.Array, name: str, column: str, offset: int, seq_len: int | None) -> np.ndarray:
    kind = data.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_integer(kind.value_type):
        raise DataError(f"{name}: column {column!r} has type {kind}; expected a list of integers")
    if data.null_count:
        row = int(np.nonzero(np.asarray(data.is_null()))[0][0])
        raise DataError(f"{name}: row {offset + row}, column {column!r}: null row")
    lengths = np.asarray(pc.list_value_length(data))
    expected = seq_len if seq_len is not None else (int(lengths[0]) if len(lengths) else 0)
    ragged = np.nonzero(lengths != expected)[0]
    if ragged.size:
        row = int(ragged[0])
        raise DataError(f"{name}: row {offset + row}, column {column!r}: length {lengths[row]}, other rows "
                        f"have length {expected}")
    return np.asarray(pc.list_flatten(data)).astype(np.int64).reshape(len(data), expected)


def symbol(codec: TokenCodec | None, token: int) -> str | None:
    """What a token id stands for under a codec, for people (None without a codec)."""
    if codec is None:
        return None
    if codec.kind == "chars":
        return codec.alphabet[token] if 0 <= token < len(codec.alphabet) else None
    if codec.kind == "bytes":
        return chr(token) if 32 <= token < 127 else f"0x{token:02x}"
    shown = [f"{name}={_category(cats[token])}" for name, cats in zip(codec.columns, codec.categories)
             if token < len(cats)]
    return " | ".join(shown[:3]) + (f" | ... ({len(shown)} columns)" if len(shown) > 3 else "")


def _category(value: str) -> str:
    return '""' if value == "" else value


def inspect_data(path: str | Path, column: str = "tokens", top: int = 10, examples: int = 3) -> dict[str, Any]:
    """A report on a token table (a prepared directory, a split directory, or a file), streaming
    over row groups: rows per split, sequence length, vocabulary and where it came from, codec,
    the most frequent tokens, held-out rows that copy a train row, and decoded example rows."""
    path = Path(path)
    tables = _tables(path)
    seq_len: int | None = None
    vocabs: dict[str, int] = {}
    codec: TokenCodec | None = None
    counts: Counter[int] = Counter()
    per_position: list[Counter[int]] = []  # columns codecs: counts per column
    train_hashes: np.ndarray | None = None
    report_tables, duplicates, shown, problems = [], {}, [], []
    for split, files in tables.items():
        rows = groups = copies = 0
        hashes = []
        for file in files:
            name = str(file)
            try:
                parquet = pq.ParquetFile(file)
            except Exception as error:  # pyarrow raises several types for unreadable files
                raise DataError(f"{name}: not a readable Parquet file ({error})") from None
            schema = parquet.schema_arrow
            if column not in schema.names:
                raise DataError(f"{name}: column {column!r} is missing (columns: {schema.names})")
            metadata = schema.metadata or {}
            if VOCAB_KEY in metadata:
                vocabs[name] = int(metadata[VOCAB_KEY])
            try:
                found = codec_from_metadata(metadata)
            except CodecError as error:
                problems.append(f"{name}: unreadable {CODEC_KEY.decode()} metadata ({error})")
                found = None
            if found is not None and codec is not None and found != codec:
                problems.append(f"{name}: its codec differs from the one of the files before it")
            codec = codec or found
            groups += parquet.metadata.num_row_groups
            kind = schema.field(column).type
            batch_rows = max(1, SCAN_TOKENS // kind.list_size) if pa.types.is_fixed_size_list(kind) else 4096
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
                tokens = _batch_tokens(batch.column(0), name, column, rows, seq_len)
                if seq_len is None and len(tokens):
                    seq_len = tokens.shape[1]
                values, freq = np.unique(tokens, return_counts=True)
                counts.update(dict(zip(values.tolist(), freq.tolist())))
                if codec is not None and codec.kind == "columns" and len(codec.columns) == tokens.shape[1]:
                    per_position = per_position or [Counter() for _ in codec.columns]
                    for j, column_counts in enumerate(per_position):
                        values, freq = np.unique(tokens[:, j], return_counts=True)
                        column_counts.update(dict(zip(values.tolist(), freq.tolist())))
                if split == "train":
                    hashes.append(_row_hashes(tokens))
                elif split in ("valid", "test") and train_hashes is not None:
                    copies += int(np.isin(_row_hashes(tokens), train_hashes).sum())
                for i in range(min(examples - len(shown), len(tokens))):
                    shown.append((split, rows + i, tokens[i].tolist()))
                rows += len(tokens)
        if split == "train" and hashes:
            train_hashes = np.unique(np.concatenate(hashes))
        if split in ("valid", "test") and train_hashes is not None:
            duplicates[split] = copies
        if rows == 0:
            problems.append(f"{split}: no rows")
        report_tables.append({"split": split, "files": [str(f) for f in files], "rows": rows, "row_groups": groups})
    if seq_len is None:
        raise DataError(f"{path}: column {column!r}: the table is empty")
    if len(set(vocabs.values())) > 1:
        problems.append(f"the files disagree on {VOCAB_KEY.decode()}: {vocabs}")
    largest, smallest = max(counts), min(counts)
    if vocabs:
        vocab_size, vocab_from = max(vocabs.values()), f"{VOCAB_KEY.decode()} metadata"
        if len(vocabs) < sum(len(f) for f in tables.values()):
            problems.append(f"only some files carry {VOCAB_KEY.decode()} metadata")
        if largest >= vocab_size:
            problems.append(f"token {largest} is outside [0, {vocab_size}): training would refuse this table")
    else:
        vocab_size, vocab_from = largest + 1, (f"largest token + 1: the table has no {VOCAB_KEY.decode()} metadata "
                                               "(training would assume the same; set data.vocab_size if wrong)")
    if smallest < 0:
        problems.append(f"negative token {smallest}: training would refuse this table")
    if codec is not None and codec.vocab_size != vocab_size:
        problems.append(f"the codec has {codec.vocab_size} symbols but vocab_size is {vocab_size}")
    if codec is not None and codec.kind == "columns" and len(codec.columns) != seq_len:
        problems.append(f"the codec has {len(codec.columns)} columns but rows have {seq_len} tokens")
    total = sum(counts.values())
    histogram = [{"token": token, "count": count, "share": count / total, "symbol": symbol(codec, token)}
                 for token, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]]
    columns = []
    if codec is not None and codec.kind == "columns" and per_position:
        for name, cats, column_counts in zip(codec.columns, codec.categories, per_position):
            column_total = sum(column_counts.values())
            ranked = sorted(column_counts.items(), key=lambda item: (-item[1], item[0]))
            columns.append({"column": name, "categories": len(cats), "used": len(column_counts),
                            "top": [{"token": t, "category": cats[t] if 0 <= t < len(cats) else None,
                                     "count": c, "share": c / column_total} for t, c in ranked[:3]]})
    report_examples = []
    for split, row, tokens in shown:
        entry: dict[str, Any] = {"split": split, "row": row, "tokens": tokens}
        if codec is not None:
            try:
                entry["decoded"] = codec.decode(tokens)
            except (IndexError, ValueError):
                entry["decoded"] = None
        report_examples.append(entry)
    described = path / DATA_JSON if path.is_dir() else path.parent / DATA_JSON
    prepared = None
    if described.is_file() and tables.keys() != {"all"}:
        try:
            prepared = json.loads(described.read_text())
        except (OSError, ValueError):
            problems.append(f"{described}: unreadable")
    return {
        "path": str(path), "tables": report_tables, "seq_len": seq_len, "vocab_size": vocab_size,
        "vocab_from": vocab_from, "codec": codec.to_dict() if codec else None,
        "codec_kind": codec.kind if codec else None, "tokens": total, "distinct_tokens": len(counts),
        "histogram": histogram, "columns": columns,
        "duplicates": {split: {"copies_of_train_rows": copies,
                               "rows": next(t["rows"] for t in report_tables if t["split"] == split)}
                       for split, copies in duplicates.items()},
        "examples": report_examples, "prepared": prepared, "problems": problems,
    }


def format_inspect(report: dict[str, Any]) -> str:
    """The inspect report for people."""
    lines = [report["path"]]
    prepared = report.get("prepared")
    if prepared:
        lines[0] += (f"  (fldd data prepare: {len(prepared.get('sources', []))} {prepared.get('kind', '?')} file(s), "
                     f"seed {prepared.get('seed')}, {prepared.get('tokens_dropped', 0):,} tokens dropped)")
    width = max(len(t["split"]) for t in report["tables"])
    for table in report["tables"]:
        files = table["files"][0] if len(table["files"]) == 1 else f"{len(table['files'])} files"
        lines.append(f"  {table['split']:<{width}}  {table['rows']:>10,} rows  {table['row_groups']:>4} row group(s)"
                     f"  {files}")
    codec = report["codec"]
    if codec is None:
        what = "none (token ids only)"
    elif codec["kind"] == "chars":
        alphabet = codec["alphabet"]
        what = f"chars, {len(alphabet)} symbols: " + (repr(alphabet) if len(alphabet) <= 120
                                                         else repr(alphabet[:120]) + " ...")
    elif codec["kind"] == "bytes":
        what = "bytes (UTF-8 text)"
    else:
        what = f"columns {codec['columns']}"
    lines.append(f"  sequence length {report['seq_len']}; vocabulary size {report['vocab_size']} "
                 f"(from {report['vocab_from']})")
    lines.append(f"  codec: {what}")
    lines.append(f"  {report['tokens']:,} tokens, {report['distinct_tokens']} distinct; "
                 f"top {len(report['histogram'])}:")
    for entry in report["histogram"]:
        symbol_ = entry["symbol"]
        shown = "" if symbol_ is None else f"  {symbol_}" if codec["kind"] == "columns" else f"  {symbol_!r}"
        lines.append(f"    {entry['token']:>6}  {entry['count']:>12,}  {100 * entry['share']:5.1f}%{shown}")
    for entry in report.get("columns", []):
        top = ", ".join(f"{_category(t['category']) if t['category'] is not None else '<invalid>'} "
                        f"{100 * t['share']:.0f}%" for t in entry["top"])
        lines.append(f"    column {entry['column']!r}: {entry['used']} of {entry['categories']} categories used; "
                     f"top: {top}")
    if report["duplicates"]:
        parts = [f"{split} {d['copies_of_train_rows']:,} of {d['rows']:,} rows"
                 for split, d in report["duplicates"].items()]
        lines.append(f"  exact copies of a train row: {'; '.join(parts)}")
    elif not any(t["split"] == "train" for t in report["tables"]):
        lines.append("  exact copies of a train row: not checked (no train split)")
    lines.append("  examples:")
    for entry in report["examples"]:
        shown = entry.get("decoded", entry["tokens"]) if report["codec"] else entry["tokens"]
        if isinstance(shown, dict):
            shown = json.dumps(shown, ensure_ascii=False)
        elif isinstance(shown, str):
            shown = repr(shown)
        else:
            shown = " ".join(map(str, shown))
        lines.append(f"    {entry['split']} row {entry['row']}: {shown}")
    for problem in report["problems"]:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)
