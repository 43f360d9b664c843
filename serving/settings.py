"""The serving application's settings: the `args:` of an application in configs/serve.yaml.

Deployment options (replicas or autoscaling, CPUs/GPUs, max_ongoing_requests) are plain Ray Serve
deployment options of the application's one deployment, under `deployment:`. The args are checked
by a pydantic model (strict: no string or bool read as a number; unknown keys refused); its first
error is reported as `key=value: what it must be`, like every config error in fldd.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator
from ray import serve

from fldd.service import Limits

# Ray Serve's default max_ongoing_requests (5) caps batching and throughput (STACK_NOTES): the
# deployment gets this unless the config says otherwise.
DEFAULT_MAX_ONGOING_REQUESTS = 64
KEYS = ("models", "tracking_uri", "poll_interval_s", "max_body_bytes", "limits", "batching", "deployment")
# the two deployments of earlier configs, now one: named in the error so an old file is easy to fix
FORMER_DEPLOYMENT_KEYS = ("ingress", "sampler")
# what each key must be, for the message (pydantic's own says "Input should be a valid integer")
EXPECTED = {
    "models": "give one or more registered model names",
    "tracking_uri": "a tracking URI (or leave it out for the default store)",
    "poll_interval_s": "must be a number > 0 (seconds)",
    "max_body_bytes": "must be an integer >= 256",
    "batching": "a mapping with max_batch_size and batch_wait_timeout_s",
    "batching.max_batch_size": "must be an integer >= 1",
    "batching.batch_wait_timeout_s": "must be a number in [0, 10] (seconds)",
    "deployment": "must be a mapping of Ray Serve deployment options",
    "limits": "a mapping of request limits (max_num_samples, max_batch_rows, max_prefix_chars)",
}

Number = StrictInt | StrictFloat  # a bool is not a number here, nor a string of digits


def deployment_options() -> tuple[str, ...]:
    """The options `@serve.deployment` takes, read from its signature (so a Ray upgrade's new options
    are accepted without a change here)."""
    return tuple(name for name in inspect.signature(serve.deployment).parameters if not name.startswith("_"))


class SettingsError(ValueError):
    """A serve config value is invalid; the message names the key."""


class _Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_size: Annotated[StrictInt, Field(ge=1)] = 16  # requests per @serve.batch call
    # no wait: batches still form, from the requests that queue while the previous batch samples (one
    # batch runs at a time); waiting only delayed lone requests (benchmarks/serve_load.py: p50 at
    # concurrency 1 ~5 ms lower with 0 than with 0.005, no measurable change at 8 and 32)
    batch_wait_timeout_s: Annotated[Number, Field(ge=0, le=10)] = 0.0


class _Args(BaseModel):
    """The `args:` as written, checked by pydantic (strict: no coercion of "64" or true to numbers)."""

    model_config = ConfigDict(extra="forbid")
    models: list[Annotated[str, Field(min_length=1)]]
    tracking_uri: str | None = None
    poll_interval_s: Annotated[Number, Field(gt=0, allow_inf_nan=False)] = 10.0
    max_body_bytes: Annotated[StrictInt, Field(ge=256)] = 65536
    limits: dict[str, Any] | None = None  # fldd.service.Limits checks its own keys
    batching: _Batching | None = None
    deployment: dict[str, Any] | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("models")
    @classmethod
    def _distinct_and_some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("empty")
        if len(set(value)) != len(value):
            raise ValueError("repeated names")
        return value


def _first_problem(error: ValidationError, args: dict[str, Any]) -> str:
    """The first pydantic error as 'key=value: what it must be', the form every fldd error takes.
    Unknown keys come first, all of them at the outermost level that has any, sorted."""
    problems = error.errors()
    extra = [[str(p) for p in e["loc"]] for e in problems if e["type"] == "extra_forbidden"]
    if extra:
        depth = min(len(path) for path in extra)
        where = ".".join(next(path for path in extra if len(path) == depth)[:-1])
        unknown = sorted(path[-1] for path in extra if len(path) == depth and ".".join(path[:-1]) == where)
        allowed = list(KEYS) if not where else list(_Batching.model_fields)
        return f"{where + ': ' if where else ''}unknown keys {unknown}; expected some of {allowed}"
    problem = problems[0]
    path = [str(p) for p in problem["loc"] if not isinstance(p, int)]
    key = ".".join(path[:2]) if path[:1] == ["batching"] else path[0]
    value: Any = args
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    reason = EXPECTED.get(key, problem["msg"])
    if key == "models" and "repeated" in problem["msg"]:
        reason = "repeated names"
    return f"{key}={value!r}: {reason}"


@dataclass(frozen=True)
class ServeSettings:
    models: tuple[str, ...]  # registered model names; the first is the default of a request
    tracking_uri: str  # absolute: replicas run in other processes and directories
    poll_interval_s: float = 10.0  # how often the registry aliases are read
    max_body_bytes: int = 65536  # larger request bodies get 413
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 16  # requests per @serve.batch call
    # no wait: batches still form, from the requests that queue while the previous batch samples (one
    # batch runs at a time); waiting only delayed lone requests (benchmarks/serve_load.py: p50 at
    # concurrency 1 ~5 ms lower with 0 than with 0.005, no measurable change at 8 and 32)
    batch_wait_timeout_s: float = 0.0
    deployment: dict[str, Any] = field(default_factory=dict)  # Ray Serve deployment options

    @classmethod
    def from_dict(cls, args: dict[str, Any], default_tracking_uri: str | None = None) -> ServeSettings:
        args = dict(args or {})
        former = [key for key in FORMER_DEPLOYMENT_KEYS if key in args]
        if former:
            raise SettingsError(f"{', '.join(former)}: the ingress and the sampler are one deployment now; merge "
                                f"their options into `deployment:` (num_replicas or autoscaling_config, "
                                f"max_ongoing_requests, ray_actor_options)")
        try:
            checked = _Args.model_validate(args)
        except ValidationError as error:
            raise SettingsError(_first_problem(error, args)) from None
        uri = checked.tracking_uri or default_tracking_uri
        if not uri:
            raise SettingsError("tracking_uri: not set (and no default store)")
        try:
            limits = Limits.from_dict(checked.limits)
        except ValueError as error:
            raise SettingsError(str(error)) from error
        batching = checked.batching or _Batching()
        deployment = {"max_ongoing_requests": DEFAULT_MAX_ONGOING_REQUESTS, **(checked.deployment or {})}
        unknown = sorted(set(deployment) - set(deployment_options()))
        if unknown:  # Ray would raise a bare TypeError at deploy time
            raise SettingsError(f"deployment: unknown keys {unknown}; Ray Serve's deployment options are "
                                f"{sorted(deployment_options())}")
        ongoing, size = deployment["max_ongoing_requests"], batching.max_batch_size
        if isinstance(ongoing, bool) or not isinstance(ongoing, int) or ongoing < size:
            raise SettingsError(f"deployment.max_ongoing_requests={ongoing!r}: must be an integer >= "
                                f"batching.max_batch_size={size}, or batches could never fill")
        return cls(models=tuple(checked.models), tracking_uri=uri, poll_interval_s=float(checked.poll_interval_s),
                   max_body_bytes=checked.max_body_bytes, limits=limits, max_batch_size=size,
                   batch_wait_timeout_s=float(batching.batch_wait_timeout_s), deployment=deployment)

    def to_dict(self) -> dict[str, Any]:
        """The args form (what from_dict reads): replicas receive settings as plain data."""
        return {"models": list(self.models), "tracking_uri": self.tracking_uri, "poll_interval_s": self.poll_interval_s,
                "max_body_bytes": self.max_body_bytes, "limits": vars(self.limits).copy(),
                "batching": {"max_batch_size": self.max_batch_size,
                             "batch_wait_timeout_s": self.batch_wait_timeout_s},
                "deployment": dict(self.deployment)}
