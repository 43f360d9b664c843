"""`fldd data prepare` and `fldd data inspect`: text, SMILES or CSV files become token tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from commands.formatting import format_inspect
from fldd.data import DataError
from fldd.inspection import inspect_data
from fldd.prepare import INVALID_CHOICES, prepare_csv, prepare_smiles, prepare_text


# which input kind each `fldd data prepare` option belongs to
FLAG_SOURCE = {"--seq-len": "--text", "--alphabet": "--text", "--bytes": "--text", "--unknown": "--text",
               "--lowercase": "--text", "--columns": "--csv", "--column": "--smiles", "--invalid": "--smiles"}


def cmd_data_prepare(args: argparse.Namespace) -> int:
    common = {"valid_fraction": args.valid_fraction, "test_fraction": args.test_fraction, "seed": args.seed,
              "force": args.force}
    flags = {"--seq-len": args.seq_len is not None, "--alphabet": args.alphabet is not None, "--bytes": args.bytes,
             "--unknown": args.unknown is not None, "--lowercase": args.lowercase, "--columns": bool(args.columns),
             "--column": args.column is not None, "--invalid": args.invalid is not None}
    source = "--smiles" if args.smiles else "--csv" if args.csv else "--text"
    wrong = [f"{flag}: for {FLAG_SOURCE[flag]} only" for flag, on in flags.items() if on and FLAG_SOURCE[flag] != source]
    if wrong:
        raise DataError("; ".join(wrong))
    if args.smiles:
        result = prepare_smiles(args.smiles, args.out, column=args.column, invalid=args.invalid or "refuse", **common)
    elif args.csv:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        result = prepare_csv(args.csv, columns, args.out, **common)
    else:
        result = prepare_text(args.text, args.out, seq_len=64 if args.seq_len is None else args.seq_len,
                              alphabet=args.alphabet, use_bytes=args.bytes, unknown=args.unknown,
                              lowercase=args.lowercase, **common)
    print(result.summary())
    where = Path(result.out).resolve()
    preset = "moses" if args.smiles else "text"
    print(f"next:\n  fldd data inspect {where}\n  fldd train --config {preset} --set data.path={where}"
          "   # seq_len, vocab_size and codec come from the table")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Exit 0: a sound table; 1: problems found (listed); 2: unreadable."""
    report = inspect_data(args.path, column=args.column, top=args.top)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_inspect(report))
    return 1 if report["problems"] else 0


DATA_PREPARE_HELP = """\
Turn text files or a categorical CSV table into a token table that `fldd train` reads as is:
DIR/train/part-*.parquet (blocks of rows dealt at random, with --seed, to parts of about 50k
rows each, at most 64 parts; rows shuffled within each row group: training streams them),
DIR/valid.parquet and DIR/test.parquet (column "tokens", fixed-length lists of int64, schema
metadata fldd.vocab_size and fldd.codec), and DIR/fldd_data.json describing them.

text: the files (in the order given; globs are expanded, '**' recurses) are read as one stream
and cut into non-overlapping rows of --seq-len tokens; the tail shorter than that is dropped
(and reported). Tokens are characters (UTF-8, line endings read as \\n) over an alphabet - by
default the sorted set of characters found in the corpus; with --alphabet, a character outside it
is an error naming file, line and column, unless --unknown CHAR maps such characters to CHAR -
or bytes (--bytes: vocabulary 256, any encoding).

smiles: one molecule per row (a .csv's SMILES column, named with --column if it is not called
SMILES; or .txt / .smi files, one SMILES per line; .gz too), as atom-level SMILES tokens (bracket
atoms, Cl / Br and %nn ring bonds are one token each), padded at the end to the longest
molecule. RDKit must parse each SMILES (the molecules extra: pip install 'fldd[molecules]'): one
it cannot is refused with its file and line, or left out and counted with --invalid skip.

csv: one row per record, one token per --columns entry (position j = column j). Each column's
vocabulary is its sorted distinct values as strings (an empty cell is the category ""); token ids
start at 0 in every column; vocab_size is the largest column's.

splits: blocks of up to 32 consecutive rows (fewer for small data) go whole to train, valid or
test, drawn with --seed, so neighbouring rows rarely straddle two splits. Every split must be
non-empty. The input is read twice, a block at a time: memory does not grow with the corpus."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The data command and its prepare and inspect subcommands."""
    p = sub.add_parser("data", help="prepare text, SMILES or CSV files as token tables, and inspect token tables",
                       description="Prepare text, SMILES or categorical CSV files as token tables (train/valid/test "
                       "with a codec that decodes samples back to text, SMILES or table rows), and inspect token "
                       "tables.")
    data = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,inspect}")

    q = data.add_parser(
        "prepare", help="text, SMILES or CSV files -> DIR/train/part-*.parquet, valid.parquet, test.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=DATA_PREPARE_HELP,
        epilog="exit status: 0 written, 2 bad input (one line naming the problem).\n"
        "examples:\n  fldd data prepare --text 'corpus/**/*.txt' --out data/corpus --seq-len 128\n"
        "  fldd data prepare --text notes.md --out data/notes --alphabet 'abcdefghijklmnopqrstuvwxyz .' "
        "--lowercase --unknown ' '\n"
        "  fldd data prepare --text dump.bin --bytes --out data/bytes\n"
        "  fldd data prepare --csv survey.csv --columns age_band,region,answer --out data/survey\n"
        "  fldd data prepare --smiles molecules.csv.gz --column smiles --invalid skip --out data/molecules\n"
        "then: fldd data inspect data/corpus; fldd train --config text --set data.path=$PWD/data/corpus")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", metavar="FILE_OR_GLOB", help="text files (quote globs)")
    source.add_argument("--csv", nargs="+", metavar="FILE_OR_GLOB",
                        help="CSV file(s) with a header row (several files need the chosen columns)")
    source.add_argument("--smiles", nargs="+", metavar="FILE_OR_GLOB",
                        help="SMILES: .csv (with a SMILES column), .txt or .smi (one per line); .gz too")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty, else --force)")
    q.add_argument("--column", metavar="NAME", help="--smiles with a .csv: the SMILES column (default: the one "
                   "called SMILES or smiles)")
    q.add_argument("--invalid", choices=INVALID_CHOICES, help="--smiles: a SMILES RDKit cannot parse is refused "
                   "with its line number (refuse, the default) or left out and counted (skip)")
    q.add_argument("--columns", metavar="A,B,C", help="--csv: the columns to keep, in order (comma-separated)")
    q.add_argument("--seq-len", type=int, metavar="N", help="--text: tokens per row (default 64)")
    vocabulary = q.add_mutually_exclusive_group()
    vocabulary.add_argument("--alphabet", metavar="CHARS", help="--text: the characters, token i = CHARS[i] "
                            "(in bash, $'...' writes a newline as \\n); default: those found in the corpus")
    vocabulary.add_argument("--bytes", action="store_true", help="--text: byte-level tokens (vocabulary 256)")
    q.add_argument("--unknown", metavar="CHAR", help="--text with --alphabet: map characters outside the alphabet "
                   "to CHAR (one of the alphabet) instead of stopping with an error")
    q.add_argument("--lowercase", action="store_true", help="--text: lowercase the text first")
    q.add_argument("--valid-fraction", type=float, default=0.05, metavar="F",
                   help="share of rows held out for validation (default 0.05)")
    q.add_argument("--test-fraction", type=float, default=0.05, metavar="F",
                   help="share of rows held out for the final test (default 0.05)")
    q.add_argument("--seed", type=int, default=0, metavar="S", help="which blocks go to which split and train part, and the row order in a "
                   "row group (default 0)")
    q.add_argument("--force", action="store_true", help="write into a non-empty DIR (replacing the splits and "
                   "fldd_data.json there; other files are left alone)")
    q.set_defaults(func=cmd_data_prepare)

    q = data.add_parser(
        "inspect", help="rows per split, shape, vocabulary, codec, token histogram, copies across splits, examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Report on a token table: a prepared directory, any directory with train/valid/test splits\n"
        "(split.parquet files or split/ directories), any other directory of .parquet files, or one file.\n"
        "Rows per split, sequence length, vocabulary size and where it comes from (the fldd.vocab_size\n"
        "metadata, else the largest token + 1), the codec, the most frequent tokens (decoded where a\n"
        "codec exists), how many valid/test rows are exact copies of a train row (64-bit row hashes), and\n"
        "decoded example rows. Streams over row groups: memory grows only with the train rows' hashes.",
        epilog="exit status: 0 no problems, 1 problems found (listed as `problem:`), 2 unreadable table.")
    q.add_argument("path", metavar="DIR_OR_FILE")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--column", default="tokens", help="the token column (default tokens)")
    q.add_argument("--top", type=int, default=10, metavar="N", help="tokens in the histogram (default 10)")
    q.set_defaults(func=cmd_data_inspect)
    for command in data.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show INFO logs")
