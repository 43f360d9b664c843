"""Writing a prepared token table: the split plan, the files, and the description beside them.

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

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fldd.codec import CODEC_KEY, TokenCodec
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


class SplitWriter:
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
    """What `prepare_text` / `prepare_csv` / `prepare_smiles` made (also written as DIR/fldd_data.json)."""

    out: str
    kind: str  # text | csv | smiles
    sources: list[str]
    seq_len: int
    vocab_size: int
    codec: dict[str, Any]
    rows: dict[str, int]
    seed: int
    valid_fraction: float
    test_fraction: float
    block_rows: int
    tokens_total: int  # tokens read (text), cells (csv) or molecules kept (smiles)
    tokens_dropped: int  # text: the tail shorter than seq_len
    vocabulary_from: str  # "corpus", "--alphabet", "bytes", "columns", "smiles"
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
                "columns": "one vocabulary per column",
                "smiles": "the sorted set of SMILES tokens found, after the padding"}[self.vocabulary_from]
        read = (f"{self.tokens_total:,} {'bytes' if codec.kind == 'bytes' else 'characters'}" if self.kind == "text"
                else f"{sum(self.rows.values()):,} {'molecules' if self.kind == 'smiles' else 'records'}")
        lines = [f"prepared {len(self.sources)} {self.kind} file(s) ({read}) into {self.out}"]
        if codec.kind == "chars":
            shown = repr(codec.alphabet) if len(codec.alphabet) <= 120 else repr(codec.alphabet[:120]) + " ..."
            lines.append(f"  codec chars: {codec.vocab_size} symbols, {what}: {shown}")
        elif codec.kind == "bytes":
            lines.append(f"  codec bytes: vocabulary 256, {what}")
        elif codec.kind == "smiles":
            lines.append(f"  codec smiles: {codec.vocab_size} symbols, {what}: {' '.join(codec.symbols[1:])}")
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


def finish(writer: SplitWriter, result: Prepared) -> Prepared:
    try:
        result.tokens_dropped = writer.commit()
    except BaseException:
        writer.abort()
        raise
    result.rows, result.files = writer.split_rows(), writer.files()
    out = Path(result.out)
    (out / DATA_JSON).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return result


def write_all(writer: SplitWriter, feed: Iterator[None]) -> None:
    try:
        for _ in feed:
            pass
    except BaseException:
        writer.abort()
        raise

