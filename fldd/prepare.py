"""Text and CSV files as token tables (`fldd data prepare`). pyarrow and numpy only.

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

SMILES (`prepare_smiles`): one molecule per row, as SMILES tokens (fldd.molecules), padded at the
end to the longest molecule; the vocabulary is the sorted set of tokens found, after the padding.
Each SMILES is parsed by RDKit first: one it cannot parse is refused with its file and line, or
skipped and counted (`invalid="skip"`). Read twice, like the others, one record at a time.

The splits and the files they are written to: `fldd/split_writer.py`. The report on a table
(`fldd data inspect`): `fldd/inspection.py`.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fldd.codec import TokenCodec
from fldd.molecules import SmilesError, canonical, read_smiles, tokenize_smiles
from fldd.split_writer import (Prepared, SplitWriter, check_fractions, check_output, claim_output, finish,
                                plan_splits, write_all)
from fldd.token_table import DataError


READ_CHARS = 1 << 20  # characters (or bytes) read at a time
CSV_BLOCK_BYTES = 1 << 22
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
    writer = SplitWriter(out, seq_len, codec, plan)

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

    write_all(writer, feed())
    return finish(writer, result)


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
    writer = SplitWriter(out, len(columns), codec, plan)

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

    write_all(writer, feed())
    return finish(writer, result)




# ---------------------------------------------------------------------------------------------
# SMILES
# ---------------------------------------------------------------------------------------------

INVALID_CHOICES = ("refuse", "skip")


def prepare_smiles(inputs: Sequence[str], out: str | Path, *, column: str | None = None, invalid: str = "refuse",
                   valid_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                   force: bool = False) -> Prepared:
    """SMILES files (.csv with a SMILES column, or .txt / .smi with one per line; .gz too) ->
    DIR/{train,valid,test}.parquet + fldd_data.json, one molecule per row (see the module docstring)."""
    if invalid not in INVALID_CHOICES:
        raise DataError(f"--invalid {invalid!r}: expected one of {INVALID_CHOICES}")
    check_fractions(valid_fraction, test_fraction)
    files = expand_inputs(inputs)
    out = Path(out)
    check_output(out, force)

    def records() -> Iterator[tuple[Path, int, str]]:
        for file in files:
            try:
                for line, smiles in read_smiles(file, column):
                    yield file, line, smiles
            except SmilesError as error:
                raise DataError(str(error)) from None

    # pass 1: the vocabulary, the longest molecule, the lines left out (RDKit cannot parse them, or
    # a character is no SMILES token: RDKit reads "C C" as CC named C, for one)
    symbols: set[str] = set()
    longest, count, skipped = 0, 0, set()
    for file, line, smiles in records():
        try:
            tokens = tokenize_smiles(smiles)
            problem = None if canonical(smiles) is not None else f"{smiles!r} is not a molecule RDKit can parse"
        except SmilesError as error:
            problem = str(error)
        if problem is not None:
            if invalid == "refuse":
                raise DataError(f"{file}:{line}: {problem}; fix or remove it, or pass --invalid skip to leave "
                                "such lines out")
            skipped.add((file, line))
            continue
        symbols.update(tokens)
        longest = max(longest, len(tokens))
        count += 1
    if count == 0:
        what = f"no valid SMILES ({len(skipped)} left out)" if skipped else "no SMILES"
        raise DataError(f"{', '.join(map(str, files))}: {what}" + (f" in column {column!r}" if column else ""))
    codec = TokenCodec("smiles", symbols=("",) + tuple(sorted(symbols)))
    first = ", ".join(f"{file}:{line}" for file, line in sorted(skipped, key=lambda fl: (files.index(fl[0]), fl[1]))[:5])
    notes = [f"left out {len(skipped):,} SMILES (RDKit cannot parse them, or not SMILES tokens; first: {first})"] \
        if skipped else []

    plan = plan_splits(count, valid_fraction, test_fraction, seed)
    result = Prepared(str(out), "smiles", [str(f) for f in files], longest, codec.vocab_size, codec.to_dict(), {},
                      seed, valid_fraction, test_fraction, plan.block_rows, count, 0, "smiles", notes=notes)
    claim_output(out)
    writer = SplitWriter(out, longest, codec, plan)
    index = {symbol: i for i, symbol in enumerate(codec.symbols)}

    def feed() -> Iterator[None]:  # pass 2: tokens, a block of rows at a time (pass 1 did the checking)
        rows: list[list[int]] = []
        for file, line, smiles in records():
            if (file, line) in skipped:
                continue
            try:
                tokens = tokenize_smiles(smiles)
            except SmilesError:
                tokens = [None]  # pass 1 tokenized it: the file changed in between
            if any(t not in index for t in tokens) or len(tokens) > longest:
                raise DataError("the input changed while it was being prepared; run prepare again")
            rows.append([index[t] for t in tokens] + [0] * (longest - len(tokens)))
            if len(rows) == 4096:
                writer.add_rows(np.array(rows, dtype=np.int64))
                rows = []
                yield
        if rows:
            writer.add_rows(np.array(rows, dtype=np.int64))
        yield

    write_all(writer, feed())
    return finish(writer, result)
