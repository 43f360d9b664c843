"""A streaming report on a token table (`fldd data inspect`): its shape, vocabulary and codec, the
token frequencies per position, duplicated rows within and across splits, and the problems found.
Formatted for the terminal by `commands/formatting.py:format_inspect`. pyarrow and numpy only.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from fldd.codec import CODEC_KEY, CodecError, TokenCodec, codec_from_metadata
from fldd.data import MAX_INFERRED_VOCAB, SCAN_BATCH_ROWS, _filesystem, _open, _validate_column, find_splits
from fldd.split_writer import DATA_JSON
from fldd.token_table import VOCAB_KEY, DataError


SCAN_TOKENS = 1 << 20  # tokens per record batch when inspect streams over a table


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
    if codec.kind == "smiles":
        return (codec.symbols[token] or "<pad>") if 0 <= token < len(codec.symbols) else None
    shown = [f"{name}={category_label(cats[token])}" for name, cats in zip(codec.columns, codec.categories)
             if token < len(cats)]
    return " | ".join(shown[:3]) + (f" | ... ({len(shown)} columns)" if len(shown) > 3 else "")


def category_label(value: str) -> str:
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
