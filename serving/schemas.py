"""Request and response models of the HTTP API (pydantic: FastAPI validates with them and
publishes them in the OpenAPI schema at /docs). Unknown fields are refused everywhere; bounds
that depend on the model (vocabulary, sequence length, limits) are checked by fldd.service. The rules
both check (seed range, formats, one token per distinct position) are fldd.service's constants and
functions, so the two refuse in the same words: the schema for HTTP (422 with `loc`), the service
for every caller (the pyfunc, Python)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator,
                      model_validator)

from fldd.service import FORMATS, MAX_SEED, length_mismatch, repeated_positions
from serving.registry import QUALITY_METRICS

# a static ceiling for the schema; the configured limits.max_num_samples is checked per request
NUM_SAMPLES_CEILING = 100_000
MAX_CONDITIONED = 100_000

Position = Annotated[StrictInt, Field(ge=0)]
Token = Annotated[StrictInt, Field(ge=0)]


class Conditioning(BaseModel):
    """Clamp these positions to these tokens (masking forward processes only)."""

    model_config = ConfigDict(extra="forbid")
    positions: list[Position] = Field(min_length=1, max_length=MAX_CONDITIONED,
                                      description="0-based positions, each at most once")
    tokens: list[Token] = Field(min_length=1, max_length=MAX_CONDITIONED,
                                description="data token ids (not the MASK state), one per position")

    @field_validator("positions")
    @classmethod
    def _distinct(cls, positions: list[int]) -> list[int]:
        if repeated := repeated_positions(positions):
            raise ValueError(f"repeated positions {repeated}")
        return positions

    @model_validator(mode="after")
    def _same_length(self) -> Conditioning:
        if (mismatch := length_mismatch(self.positions, self.tokens)) is not None:
            raise ValueError(mismatch)
        return self


LOWER_IS_BETTER = tuple(metric for metric, better in QUALITY_METRICS.items() if better == "lower")


class QualityTarget(BaseModel):
    """The quality a request needs instead of a step budget: the service answers with the fewest-steps
    champion whose test metric, as the registry gate recorded it, meets the bound."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"metric": "nelbo_bits",
                                                                               "max": 4.6}]})
    metric: Literal["nelbo_bits", "validity", "fcd"] = Field(
        description="a test metric the gate records: nelbo_bits (lower is better) for every model; validity "
        "(higher) and fcd (lower) for molecule models")
    max: Annotated[StrictFloat | StrictInt, Field(allow_inf_nan=False)] | None = Field(
        None, description="the recorded value must be at most this (for a metric where lower is better)")
    min: Annotated[StrictFloat | StrictInt, Field(allow_inf_nan=False)] | None = Field(
        None, description="the recorded value must be at least this (for a metric where higher is better)")

    @model_validator(mode="after")
    def _one_bound(self) -> QualityTarget:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min")
        if self.metric in LOWER_IS_BETTER and self.min is not None:
            raise ValueError(f"{self.metric}: lower is better, so give max, not min")
        if self.metric not in LOWER_IS_BETTER and self.max is not None:
            raise ValueError(f"{self.metric}: higher is better, so give min, not max")
        return self

    @property
    def bound(self) -> tuple[float, str]:
        return (float(self.max), "max") if self.max is not None else (float(self.min), "min")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"num_samples": 4, "seed": 0}]})
    model: StrictStr | None = Field(None, min_length=1, max_length=256,
                                    description="registered model name (default: the first one served)")
    num_samples: StrictInt = Field(1, ge=1, le=NUM_SAMPLES_CEILING,
                                   description="samples to draw (at most limits.max_num_samples)")
    steps: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="step budget T: selects the champion-t<T> version (default: the champion alias's T)")
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="same seed and same model version -> same samples (default: random, returned)")
    quality: QualityTarget | None = Field(
        None, description="instead of steps: the fewest-steps champion whose recorded test metric meets this")
    conditioning: Conditioning | None = None
    prefix: StrictStr | None = Field(None, min_length=1, max_length=4096,
                                     description="text models: a prefix to complete, in the model's alphabet "
                                     "(the built-in text: a-z and space)")
    format: Literal[FORMATS] = Field("tokens", description="tokens | text (text models: a chars or bytes codec) | "
                                     "png (image data, base64) | rows (table models: one {column: category} "
                                     "object per sample)")

    @model_validator(mode="after")
    def _steps_or_quality(self) -> GenerateRequest:
        if self.steps is not None and self.quality is not None:
            raise ValueError("give steps or quality, not both: quality chooses the step budget")
        return self


class RecordedQuality(BaseModel):
    """The test metric that made a quality-routed request choose its champion, as the gate recorded it."""

    metric: str
    value: float
    stderr: float | None
    bound: float
    bound_kind: Literal["max", "min"]


class GenerateResponse(BaseModel):
    model: str
    version: str = Field(description="registry version that drew the samples")
    alias: str = Field(description="the alias that selected it, champion-t<T>")
    steps: int
    seed: int
    format: str
    samples: list[list[int]] | list[str] | list[dict[str, str | None]] = Field(
        description="per sample: token ids, a string (text, or a base64 PNG), or a {column: category} object "
        "(rows; null for a token past that column's categories)")
    tokens: list[list[int]] = Field(description="token ids per sample, whatever the format")
    batch_requests: int = Field(description="requests that shared this sampling pass")
    elapsed_s: float = Field(description="time taken inside the server, seconds")
    quality: RecordedQuality | None = Field(None, description="for a quality-routed request: the recorded test "
                                            "metric of the chosen champion (null for a request by steps)")


class Card(BaseModel):
    """How to ask this version and show its samples (fldd.service.ModelCard)."""

    data_kind: Literal["text", "rows", "image", "tokens"] = Field(
        description="text (format text), rows (format rows), image (format png), tokens (ids only)")
    formats: list[str] = Field(description="the response formats this version offers")
    seq_len: int
    vocab_size: int
    conditioning: bool = Field(description="clamped positions are accepted (masking forwards only)")
    text_prefix: bool = Field(description="a text prefix is accepted (a text model with a masking forward)")


class VersionEntry(BaseModel):
    version: str
    aliases: list[str]
    steps: int
    parameterization: str | None
    dataset: str | None
    test_nelbo_bits: float | None
    valid_nelbo_bits: float | None
    run_id: str | None
    test_nelbo_stderr: float | None = None
    test_sample_scores: dict[str, float] = Field(default_factory=dict, description="sample scores the gate recorded "
                                                 "on the test split beside the NELBO (molecules: validity, uniqueness, "
                                                 "novelty, copy_rate, fcd)")
    latency_ms_p50: float | None = Field(None, description="median time inside this replica of the last requests "
                                         "served by this version (null before the first)")
    card: Card | None = Field(None, description="data kind, formats and conditioning (null until this replica "
                              "has loaded the version)")


class ModelEntry(BaseModel):
    name: str
    default_steps: int | None
    budgets: dict[int, str] = Field(description="step budget T -> served version")
    versions: list[VersionEntry]
    problem: str | None = Field(description="why requests without `steps` cannot be served, if so")


class ModelsResponse(BaseModel):
    models: list[ModelEntry]
    poll_interval_s: float
    polled_at: float | None = Field(description="unix time of the last successful registry poll")
