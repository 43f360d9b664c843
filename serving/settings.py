"""The serving application's settings: the `args:` of an application in configs/serve.yaml.

Deployment options (replicas, autoscaling, CPUs/GPUs, max_ongoing_requests) are plain Ray Serve
deployment options for the two deployments, `ingress` and `sampler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fldd.service import Limits

# Ray Serve's default max_ongoing_requests (5) caps batching and throughput (STACK_NOTES): both
# deployments get this unless the config says otherwise.
DEFAULT_MAX_ONGOING_REQUESTS = 64
KEYS = ("models", "tracking_uri", "poll_interval_s", "max_body_bytes", "limits", "batching", "ingress", "sampler")


class SettingsError(ValueError):
    """A serve config value is invalid; the message names the key."""


@dataclass(frozen=True)
class ServeSettings:
    models: tuple[str, ...]  # registered model names; the first is the default of a request
    tracking_uri: str  # absolute: replicas run in other processes and directories
    poll_interval_s: float = 10.0  # how often the registry aliases are read
    max_body_bytes: int = 65536  # larger request bodies get 413
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 16  # requests per @serve.batch call
    batch_wait_timeout_s: float = 0.005
    ingress: dict[str, Any] = field(default_factory=dict)  # Ray Serve deployment options
    sampler: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, args: dict[str, Any], default_tracking_uri: str | None = None) -> ServeSettings:
        args = dict(args or {})
        unknown = sorted(set(args) - set(KEYS))
        if unknown:
            raise SettingsError(f"unknown keys {unknown}; expected some of {list(KEYS)}")
        models = args.get("models")
        models = [models] if isinstance(models, str) else list(models or [])
        if not models or not all(isinstance(m, str) and m for m in models):
            raise SettingsError(f"models={args.get('models')!r}: give one or more registered model names")
        if len(set(models)) != len(models):
            raise SettingsError(f"models={models!r}: repeated names")
        uri = args.get("tracking_uri") or default_tracking_uri
        if not uri:
            raise SettingsError("tracking_uri: not set (and no default store)")
        poll = args.get("poll_interval_s", 10.0)
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not (math.isfinite(poll) and poll > 0):
            raise SettingsError(f"poll_interval_s={poll!r}: must be a number > 0 (seconds)")
        body = args.get("max_body_bytes", 65536)
        if isinstance(body, bool) or not isinstance(body, int) or body < 256:
            raise SettingsError(f"max_body_bytes={body!r}: must be an integer >= 256")
        batching = dict(args.get("batching") or {})
        unknown = sorted(set(batching) - {"max_batch_size", "batch_wait_timeout_s"})
        if unknown:
            raise SettingsError(f"batching: unknown keys {unknown}; expected max_batch_size, batch_wait_timeout_s")
        size, wait = batching.get("max_batch_size", 16), batching.get("batch_wait_timeout_s", 0.005)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SettingsError(f"batching.max_batch_size={size!r}: must be an integer >= 1")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10:
            raise SettingsError(f"batching.batch_wait_timeout_s={wait!r}: must be a number in [0, 10] (seconds)")
        try:
            limits = Limits.from_dict(args.get("limits"))
        except ValueError as error:
            raise SettingsError(str(error)) from error
        deployments = {}
        for name in ("ingress", "sampler"):
            options = dict(args.get(name) or {})
            options.setdefault("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
            if name == "sampler" and options["max_ongoing_requests"] < size:
                raise SettingsError(f"sampler.max_ongoing_requests={options['max_ongoing_requests']} < "
                                    f"batching.max_batch_size={size}: batches could never fill")
            deployments[name] = options
        return cls(models=tuple(models), tracking_uri=uri, poll_interval_s=float(poll), max_body_bytes=body,
                   limits=limits, max_batch_size=size, batch_wait_timeout_s=float(wait), **deployments)

    def to_dict(self) -> dict[str, Any]:
        """The args form (what from_dict reads): replicas receive settings as plain data."""
        return {"models": list(self.models), "tracking_uri": self.tracking_uri, "poll_interval_s": self.poll_interval_s,
                "max_body_bytes": self.max_body_bytes, "limits": vars(self.limits).copy(),
                "batching": {"max_batch_size": self.max_batch_size,
                             "batch_wait_timeout_s": self.batch_wait_timeout_s},
                "ingress": dict(self.ingress), "sampler": dict(self.sampler)}
