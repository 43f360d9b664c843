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

Output: DIR/train/part-00000.parquet ..., DIR/valid.parquet and DIR/test.parquet, token tables as
fldd.token_table writes them (column "tokens", fixed_size_list<int64>, metadata fldd.vocab_size
and fldd.codec), written in row groups with ParquetWriter, plus DIR/fldd_data.json describing how
they were made (with every file and its rows). Training streams the train files, reshuffling the
order of the files every epoch and rows only within a local buffer, so the train split is written
as train_parts() files (one per 50,000 rows, rounded down; 1 to 64), and each train block goes to
a part chosen by a seeded permutation (equal numbers of blocks per part): every part is a random
sample of blocks from the whole corpus. Each row group of a part is also written in a seeded
random row order. Memory stays bounded: one row group per output file is buffered (at most 16M
tokens across the train parts).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fldd.codec import CODEC_KEY, CodecError, TokenCodec, codec_from_metadata
from fldd.data import MAX_INFERRED_VOCAB, SCAN_BATCH_ROWS, _filesystem, _open, _validate_column, find_splits
from fldd.datasets import SPLITS
from fldd.token_table import VOCAB_KEY, DataError

DATA_JSON = "fldd_data.json"
DATA_FORMAT = "fldd-data/1"
MAX_BLOCK_ROWS = 32  # consecutive rows kept together in one split
PART_ROWS = 50_000  # train rows per part file: PART_ROWS to 2 x PART_ROWS (see train_parts)
MAX_TRAIN_PARTS = 64
PART_PATTERN = re.compile(r"part-\d{5}\.parquet")
TRAIN_PARTIAL = ".train.partial"  # the train parts are written here, then renamed to DIR/train
TRAIN_BUFFER_TOKENS = 1 << 24  # tokens buffered across all train parts (128 MiB of int64) at most
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
    """Row i goes to split assignment[i // block_rows] (0 train, 1 valid, 2 test); a train block
    goes to part file part[block] of the train split (-1 for held-out blocks)."""

    block_rows: int
    assignment: np.ndarray
    part: np.ndarray
    num_parts: int
    num_rows: int
    seed: int


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for name, value in (("--valid-fraction", valid_fraction), ("--test-fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise DataError(f"{name}={value}: must be in (0, 1) (every split must be non-empty)")
    if valid_fraction + test_fraction >= 1:
        raise DataError(f"--valid-fraction {valid_fraction} + --test-fraction {test_fraction} leave nothing "
                        "to train on: their sum must be below 1")


def train_parts(train_rows: int) -> int:
    """How many part files the train split is written as: one per PART_ROWS rows, rounded down,
    at least 1 and at most MAX_TRAIN_PARTS, so a part holds PART_ROWS to 2 x PART_ROWS rows (one
    part below 2 x PART_ROWS rows; parts grow past that only beyond MAX_TRAIN_PARTS x PART_ROWS)."""
    return max(1, min(MAX_TRAIN_PARTS, train_rows // PART_ROWS))


def plan_splits(num_rows: int, valid_fraction: float, test_fraction: float, seed: int,
                max_block_rows: int = MAX_BLOCK_ROWS) -> SplitPlan:
    """Whole blocks of consecutive rows to each split, chosen by a permutation seeded with `seed`.
    Blocks hold up to max_block_rows rows, fewer when the data is small, so that the smaller held-out
    split still gets about two blocks; every split gets at least one (else DataError). The train
    blocks are then dealt to train_parts() part files in a second seeded permutation: each part gets
    an equal number of blocks (give or take one), drawn from the whole corpus."""
    check_fractions(valid_fraction, test_fraction)
    wanted_blocks = math.ceil(2 / min(valid_fraction, test_fraction))
    block = max(1, min(max_block_rows, num_rows // wanted_blocks))
    num_blocks = math.ceil(num_rows / block)
    num_valid = max(1, round(valid_fraction * num_blocks))
    num_test = max(1, round(test_fraction * num_blocks))
    if num_valid + num_test >= num_blocks:
        raise DataError(f"{num_rows} row(s) are too few to fill train, valid and test: prepare more data, or "
                        "a shorter --seq-len for text")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_blocks)
    assignment = np.zeros(num_blocks, dtype=np.int8)
    assignment[order[:num_valid]] = 1
    assignment[order[num_valid:num_valid + num_test]] = 2
    train_blocks = np.flatnonzero(assignment == 0)
    sizes = np.full(num_blocks, block)
    sizes[-1] = num_rows - (num_blocks - 1) * block
    num_parts = min(train_parts(int(sizes[train_blocks].sum())), len(train_blocks))  # no part is empty
    part = np.full(num_blocks, -1, dtype=np.int64)
    part[rng.permutation(train_blocks)] = np.arange(len(train_blocks)) % num_parts
    return SplitPlan(block, assignment, part, num_parts, num_rows, seed)


def table_schema(seq_len: int, codec: TokenCodec, column: str = "tokens") -> pa.Schema:
    """A token table's schema, as fldd.token_table.token_table makes it."""
    metadata = {VOCAB_KEY: str(codec.vocab_size).encode(), CODEC_KEY: codec.to_json().encode()}
    return pa.schema([pa.field(column, pa.list_(pa.int64(), seq_len))], metadata=metadata)


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class _SplitWriter:
    """Rows in stream order -> DIR/train/part-*.parquet, DIR/valid.parquet and DIR/test.parquet
    (under temporary names until commit). Outputs are numbered: the train parts first, then valid
    and test. Each output buffers at most one row group; a train part's row group is written in a
    seeded random row order, so consecutive rows of a part come from different blocks."""

    def __init__(self, out: Path, seq_len: int, codec: TokenCodec, plan: SplitPlan):
        self.out, self.seq_len, self.plan = out, seq_len, plan
        self.schema = table_schema(seq_len, codec)
        parts = plan.num_parts
        self.train_dir = out / TRAIN_PARTIAL
        self.partial = [self.train_dir / part_name(i) for i in range(parts)] + \
            [out / f".{name}.parquet.partial" for name in SPLITS[1:]]
        self.final = [Path("train") / part_name(i) for i in range(parts)] + [Path(f"{n}.parquet") for n in SPLITS[1:]]
        held_out_rows = max(1, ROW_GROUP_TOKENS // seq_len)
        train_rows = max(1, min(ROW_GROUP_TOKENS, TRAIN_BUFFER_TOKENS // parts) // seq_len)
        self.group_rows = [train_rows] * parts + [held_out_rows] * (len(SPLITS) - 1)
        self.rng = np.random.default_rng([plan.seed, 1])  # row order within a train part's row group
        self.next_row = 0
        self.carry = np.zeros(0, dtype=np.int64)
        self.pending: list[list[np.ndarray]] = [[] for _ in self.partial]
        self.pending_rows = [0 for _ in self.partial]
        self.rows = [0 for _ in self.partial]
        self.writers: list[pq.ParquetWriter] = []
        self.train_dir.mkdir()
        for path in self.partial:
            self.writers.append(pq.ParquetWriter(path, self.schema))

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
        if self.next_row > self.plan.num_rows:
            raise _changed()
        blocks = index // self.plan.block_rows
        split = self.plan.assignment[blocks]
        which = np.where(split == 0, self.plan.part[blocks], self.plan.num_parts + split.astype(np.int64) - 1)
        for output in np.unique(which).tolist():
            chosen = rows[which == output]
            self.pending[output].append(chosen)
            self.pending_rows[output] += len(chosen)
            self.rows[output] += len(chosen)
            if self.pending_rows[output] >= self.group_rows[output]:
                self._flush(output)

    def _flush(self, output: int) -> None:
        if not self.pending[output]:
            return
        rows = np.concatenate(self.pending[output])
        self.pending[output], self.pending_rows[output] = [], 0
        if output < self.plan.num_parts:
            rows = rows[self.rng.permutation(len(rows))]
        size = self.group_rows[output]
        for start in range(0, len(rows), size):
            column = pa.FixedSizeListArray.from_arrays(pa.array(rows[start:start + size].reshape(-1)), self.seq_len)
            self.writers[output].write_table(pa.Table.from_arrays([column], schema=self.schema))

    def commit(self) -> int:
        """Close the files, move them into place; returns the tokens left over (the dropped tail)."""
        if self.next_row != self.plan.num_rows:
            raise _changed()
        for output in range(len(self.partial)):
            self._flush(output)
        for writer in self.writers:
            writer.close()
        os.replace(self.train_dir, self.out / "train")  # claim_output removed the old train/
        for path, final in zip(self.partial[self.plan.num_parts:], self.final[self.plan.num_parts:]):
            os.replace(path, self.out / final)
        return len(self.carry)

    def files(self) -> dict[str, list[dict[str, Any]]]:
        """{split: [{"file": path relative to DIR, "rows": n}, ...]} (for fldd_data.json)."""
        parts = self.plan.num_parts
        listed = [{"file": str(final), "rows": rows} for final, rows in zip(self.final, self.rows)]
        return {"train": listed[:parts], **{name: [entry] for name, entry in zip(SPLITS[1:], listed[parts:])}}

    def split_rows(self) -> dict[str, int]:
        parts = self.plan.num_parts
        return {"train": sum(self.rows[:parts]), **dict(zip(SPLITS[1:], self.rows[parts:]))}

    def abort(self) -> None:
        for writer in self.writers:
            try:
                writer.close()
            except Exception:  # already closed, or broken by the error that brought us here
                pass
        for path in self.partial:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.train_dir, ignore_errors=True)


def _changed() -> DataError:
    return DataError("the input changed while it was being prepared (the second pass found a different number "
                     "of rows); run prepare again")


def _ours(directory: Path) -> list[Path]:
    """What a previous `prepare` wrote in DIR/train: part-NNNNN.parquet files; DataError for anything else
    there (it would join the training data, and it is not ours to delete)."""
    found = list(directory.iterdir())
    foreign = sorted(p.name for p in found if not (p.is_file() and PART_PATTERN.fullmatch(p.name)))
    if foreign:
        raise DataError(f"--out {directory}: holds files `fldd data prepare` did not write ({', '.join(foreign[:5])}"
                        f"{' ...' if len(foreign) > 5 else ''}); prepare writes its train split there: move them "
                        "away, or choose another --out")
    return found


def check_output(out: Path, force: bool) -> None:
    """Refuse a non-empty output directory unless force (checked before any reading); with force,
    refuse a DIR/train that holds anything but the part files a previous `prepare` wrote."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out}: directory is not empty; choose another, or pass --force to overwrite "
                        "the splits there")
    train = out / "train"
    if train.is_dir():
        _ours(train)
    elif train.exists():
        raise DataError(f"--out {out}: {train} exists and is not a directory; prepare writes its train split there")


def claim_output(out: Path) -> None:
    """Create the output directory; remove what a previous `prepare` wrote there (nothing else): the
    splits (train/ with its part files, or train.parquet from older versions), fldd_data.json, and
    the temporary files of an interrupted run."""
    out.mkdir(parents=True, exist_ok=True)
    for name in [f"{s}.parquet" for s in SPLITS] + [f".{s}.parquet.partial" for s in SPLITS] + [DATA_JSON]:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TRAIN_PARTIAL, ignore_errors=True)
    train = out / "train"
    if train.is_dir():
        for path in _ours(train):
            path.unlink()
        train.rmdir()


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
    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> [{"file", "rows"}]
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
        parts = self.files.get("train", [])
        sizes = sorted(part["rows"] for part in parts)
        if len(sizes) == 1:
            train = f"train/{part_name(0)}"
        else:
            spread = f"{sizes[0]:,} rows" if sizes[0] == sizes[-1] else f"{sizes[0]:,} to {sizes[-1]:,} rows"
            train = f"train/ ({len(sizes)} part files of {spread}, each a random sample of the train blocks)"
        lines.append(f"  wrote {train}, {', '.join(f'{s}.parquet' for s in SPLITS[1:])} and {DATA_JSON}")
        return "\n".join(lines)


def _finish(writer: _SplitWriter, result: Prepared) -> Prepared:
    try:
        result.tokens_dropped = writer.commit()
    except BaseException:
        writer.abort()
        raise
    result.rows, result.files = writer.split_rows(), writer.files()
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

def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """64-bit hashes of int64 rows (odd random multipliers, wrapping arithmetic): equal rows hash
    equally; distinct rows collide with probability about 2^-64."""
    multipliers = np.random.default_rng(20240614).integers(1, 2**62, size=rows.shape[1], dtype=np.uint64) * 2 + 1
    with np.errstate(over="ignore"):
        return (rows.astype(np.uint64) * multipliers).sum(axis=1, dtype=np.uint64)


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
    """A report on a token table, found as training finds it (fldd.data.find_splits: a prepared
    directory, a split directory, any other directory of .parquet files, or one file; a local path
    or a URI), streaming over row groups: rows per split and file, sequence length, vocabulary and
    where it came from, codec, the most frequent tokens, held-out rows that copy a train row, and
    decoded example rows. Rows are counted from the start of each file, as training's errors count
    them. A table training would refuse raises DataError (unreadable, missing column, null or
    ragged rows) or lists a problem (tokens outside the vocabulary, disagreeing metadata, ...)."""
    tables = find_splits(path)
    seq_len: int | None = None
    vocab_size, vocab_file = 0, ""
    without_vocab: list[str] = []
    codec: TokenCodec | None = None
    counts: Counter[int] = Counter()
    per_position: list[Counter[int]] = []  # columns codecs: counts per column
    train_hashes: np.ndarray | None = None
    report_tables, duplicates, shown, problems = [], {}, [], []
    for split, files in tables.items():
        rows = groups = copies = 0
        hashes, listed = [], []
        for file in files.paths:
            name = files.name(file)
            parquet = _open(files, file)
            schema = parquet.schema_arrow
            if column not in schema.names:
                raise DataError(f"{name}: column {column!r} is missing (columns: {schema.names})")
            metadata = schema.metadata or {}
            if VOCAB_KEY not in metadata:
                without_vocab.append(name)
            elif not vocab_size:
                vocab_size, vocab_file = int(metadata[VOCAB_KEY]), name
            elif int(metadata[VOCAB_KEY]) != vocab_size:
                problems.append(f"{name} says {VOCAB_KEY.decode()}={int(metadata[VOCAB_KEY])} in its metadata, but "
                                f"{vocab_file} says {vocab_size}: the files of one table must agree (training "
                                "refuses this table)")
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
            batch_rows = (max(1, min(SCAN_BATCH_ROWS, SCAN_TOKENS // max(1, kind.list_size)))
                          if pa.types.is_fixed_size_list(kind) else 4096)
            offset, out_of_range = 0, ""  # rows of this file before the batch; its first token outside the vocabulary
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
                data = batch.column(0)
                if seq_len is None:
                    seq_len = _first_length(data)
                tokens = _validate_column(data, name, column, seq_len or 0, offset)
                if vocab_size and not out_of_range:
                    out_of_range = _outside(tokens, vocab_size, name, column, offset)
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
                    shown.append((split, name, offset + i, tokens[i].tolist()))
                offset += len(tokens)
            if out_of_range:
                problems.append(out_of_range)
            if offset == 0:
                problems.append(f"{name}: no rows (training refuses an empty file)")
            rows += offset
            listed.append({"file": name, "rows": offset})
        if split == "train" and hashes:
            train_hashes = np.unique(np.concatenate(hashes))
        if split in ("valid", "test") and train_hashes is not None:
            duplicates[split] = copies
        if rows == 0:
            problems.append(f"{split}: no rows")
        report_tables.append({"split": split, "files": [entry["file"] for entry in listed], "rows": rows,
                              "row_groups": groups, "file_rows": listed})
    if not counts:
        raise DataError(f"{path}: column {column!r}: the table is empty")
    largest, smallest = max(counts), min(counts)
    if vocab_size:
        vocab_from = f"{VOCAB_KEY.decode()} metadata"
        if without_vocab:
            problems.append(f"only some files carry {VOCAB_KEY.decode()} metadata ({without_vocab[0]} does not; "
                            f"{vocab_file} says {vocab_size})")
        if largest >= vocab_size and not any("is outside [0," in problem for problem in problems):
            problems.append(f"token {largest} is outside [0, {vocab_size}): training would refuse this table")
    else:
        vocab_size, vocab_from = max(largest + 1, 2), (f"largest token + 1: the table has no {VOCAB_KEY.decode()} "
                                                       "metadata (training would assume the same; set "
                                                       "data.vocab_size if wrong)")
        if vocab_size > MAX_INFERRED_VOCAB:
            problems.append(f"the largest token is {largest}: training refuses to infer a vocabulary of "
                            f"{vocab_size:,} (over {MAX_INFERRED_VOCAB:,}) without data.vocab_size")
    if smallest < 0 and not any("is outside [0," in problem for problem in problems):
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
    for split, name, row, tokens in shown:
        entry: dict[str, Any] = {"split": split, "file": name, "row": row, "tokens": tokens}
        if codec is not None:
            try:
                entry["decoded"] = codec.decode(tokens)
            except (IndexError, ValueError):
                entry["decoded"] = None
        report_examples.append(entry)
    prepared = None
    if tables.keys() != {"all"}:
        prepared = _prepared_description(path, problems)
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


def _outside(tokens: np.ndarray, vocab_size: int, name: str, column: str, offset: int) -> str:
    """The first token of a batch outside [0, vocab_size), as a problem naming file, row and column ("" if none)."""
    bad = np.flatnonzero(((tokens < 0) | (tokens >= vocab_size)).any(axis=1))
    if not bad.size:
        return ""
    row = tokens[bad[0]]
    value = int(row[(row < 0) | (row >= vocab_size)][0])
    return (f"{name}: row {offset + int(bad[0])}, column {column!r}: token {value} is outside [0, {vocab_size}): "
            "training would refuse this table")


def _first_length(data: pa.Array) -> int | None:
    """The table's row length, from the first batch with a non-null row (None: not yet known)."""
    if pa.types.is_fixed_size_list(data.type):
        return data.type.list_size
    if not (pa.types.is_list(data.type) or pa.types.is_large_list(data.type)):
        return None  # _validate_column names the wrong type
    valid = np.flatnonzero(np.asarray(data.is_valid()))
    return int(pc.list_value_length(data)[int(valid[0])].as_py()) if valid.size else None


def _prepared_description(path: str | Path, problems: list[str]) -> dict[str, Any] | None:
    """DIR/fldd_data.json of a split directory, if there is one (local or remote)."""
    fs, root, prefix = _filesystem(path)
    where = f"{root}/{DATA_JSON}"
    if fs.get_file_info(where).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(where) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError):
        problems.append(f"{prefix}{where}: unreadable")
        return None


def _common_folder(names: list[str]) -> str:
    common = os.path.commonprefix(names)
    return common[:common.rfind("/") + 1] or "."


def format_inspect(report: dict[str, Any]) -> str:
    """The inspect report for people."""
    lines = [report["path"]]
    prepared = report.get("prepared")
    if prepared:
        lines[0] += (f"  (fldd data prepare: {len(prepared.get('sources', []))} {prepared.get('kind', '?')} file(s), "
                     f"seed {prepared.get('seed')}, {prepared.get('tokens_dropped', 0):,} tokens dropped)")
    width = max(len(t["split"]) for t in report["tables"])
    for table in report["tables"]:
        files = table["files"][0] if len(table["files"]) == 1 else \
            f"{len(table['files'])} files in {_common_folder(table['files'])}"
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
        several = any(t["split"] == entry["split"] and len(t["files"]) > 1 for t in report["tables"])
        where = f" {entry['file'].rsplit('/', 1)[-1]}" if several and entry.get("file") else ""
        lines.append(f"    {entry['split']}{where} row {entry['row']}: {shown}")
    for problem in report["problems"]:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)
