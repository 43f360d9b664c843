"""The token-table format's primitives, shared by fldd.data (reading, validation) and fldd.datasets
(the built-in tables): a module of its own so neither has to import the other."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from torch import Tensor

from fldd.codec import CODEC_KEY, TokenCodec

VOCAB_KEY = b"fldd.vocab_size"


class DataError(ValueError):
    """A token table is malformed; the message names the file, and the row and column if any."""


def token_table(tokens: Tensor | np.ndarray, vocab_size: int, column: str = "tokens",
                codec: TokenCodec | None = None) -> pa.Table:
    """(N, D) integer tokens as an Arrow token table (fixed-size list column + vocabulary metadata,
    and the codec that decodes the tokens, if any)."""
    array = np.asarray(tokens, dtype=np.int64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise DataError(f"tokens must be 2-D (rows, positions >= 1), got shape {array.shape}")
    column_array = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
    metadata = {VOCAB_KEY: str(vocab_size).encode()}
    if codec is not None:
        metadata[CODEC_KEY] = codec.to_json().encode()
    return pa.table({column: column_array}).replace_schema_metadata(metadata)
