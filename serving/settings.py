"""The serving application's settings: the `args:` of an application in configs/serve.yaml.

Deployment options (replicas or autoscaling, CPUs/GPUs, max_ongoing_requests) are plain Ray Serve
deployment options of the application's one deployment, under `deployment:`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fldd.service import Limits

# Ray Serve's default max_ongoing_requests (5) caps batching and throughput (STACK_NOTES): the
# deployment gets this unless the config says otherwise.
DEFAULT_MAX_ONGOING_REQUESTS = 64
KEYS = ("models", "tracking_uri", "poll_interval_s", "max_body_bytes", "limits", "batching", "deployment")
# the two deployments of earlier configs, now one: named in the error so an old file is easy to fix
FORMER_DEPLOYMENT_KEYS = ("ingress", "sampler")


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
        size, wait = batching.get("max_batch_size", 16), batching.get("batch_wait_timeout_s", 0.0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SettingsError(f"batching.max_batch_size={size!r}: must be an integer >= 1")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10:
            raise SettingsError(f"batching.batch_wait_timeout_s={wait!r}: must be a number in [0, 10] (seconds)")
        try:
            limits = Limits.from_dict(args.get("limits"))
        except ValueError as error:
            raise SettingsError(str(error)) from error
        deployment = args.get("deployment") or {}
        if not isinstance(deployment, dict):
            raise SettingsError(f"deployment={deployment!r}: must be a mapping of Ray Serve deployment options")
        deployment = dict(deployment)
        deployment.setdefault("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
        ongoing = deployment["max_ongoing_requests"]
        if isinstance(ongoing, bool) or not isinstance(ongoing, int) or ongoing < size:
            raise SettingsError(f"deployment.max_ongoing_requests={ongoing!r}: must be an integer >= "
                                f"batching.max_batch_size={size}, or batches could never fill")
        return cls(models=tuple(models), tracking_uri=uri, poll_interval_s=float(poll), max_body_bytes=body,
                   limits=limits, max_batch_size=size, batch_wait_timeout_s=float(wait), deployment=deployment)

    def to_dict(self) -> dict[str, Any]:
        """The args form (what from_dict reads): replicas receive settings as plain data."""
        return {"models": list(self.models), "tracking_uri": self.tracking_uri, "poll_interval_s": self.poll_interval_s,
                "max_body_bytes": self.max_body_bytes, "limits": vars(self.limits).copy(),
                "batching": {"max_batch_size": self.max_batch_size,
                             "batch_wait_timeout_s": self.batch_wait_timeout_s},
                "deployment": dict(self.deployment)}
