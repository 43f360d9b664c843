"""The sampler service: request checks, limits, batched seeded sampling and output formats.

No web framework, Ray or MLflow here: the Ray Serve application (serving/) and the MLflow pyfunc
model (pipelines/mlflow_model.py) both wrap this one class, so they accept and refuse the same
requests. A `RequestError` names the request field that is wrong.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fldd.codec import CodecError, TokenCodec
from fldd.config import FLDDConfig
from fldd.datasets import BUILTINS, builtin_codec
from fldd.model import FLDDModel
from fldd.sampler import Draw, sample_batch

log = logging.getLogger(__name__)

FORMATS = ("tokens", "text", "png", "rows")
MAX_SEED = 2**63 - 1  # a signed 64-bit integer: what JSON clients and torch.manual_seed all take
MASKING_METHODS = ("masked", "fldd-mask")  # forwards that only ever replace tokens by MASK
IMAGE_DATASETS = ("digits", "digits-binary")  # built-ins whose sequences are square images
FORMAT_NEEDS = {"text": "is for text models (a chars, bytes or smiles codec: text or molecules)",
                "png": "is for image data (square sequences of pixels)",
                "rows": "is for table models (a columns codec, from `fldd data prepare --csv`)"}


class RequestError(ValueError):
    """A request the service refuses; `field` is the request field at fault (dotted path)."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)  # both in args: the error survives pickling across processes
        self.field, self.message = field, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def repeated_positions(positions: Sequence[int]) -> list[int]:
    """Positions given more than once (sorted); one rule for the HTTP schema and the service."""
    return sorted(p for p, times in Counter(positions).items() if times > 1)


def length_mismatch(positions: Sequence[int], tokens: Sequence[int]) -> str | None:
    """Why a conditioning pair cannot be zipped (None: one token per position)."""
    if len(positions) == len(tokens):
        return None
    return (f"{len(tokens)} tokens for {len(positions)} positions: positions and tokens must have the "
            "same length")


@dataclass(frozen=True)
class Limits:
    """Request limits, from the serve config (or the pyfunc's model_config)."""

    max_num_samples: int = 256  # per request
    max_batch_rows: int = 1024  # rows per batched network pass (requests are never split)
    max_prefix_chars: int = 4096

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Limits:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"limits: unknown keys {unknown}; expected some of {sorted(known)}")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{key}={value!r}: must be an integer >= 1")
        limits = cls(**values)
        if limits.max_batch_rows < limits.max_num_samples:
            raise ValueError(f"limits.max_batch_rows={limits.max_batch_rows} must be >= "
                             f"limits.max_num_samples={limits.max_num_samples}: one request is one pass")
        return limits


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asks for. positions/tokens and prefix are the two ways to condition."""

    num_samples: int = 1
    seed: int | None = None  # None: a fresh random seed, reported back
    positions: Sequence[int] | None = None
    tokens: Sequence[int] | None = None
    prefix: str | None = None  # text models: clamp positions 0..len(prefix)-1
    format: str = "tokens"


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request: the seed in use and the clamp as tensors."""

    num_samples: int
    seed: int
    format: str
    condition: Tensor | None = None  # (D,) token ids, meaningful where condition_mask is True
    condition_mask: Tensor | None = None


def model_codec(cfg: FLDDConfig, codec: TokenCodec | None = None) -> TokenCodec | None:
    """The codec that decodes a model's samples: its own (saved with it), else its built-in data
    set's (the text's alphabet, moses's SMILES tokens); None when the codec does not fit the model
    (another vocabulary size, or a columns codec for another sequence length)."""
    if codec is None and not cfg.data.path and cfg.data.name in BUILTINS:
        codec = builtin_codec(cfg.data.name)
    if codec is None or codec.vocab_size != cfg.vocab_size:
        return None
    if codec.kind == "columns" and len(codec.columns) != cfg.seq_len:
        return None
    return codec


def data_kind(cfg: FLDDConfig, codec: TokenCodec | None = None) -> str:
    """text | rows | image | tokens: which output formats besides token ids make sense for the data
    (`codec`: the model's, see model_codec)."""
    codec = model_codec(cfg, codec)
    if codec is not None:
        return "text" if codec.is_text else "rows"
    if cfg.data.path:
        return "tokens"
    side = math.isqrt(cfg.seq_len)
    return "image" if cfg.data.name in IMAGE_DATASETS and side * side == cfg.seq_len else "tokens"


def formats_for(cfg: FLDDConfig, codec: TokenCodec | None = None) -> tuple[str, ...]:
    kind = data_kind(cfg, codec)
    return ("tokens",) + {"text": ("text",), "rows": ("rows",), "image": ("png",)}.get(kind, ())


def conditioning_supported(cfg: FLDDConfig) -> bool:
    """Clamping positions is exact only when the forward never moves a revealed token: then a clamped
    token is a state the reverse process was trained to see. Other forwards would give samples from
    no distribution the model learned."""
    return cfg.process.method in MASKING_METHODS


def png_base64(row: Tensor, vocab_size: int) -> str:
    """One sample as a square 8-bit grayscale PNG (one pixel per token, 0 -> black), base64."""
    side = math.isqrt(row.numel())
    levels = (row.to(torch.float64) * 255.0 / max(vocab_size - 1, 1)).round().to(torch.uint8).view(side, side)
    buffer = io.BytesIO()
    Image.fromarray(levels.numpy()).save(buffer, format="PNG")  # uint8, 2-D: mode "L" (8-bit grayscale)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class ModelCard:
    """What a client needs to ask a model well and show its samples: the data's kind (text, rows,
    image or tokens), the response formats it offers, the sequence shape, and which conditioning it
    takes (clamped positions on masking forwards; a text prefix on text models among those)."""

    data_kind: str
    formats: tuple[str, ...]
    seq_len: int
    vocab_size: int
    conditioning: bool
    text_prefix: bool


class SamplerService:
    """One loaded model behind request checks and limits.

    The model is put in eval mode and frozen once, here; nothing per request touches it, so one
    service may serve concurrent requests and batches.
    """

    def __init__(self, model: FLDDModel, limits: Limits | None = None):
        self.model = model.eval().requires_grad_(False)
        self.limits = limits or Limits()
        self.config = model.config
        self.codec = model_codec(self.config, model.codec)  # None: samples are token ids only
        if model.codec is not None and self.codec is None:
            log.warning("the model's %s codec (vocabulary %d) does not fit its vocab_size=%d / seq_len=%d: "
                        "samples are served as token ids only", model.codec.kind, model.codec.vocab_size,
                        self.config.vocab_size, self.config.seq_len)
        self.formats = formats_for(self.config, self.codec)

    @property
    def num_steps(self) -> int:
        return self.model.num_steps

    def card(self) -> ModelCard:
        cfg, clamps = self.config, conditioning_supported(self.config)
        return ModelCard(data_kind(cfg, self.codec), self.formats, cfg.seq_len, cfg.vocab_size, clamps,
                         clamps and self.codec is not None and self.codec.is_text)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check a request against the limits and this model; RequestError names the field."""
        limits = self.limits
        n = request.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_num_samples:
            raise RequestError("num_samples", f"{n!r}: must be an integer in [1, {limits.max_num_samples}]")
        seed = request.seed
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise RequestError("seed", f"{seed!r}: must be an integer in [0, {MAX_SEED}]")
        if request.format not in FORMATS:
            raise RequestError("format", f"{request.format!r}: must be one of {list(FORMATS)}")
        if request.format not in self.formats:
            raise RequestError("format", f"{request.format!r} {FORMAT_NEEDS[request.format]}; this model "
                               f"({self._data_name()}) offers {list(self.formats)}")
        condition, mask = self._clamp(request)
        return PreparedRequest(n, seed, request.format, condition, mask)

    def _clamp(self, request: GenerationRequest) -> tuple[Tensor | None, Tensor | None]:
        cfg = self.config
        D, K = cfg.seq_len, cfg.vocab_size
        given_pair = request.positions is not None or request.tokens is not None
        if request.prefix is not None and given_pair:
            raise RequestError("prefix", "give either a text prefix or conditioning {positions, tokens}, not both")
        if request.prefix is None and not given_pair:
            return None, None
        field = "prefix" if request.prefix is not None else "conditioning"
        if not conditioning_supported(cfg):
            raise RequestError(field, f"conditioning needs a masking forward process ({' or '.join(MASKING_METHODS)});"
                               f" this model's forward is {cfg.process.method!r}, which also changes revealed "
                               "tokens, so clamped positions would give off-distribution samples")
        if request.prefix is not None:
            positions, tokens = self._prefix_tokens(request.prefix)
        else:
            if request.positions is None or request.tokens is None:
                missing = "tokens" if request.tokens is None else "positions"
                raise RequestError(f"conditioning.{missing}", "positions and tokens must be given together")
            positions, tokens = list(request.positions), list(request.tokens)
            for name, values in (("positions", positions), ("tokens", tokens)):
                bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int)), None)
                if bad is not None:
                    raise RequestError(f"conditioning.{name}", f"{bad!r}: must be integers")
            if (mismatch := length_mismatch(positions, tokens)) is not None:
                raise RequestError("conditioning.tokens", mismatch)
            if not positions:
                raise RequestError("conditioning.positions", "must not be empty")
            bad = next((p for p in positions if not 0 <= p < D), None)
            if bad is not None:
                raise RequestError("conditioning.positions", f"{bad}: outside [0, {D}) (sequence length {D})")
            if repeated := repeated_positions(positions):
                raise RequestError("conditioning.positions", f"repeated positions {repeated}")
            bad = next((t for t in tokens if not 0 <= t < K), None)
            if bad is not None:
                what = " (the MASK state, not a data token)" if bad == K and cfg.uses_mask_state else ""
                raise RequestError("conditioning.tokens", f"{bad}{what}: outside the vocabulary [0, {K})")
        if len(positions) == D:
            raise RequestError(field, f"fixes all {D} positions: nothing left to generate")
        condition = torch.zeros(D, dtype=torch.long)
        mask = torch.zeros(D, dtype=torch.bool)
        condition[positions] = torch.tensor(tokens, dtype=torch.long)
        mask[positions] = True
        return condition, mask

    def _data_name(self) -> str:
        return self.config.data.path or self.config.data.name

    def _prefix_tokens(self, prefix: str) -> tuple[list[int], list[int]]:
        D = self.config.seq_len
        codec = self.codec
        if codec is None or not codec.is_text:
            raise RequestError("prefix", f"a text prefix is for text models; this model's data is "
                               f"{self._data_name()!r}: use conditioning {{positions, tokens}}")
        if not isinstance(prefix, str) or not prefix:
            raise RequestError("prefix", "must be a non-empty string")
        if len(prefix) > self.limits.max_prefix_chars:
            raise RequestError("prefix", f"{len(prefix)} characters: longer than limits.max_prefix_chars="
                               f"{self.limits.max_prefix_chars}")
        try:
            tokens = codec.encode(prefix)
        except CodecError as error:
            raise RequestError("prefix", str(error)) from None
        if len(tokens) > D - 1:
            unit = {"bytes": "bytes", "smiles": "SMILES tokens"}.get(codec.kind, "characters")
            raise RequestError("prefix", f"{len(tokens)} {unit}: longer than the sequence allows "
                               f"(at most {D - 1} of {D}, leaving one to generate)")
        return list(range(len(tokens))), tokens

    def generate(self, requests: Sequence[PreparedRequest]) -> list[Tensor]:
        """Samples (n, D) per prepared request, in order: batched passes of at most
        limits.max_batch_rows rows, each request drawn with its own seeded generator."""
        device = next(self.model.reverse.parameters()).device
        out: list[Tensor] = []
        group: list[PreparedRequest] = []
        for request in list(requests) + [None]:
            rows = sum(r.num_samples for r in group)
            if group and (request is None or rows + request.num_samples > self.limits.max_batch_rows):
                draws = [Draw(r.num_samples, torch.Generator(device=device).manual_seed(r.seed), r.condition,
                              r.condition_mask) for r in group]
                out.extend(t.cpu() for t in sample_batch(self.model, draws, device=device))
                group = []
            if request is not None:
                group.append(request)
        return out

    def render(self, tokens: Tensor, format: str) -> list:
        """Samples in a response format: token id lists, strings (text), {column: category} objects
        (rows; None for an id past that column's categories), or base64 PNGs."""
        if format in ("text", "rows"):
            if format not in self.formats:  # prepare() refuses these; a direct caller gets the same words
                raise RequestError("format", f"{format!r} {FORMAT_NEEDS[format]}; this model offers "
                                   f"{list(self.formats)}")
            return [self.codec.decode(row) for row in tokens.tolist()]
        if format == "png":
            return [png_base64(row, self.config.vocab_size) for row in tokens]
        return tokens.tolist()

    def __call__(self, request: GenerationRequest) -> tuple[PreparedRequest, Tensor]:
        """Check and serve one request alone."""
        prepared = self.prepare(request)
        return prepared, self.generate([prepared])[0]
