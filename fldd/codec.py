"""How token ids read back as data: characters, bytes, or the categories of a table's columns.

A token table written by `fldd data prepare` carries its codec as JSON in the schema metadata
(`fldd.codec`); training copies it into the saved model, so `fldd sample` and the endpoint's
`text` format decode samples without the data at hand.

- chars:   token i is alphabet[i] (the built-in text data set is chars over a-z and space);
- bytes:   token i is the byte i (vocabulary 256), decoded as UTF-8 with replacement;
- smiles:  token i is symbols[i], a SMILES token (fldd.molecules); symbols[0] is the padding (the
           empty string), so a sample decodes to the join of its tokens;
- columns: position j is column j; token i at position j is categories[j][i]. The vocabulary is
           the largest column's, so a generated id past a smaller column's categories is invalid
           (decoded as None).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fldd.molecules import SmilesError, tokenize_smiles

CODEC_KEY = b"fldd.codec"
KINDS = ("chars", "bytes", "smiles", "columns")


class CodecError(ValueError):
    """A codec description is malformed, or a string cannot be encoded with it."""


@dataclass(frozen=True)
class TokenCodec:
    kind: str
    alphabet: str = ""  # chars
    symbols: tuple[str, ...] = ()  # smiles: symbols[0] == "" (padding), then SMILES tokens
    columns: tuple[str, ...] = ()  # columns: names, one per position
    categories: tuple[tuple[str, ...], ...] = field(default=())  # columns: categories[j][i]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CodecError(f"codec kind {self.kind!r}: expected one of {KINDS}")
        if self.kind == "chars" and (len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet)):
            raise CodecError("a chars codec needs an alphabet of at least 2 distinct characters")
        if self.kind == "smiles" and (len(self.symbols) < 2 or self.symbols[0] != ""
                                      or "" in self.symbols[1:] or len(set(self.symbols)) != len(self.symbols)):
            raise CodecError("a smiles codec needs distinct symbols, the first the padding \"\" and at least one token")
        if self.kind == "columns" and (not self.columns or len(self.columns) != len(self.categories)):
            raise CodecError("a columns codec needs one category list per column")

    @property
    def vocab_size(self) -> int:
        if self.kind == "chars":
            return len(self.alphabet)
        if self.kind == "bytes":
            return 256
        if self.kind == "smiles":
            return len(self.symbols)
        return max(len(c) for c in self.categories)

    @property
    def is_text(self) -> bool:
        return self.kind in ("chars", "bytes", "smiles")

    def decode(self, row: Sequence[int]) -> str | dict[str, str | None]:
        """One sample: a string (chars, bytes, smiles) or {column: category or None} (columns)."""
        ids = [int(t) for t in row]
        if self.kind == "chars":
            return "".join(self.alphabet[i] for i in ids)
        if self.kind == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.kind == "smiles":
            return "".join(self.symbols[i] for i in ids)
        return {name: (cats[i] if 0 <= i < len(cats) else None)
                for name, cats, i in zip(self.columns, self.categories, ids)}

    def encode(self, text: str) -> list[int]:
        """Token ids of a string (text codecs only); CodecError names the characters it cannot encode."""
        if self.kind == "chars":
            outside = sorted({ch for ch in text if ch not in self.alphabet})
            if outside:
                raise CodecError(f"characters {''.join(outside)!r} are outside the alphabet {self.alphabet!r}")
            return [self.alphabet.index(ch) for ch in text]
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        if self.kind == "smiles":
            try:
                tokens = tokenize_smiles(text)
            except SmilesError as error:
                raise CodecError(str(error)) from None
            outside = sorted({t for t in tokens if t not in self.symbols})
            if outside:
                raise CodecError(f"SMILES tokens {outside} are outside the vocabulary {list(self.symbols[1:])}")
            return [self.symbols.index(t) for t in tokens]
        raise CodecError("a columns codec encodes table rows, not text")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "chars":
            return {"kind": "chars", "alphabet": self.alphabet}
        if self.kind == "bytes":
            return {"kind": "bytes"}
        if self.kind == "smiles":
            return {"kind": "smiles", "symbols": list(self.symbols)}
        return {"kind": "columns", "columns": list(self.columns), "categories": [list(c) for c in self.categories]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenCodec:
        if not isinstance(data, dict) or "kind" not in data:
            raise CodecError(f"a codec is a mapping with a 'kind', got {data!r:.200}")
        return cls(kind=str(data["kind"]), alphabet=str(data.get("alphabet", "")),
                   symbols=tuple(str(t) for t in data.get("symbols", ())),
                   columns=tuple(str(c) for c in data.get("columns", ())),
                   categories=tuple(tuple(str(v) for v in c) for c in data.get("categories", ())))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> TokenCodec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise CodecError(f"codec metadata is not JSON: {error}") from error


def codec_from_metadata(metadata: dict[bytes, bytes] | None) -> TokenCodec | None:
    """The codec in a token table's schema metadata, if it has one."""
    if not metadata or CODEC_KEY not in metadata:
        return None
    return TokenCodec.from_json(metadata[CODEC_KEY])
