"""Molecules as token sequences: SMILES tokens, SMILES files, the MOSES data, and the chemistry scores.

SMILES tokens: the usual atom-level regex (bracket atoms such as [nH] or [C@@H] are one token, as
are two-letter elements Cl / Br and two-digit ring bonds %nn); a molecule's tokens join back to
its SMILES exactly. A token table of molecules has one molecule per row, padded at the end to the
longest molecule with the padding symbol (the empty string, token 0 of the `smiles` codec), so a
decoded sample is the join of its tokens. A generated sample with a token after padding is no
molecule the data could hold: the scores count it invalid (and report how often it happens).

The scores use packages nobody here wrote, from the optional `molecules` extra: RDKit (validity,
canonical SMILES for uniqueness, novelty and copies) and `fcd` (Frechet ChemNet Distance, with the
ChemNet weights shipped in its wheel). MOSES's SMILES files are read from the `molsets` wheel's
data files, without importing its code (its pinned dependencies do not install on current Python).
Where one is missing, the error says what to install.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

# bracket atoms | two-letter halogens | organic-subset atoms | bonds, branches, ring bonds (%nn first)
SMILES_TOKEN = re.compile(r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$"
                          r"|%[0-9]{2}|[0-9])")
EXTRA_HINT = "pip install 'fldd[molecules]'"
MOSES_HINT = "pip install --no-deps molsets==0.3.1"  # --no-deps: its pinned pomegranate does not build


class SmilesError(ValueError):
    """A string that is not tokenizable SMILES, or a SMILES file that cannot be read."""


class MissingExtra(ImportError):
    """A package of the optional `molecules` extra is not installed; the message says how to install it."""


def tokenize_smiles(smiles: str) -> list[str]:
    """Atom-level tokens whose join is `smiles`; SmilesError names the first character no token covers."""
    tokens = SMILES_TOKEN.findall(smiles)
    if sum(map(len, tokens)) != len(smiles):
        position = 0  # the end of the run of tokens that covers the string from its start
        for match in SMILES_TOKEN.finditer(smiles):
            if match.start() != position:
                break
            position = match.end()
        raise SmilesError(f"{smiles!r}: character {smiles[position]!r} at position {position + 1} is not a SMILES token")
    return tokens


# ---------------------------------------------------------------------------------------------
# Reading SMILES files
# ---------------------------------------------------------------------------------------------

def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (as spreadsheet exports write) is not part of the first column's name
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def is_csv(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".csv")


def read_smiles(path: Path, column: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, SMILES) of each record of a .csv (the `column`, by default SMILES / smiles) or a
    .txt / .smi file (the first whitespace-separated field of each non-blank line; a first line
    reading just "smiles" is a header), optionally gzipped."""
    try:
        with _open_text(path) as handle:
            if is_csv(path):
                reader = csv.reader(handle)
                header = next(reader, None)
                if not header:
                    raise SmilesError(f"{path}: empty file: no header row")
                if column is None:
                    column = next((c for c in header if c.lower() == "smiles"), None)
                    if column is None:
                        raise SmilesError(f"{path}: no SMILES column; name it with --column (the columns are {header})")
                if column not in header:
                    raise SmilesError(f"{path}: no column {column!r}; the columns are {header}")
                index = header.index(column)
                for record in reader:
                    if len(record) > index and record[index].strip():
                        yield reader.line_num, record[index].strip()
                return
            if column is not None:
                raise SmilesError(f"{path}: --column is for CSV files; a .txt / .smi file holds one SMILES per line")
            for number, line in enumerate(handle, start=1):
                fields = line.split()
                if fields and not (number == 1 and fields[0].lower() == "smiles"):
                    yield number, fields[0]
    except UnicodeDecodeError as error:
        raise SmilesError(f"{path}: not UTF-8 text ({error.reason})") from None
    except (OSError, EOFError, csv.Error) as error:  # gzip.BadGzipFile is an OSError
        raise SmilesError(f"{path}: cannot read it ({error})") from None


# ---------------------------------------------------------------------------------------------
# RDKit and MOSES, from the optional extra
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def rdkit_chem():  # -> the rdkit.Chem module
    try:
        from rdkit import Chem, RDLogger  # lazy: the optional molecules extra
    except ImportError:
        raise MissingExtra(f"molecule validity needs RDKit: {EXTRA_HINT}") from None
    RDLogger.DisableLog("rdApp.*")  # one line on stderr per unparseable sample otherwise
    return Chem


@lru_cache(maxsize=1)
def fcd_module():  # -> the fcd package
    try:
        import fcd  # lazy: the optional molecules extra (and torch models loaded only when scoring)
    except ImportError:
        raise MissingExtra(f"the Frechet ChemNet Distance needs the fcd package: {EXTRA_HINT}") from None
    return fcd


def require_molecule_scorers() -> None:
    """MissingExtra, naming what to install, unless RDKit and fcd both import (before a long run
    whose final report scores molecules)."""
    rdkit_chem()
    fcd_module()


def canonical(smiles: str) -> str | None:
    """RDKit's canonical SMILES, or None for a string that is not a molecule (empty included)."""
    if not smiles:
        return None
    chem = rdkit_chem()
    molecule = chem.MolFromSmiles(smiles)
    return None if molecule is None else chem.MolToSmiles(molecule)


@lru_cache(maxsize=1)
def canonical_set(smiles: tuple[str, ...]) -> frozenset[str]:
    """Canonical forms of the valid molecules among `smiles` (cached: a train split is scored often)."""
    return frozenset(c for c in map(canonical, smiles) if c is not None)


def moses_file(name: str) -> Path:
    """A data file of the molsets wheel (train.csv.gz, test.csv.gz, test_scaffolds.csv.gz)."""
    try:
        listed = importlib.metadata.files("molsets") or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtra(f"the moses data set ships in the molsets wheel: {MOSES_HINT}") from None
    for entry in listed:
        if str(entry) == f"moses/dataset/data/{name}":
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise MissingExtra(f"molsets is installed without moses/dataset/data/{name}: reinstall it ({MOSES_HINT})")


@lru_cache(maxsize=2)
def moses_smiles(split: str) -> tuple[str, ...]:
    """MOSES's `train` or `test` SMILES, in file order."""
    with gzip.open(moses_file(f"{split}.csv.gz"), "rt", encoding="ascii") as handle:
        lines = handle.read().splitlines()
    if not lines or lines[0].split(",")[0] != "SMILES":
        raise SmilesError(f"moses {split}.csv.gz: expected a SMILES header, got {lines[:1]}")
    return tuple(line.split(",")[0] for line in lines[1:])


def encode_molecules(smiles: Sequence[str], symbols: Sequence[str], seq_len: int) -> np.ndarray:
    """(N, seq_len) token ids, each molecule padded with token 0; SmilesError for a molecule with a
    token outside `symbols` or longer than seq_len."""
    index = {symbol: i for i, symbol in enumerate(symbols)}
    rows = np.zeros((len(smiles), seq_len), dtype=np.int64)
    for r, molecule in enumerate(smiles):
        tokens = tokenize_smiles(molecule)
        if len(tokens) > seq_len:
            raise SmilesError(f"{molecule!r}: {len(tokens)} tokens, more than {seq_len}")
        try:
            rows[r, :len(tokens)] = [index[t] for t in tokens]
        except KeyError as error:
            raise SmilesError(f"{molecule!r}: token {error.args[0]!r} is not in the vocabulary") from None
    return rows


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

def chemnet_features(smiles: Sequence[str]) -> np.ndarray:
    """(N, 512) ChemNet activations (the `fcd` package's reference model and preprocessing)."""
    fcd = fcd_module()
    return fcd.get_predictions(fcd.load_ref_model(), list(smiles), n_jobs=0)  # n_jobs=0: no loader process


def chemnet_statistics(smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the ChemNet activations of a set of molecules (float64)."""
    features = chemnet_features(smiles).astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def reference_statistics(smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """chemnet_statistics of the canonical forms of the valid molecules of a reference set (as
    MOSES does): ChemNet reads strings, so one spelling of a molecule must stand for it."""
    forms = [c for c in map(canonical, smiles) if c is not None]
    if len(forms) < 2:
        raise ValueError(f"a reference set needs at least 2 valid molecules, got {len(forms)}")
    return chemnet_statistics(forms)


def frechet_chemnet_distance(smiles: Sequence[str], reference: tuple[np.ndarray, np.ndarray]) -> float:
    """Frechet distance between the ChemNet statistics of `smiles` (as given) and `reference`."""
    mu, sigma = chemnet_statistics(smiles)
    return float(fcd_module().calculate_frechet_distance(mu1=mu, sigma1=sigma, mu2=reference[0], sigma2=reference[1]))


def molecule_metrics(samples: Sequence[str | None], train: Iterable[str],
                     reference: tuple[np.ndarray, np.ndarray] | None) -> dict[str, float]:
    """MOSES-style scores of generated SMILES (None: a sample known to be invalid):
    - validity: the fraction RDKit parses (an empty sample is invalid);
    - uniqueness: distinct canonical molecules among the valid ones, over the valid ones (over all
      valid samples, not MOSES's unique@1000 / unique@10000);
    - novelty: the distinct valid molecules not in `train` (canonically), over the distinct valid ones;
    - copy_rate: the fraction of all samples that are a training molecule;
    - fcd: Frechet ChemNet Distance of the canonical forms of the valid samples to `reference`
      (reference_statistics of a held-out split), and fcd_molecules, how many it was computed on
      (a Frechet distance of a few molecules is large whatever they are: compare FCDs at equal
      counts); NaN with fewer than 2 valid samples; both absent without a reference.
    uniqueness and novelty are NaN without a valid sample (nothing to measure, not 0)."""
    if not samples:
        raise ValueError("no samples to score")
    forms = [canonical(s) if s is not None else None for s in samples]
    valid = [f for f in forms if f is not None]
    distinct = set(valid)
    known = canonical_set(tuple(train))
    nan = float("nan")
    metrics = {"validity": len(valid) / len(samples),
               "uniqueness": len(distinct) / len(valid) if valid else nan,
               "novelty": len(distinct - known) / len(distinct) if distinct else nan,
               "copy_rate": sum(f in known for f in valid) / len(samples)}
    if reference is not None:
        metrics["fcd"] = frechet_chemnet_distance(valid, reference) if len(valid) > 1 else nan
        metrics["fcd_molecules"] = float(len(valid))
    return metrics


def score_token_samples(samples: np.ndarray, train: np.ndarray, held_out: np.ndarray,
                        symbols: Sequence[str]) -> dict[str, float]:
    """molecule_metrics of token rows (N, D) of a smiles codec's `symbols` (token 0 the padding):
    a sample with a token after padding counts as invalid, and `interior_padding` is their
    fraction; novelty and copies against the `train` rows, FCD against the `held_out` rows."""
    samples, train, held_out = (np.asarray(rows) for rows in (samples, train, held_out))
    table = np.array(symbols, dtype=object)
    join = lambda rows: ["".join(table[row]) for row in rows]  # noqa: E731  (padding is "")
    padded = samples == 0
    interior = (padded[:, :-1] & ~padded[:, 1:]).any(axis=1)  # a pad followed by a token
    decoded = [None if bad else text for bad, text in zip(interior.tolist(), join(samples))]
    scores = molecule_metrics(decoded, join(train), reference_statistics(join(held_out)))
    return {**scores, "interior_padding": float(interior.mean())}
