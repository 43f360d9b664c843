"""Built-in data sets that need no network (EVALUATION.md), produced as Arrow token tables.

- toy2d: D=2, K=50; pmf on {0..49}^2 proportional to an equal mixture of two isotropic Gaussians
  (means (12,12) and (37,37), std 4), normalised over the grid. Rows are sampled with data.seed.
- mixture8: the same idea at K=8 (means (1.5,1.5), (5.5,5.5), std 1), for fast tests.
- digits / digits-binary: scikit-learn's load_digits (ships in the package), 8x8 images, D=64;
  levels 0..16 (K=17) or pixel >= 8 (K=2). Fixed split with seed 0: 1500 train / 297 test; the
  last 150 of the train part are the validation split (selection never looks at test). Held-out
  images that are exact copies of an image of an earlier split are dropped (binary: 6 of 150
  validation and 13 of 297 test images), so a copy rate or NELBO never rewards memorisation.
- text: CPython 3.11.7's pydoc_data.topics, pinned in fldd/assets with a checksum (other Python
  versions ship other topics), lowercased, every character outside a-z mapped to a space and
  runs of spaces collapsed (27 symbols, text8-style); non-overlapping length-64 chunks; the first
  90% train, the last 10% test; the last 10% of the train part is the validation split
  (contiguous: no chunk's neighbours leak across splits).
- moses: the MOSES benchmark's molecules (a cleaned ZINC subset) from the molsets wheel (the
  `molecules` extra): SMILES tokens (fldd.molecules), D=54 (the longest molecule of train and
  test, padded at the end), K=25 (padding + 24 tokens). The splits are fixed (seed 0, whatever
  data.seed): validation is data.num_valid molecules drawn from MOSES's train file, train is the
  next data.num_train of the same permutation (at most the rest, 1,584,663 - num_valid), and
  test is data.num_valid molecules drawn from MOSES's test file (176,074).
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from fldd.codec import TokenCodec
from fldd.config import DataConfig
from fldd.molecules import encode_molecules, moses_smiles  # the MOSES files are read only when asked for
from fldd.token_table import DataError, token_table

SPLITS = ("train", "valid", "test")
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyz "  # token i is TEXT_ALPHABET[i]; space is 26
TEXT_CHUNK = 64


MOSES_SEQ_LEN = 54
# padding, then the 24 tokens of MOSES's train and test files, sorted
MOSES_SYMBOLS = ("", "#", "(", ")", "-", "1", "2", "3", "4", "5", "6", "=", "Br", "C", "Cl", "F", "N", "O", "S",
                 "[H]", "[nH]", "c", "n", "o", "s")


@dataclass(frozen=True)
class Builtin:
    seq_len: int
    vocab_size: int
    splits: Callable[[DataConfig], dict[str, np.ndarray]]
    pmf: Callable[[], Tensor] | None = None  # exact data pmf over the K^D grid, where known


def gaussian_mixture_pmf(vocab_size: int, means: list[tuple[float, float]], std: float) -> Tensor:
    """(K*K,) float64 pmf of an equal mixture of isotropic 2-D Gaussians on the K x K grid,
    indexed as a * K + b for the sequence (a, b)."""
    grid = torch.arange(vocab_size, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    density = sum(torch.exp(-((a - ma) ** 2 + (b - mb) ** 2) / (2 * std ** 2)) for ma, mb in means)
    return (density / density.sum()).flatten()


def toy2d_pmf() -> Tensor:
    return gaussian_mixture_pmf(50, [(12, 12), (37, 37)], 4.0)


def mixture8_pmf() -> Tensor:
    return gaussian_mixture_pmf(8, [(1.5, 1.5), (5.5, 5.5)], 1.0)


def _pmf_splits(pmf: Callable[[], Tensor], vocab_size: int) -> Callable[[DataConfig], dict[str, np.ndarray]]:
    def draw(count: int, seed: int) -> np.ndarray:
        index = torch.multinomial(pmf(), count, replacement=True, generator=torch.Generator().manual_seed(seed))
        return torch.stack([index // vocab_size, index % vocab_size], dim=1).numpy()

    def splits(d: DataConfig) -> dict[str, np.ndarray]:
        train_valid = draw(d.num_train + d.num_valid, d.seed)
        test = draw(d.num_valid, d.seed + 1_000_003)  # an independent draw
        return {"train": train_valid[:d.num_train], "valid": train_valid[d.num_train:], "test": test}
    return splits


@lru_cache(maxsize=1)
def _digit_images() -> np.ndarray:
    from sklearn.datasets import load_digits  # lazy: start-up time (scikit-learn); data inside it: no download

    images = load_digits().data.astype(np.int64)  # (1797, 64), levels 0..16
    order = np.random.default_rng(0).permutation(len(images))
    return images[order]


def drop_copies(rows: np.ndarray, *earlier: np.ndarray) -> np.ndarray:
    """The rows that are not exact copies of a row of an earlier split: a held-out image that is also
    a training image would make the NELBO and the copy rate reward memorisation."""
    seen = {row.tobytes() for split in earlier for row in split}
    return rows[np.array([row.tobytes() not in seen for row in rows], dtype=bool)]


def _digits_splits(binary: bool) -> Callable[[DataConfig], dict[str, np.ndarray]]:
    def splits(d: DataConfig) -> dict[str, np.ndarray]:
        images = _digit_images()
        images = (images >= 8).astype(np.int64) if binary else images
        train = images[:1350]
        valid = drop_copies(images[1350:1500], train)
        return {"train": train, "valid": valid, "test": drop_copies(images[1500:], train, valid)}
    return splits


def text_to_tokens(text: str) -> np.ndarray:
    cleaned = re.sub(r" +", " ", re.sub(r"[^a-z]", " ", text.lower()))
    lookup = np.full(128, 26, dtype=np.int64)
    for i, ch in enumerate(TEXT_ALPHABET):
        lookup[ord(ch)] = i
    return lookup[np.frombuffer(cleaned.encode("ascii"), dtype=np.uint8)]


def tokens_to_text(tokens: Tensor | np.ndarray) -> list[str]:
    return ["".join(TEXT_ALPHABET[int(t)] for t in row) for row in np.asarray(tokens)]


# The text corpus, pinned: CPython 3.11.7's pydoc_data.topics, cleaned by text_to_tokens' rules, so
# the splits do not depend on the interpreter that runs them (other versions ship other topics)
TEXT_ASSET = Path(__file__).parent / "assets" / "text_pydoc_topics_py311.txt.gz"
TEXT_SHA256 = "f14846aa5a5a7cc838c420bbb655c120c42279ee6bb4160de3d8664d9118ea7d"


@lru_cache(maxsize=1)
def _text_chunks() -> np.ndarray:
    text = gzip.decompress(TEXT_ASSET.read_bytes())
    if hashlib.sha256(text).hexdigest() != TEXT_SHA256:
        raise DataError(f"{TEXT_ASSET}: checksum mismatch; the packaged text corpus was modified or truncated")
    tokens = text_to_tokens(text.decode("ascii"))
    usable = len(tokens) // TEXT_CHUNK * TEXT_CHUNK
    return tokens[:usable].reshape(-1, TEXT_CHUNK)


def _text_splits(d: DataConfig) -> dict[str, np.ndarray]:
    chunks = _text_chunks()
    train_end = int(0.9 * len(chunks))
    valid_start = int(0.9 * train_end)
    return {"train": chunks[:valid_start], "valid": chunks[valid_start:train_end], "test": chunks[train_end:]}


def _moses_splits(d: DataConfig) -> dict[str, np.ndarray]:
    return _moses_splits_sized(d.num_train, d.num_valid)


@lru_cache(maxsize=2)
def _moses_splits_sized(num_train: int, num_valid: int) -> dict[str, np.ndarray]:
    def drawn(split: str, start: int, count: int) -> np.ndarray:
        molecules = moses_smiles(split)
        order = np.random.default_rng(0).permutation(len(molecules))[start:start + count]
        return encode_molecules([molecules[i] for i in order], MOSES_SYMBOLS, MOSES_SEQ_LEN)

    return {"valid": drawn("train", 0, num_valid), "train": drawn("train", num_valid, num_train),
            "test": drawn("test", 0, num_valid)}


BUILTINS: dict[str, Builtin] = {
    "toy2d": Builtin(2, 50, _pmf_splits(toy2d_pmf, 50), toy2d_pmf),
    "mixture8": Builtin(2, 8, _pmf_splits(mixture8_pmf, 8), mixture8_pmf),
    "digits": Builtin(64, 17, _digits_splits(binary=False)),
    "digits-binary": Builtin(64, 2, _digits_splits(binary=True)),
    "text": Builtin(TEXT_CHUNK, 27, _text_splits),
    "moses": Builtin(MOSES_SEQ_LEN, len(MOSES_SYMBOLS), _moses_splits),
}


def builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise DataError(f"data.name={name!r}: unknown built-in data set; expected one of {sorted(BUILTINS)} "
                        "(or set data.path to a Parquet token table)")
    return BUILTINS[name]


def builtin_table(d: DataConfig, split: str) -> pa.Table:
    if split not in SPLITS:
        raise DataError(f"split={split!r}: expected one of {SPLITS}")
    spec = builtin(d.name)
    return token_table(spec.splits(d)[split], spec.vocab_size, codec=builtin_codec(d.name))


def builtin_codec(name: str) -> TokenCodec | None:
    """How a built-in data set's tokens decode: the text as characters, moses as SMILES."""
    if name == "text":
        return TokenCodec("chars", TEXT_ALPHABET)
    return TokenCodec("smiles", symbols=MOSES_SYMBOLS) if name == "moses" else None


def data_pmf(name: str) -> Tensor | None:
    """The exact pmf of a built-in 2-D toy (None for data sets without one)."""
    spec = builtin(name)
    return spec.pmf() if spec.pmf is not None else None
