"""A sweep, as written in `configs/sweep-*.yaml`: base config, step budgets, search space, metric,
scheduler and resources. Parsed and checked once, before Ray starts, naming the field at fault.

    name: smoke                      # default sweep name (--name overrides)
    base: toy2d                      # a preset in configs/ or a YAML path
    set: {train.steps: 300}          # overrides on the base config
    budgets: [2, 4]                  # step budgets T: one Tune experiment each (ASHA never compares across T)
    space:                           # `parameterization` or any config field by its dotted name
      parameterization: {grid: [fldd-mask-carry, masked-x0]}
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
      train.forward_lr: {loguniform: [3.0e-5, 1.0e-3], only: [fldd, fldd-mask, fldd-mask-carry]}
    samples: 2                       # Tune num_samples: every grid point is drawn this many times
    metric: valid_nelbo_bits         # validation NELBO (bits/token); never a test number
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # asha | fifo
    resources: {workers_per_trial: 1, cpus_per_worker: 0.9, gpus_per_worker: 0, max_concurrent_trials: 2}

Domains: `{grid: [...]}`, `{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`,
`{randint: [lo, hi]}` (hi exclusive), or a plain value. `only: [parameterizations]` samples the
key for those parameterizations and leaves the base value for the others (a forward learning rate
means nothing to a fixed forward).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from fldd.config import PARAMETERIZATIONS, ConfigError, FLDDConfig
from pipelines.vocabulary import VALID_NELBO_METRIC

PARAMETERIZATION_KEY = "parameterization"
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
METRICS = (VALID_NELBO_METRIC,)  # selection happens on validation data only


@dataclass
class Resources:
    workers_per_trial: int = 1  # Ray Train workers per trial (>= 1: Tune needs the Train controller)
    cpus_per_worker: float = 0.9
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs hold


@dataclass
class SweepSpec:
    name: str
    base: FLDDConfig  # the base config with `set` applied (before any trial's values)
    budgets: list[int]
    space: dict[str, dict[str, Any]]  # key -> {"domain": ..., "values": ..., "only": [...]}
    samples: int = 1
    metric: str = VALID_NELBO_METRIC
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    resources: Resources = field(default_factory=Resources)
    source: str = ""  # the YAML text, logged on the sweep's parent run

    # ---- reading ------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, config_dir: Path) -> SweepSpec:
        path = Path(path)
        if not path.is_file() and (config_dir / f"{path}.yaml").is_file():
            path = config_dir / f"{path}.yaml"  # `--config sweep-smoke` names a preset
        if not path.is_file():
            raise ConfigError(f"sweep file {str(path)!r} does not exist")
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"sweep file {str(path)!r} must hold a mapping")
        return cls.from_dict(data, config_dir, source=text, default_name=path.stem.removeprefix("sweep-"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], config_dir: Path, *, source: str = "",
                  default_name: str = "sweep") -> SweepSpec:
        known = {"name", "base", "set", "budgets", "space", "samples", "metric", "scheduler", "resources"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"sweep: unknown key {unknown[0]!r} (known: {sorted(known)})")
        # the shape first: a list where a mapping belongs would fail below as a bare TypeError
        for key, kind, what in (("set", dict, "a mapping (key: value)"), ("space", dict, "a mapping (key: domain)"),
                                ("scheduler", dict, "a mapping"), ("resources", dict, "a mapping"),
                                ("budgets", list, "a list of step budgets")):
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise ConfigError(f"sweep: {key}={data[key]!r} must be {what}")
        base = _base_config(data.get("base", "toy2d"), config_dir).with_overrides(dict(data.get("set") or {}))
        resources = data.get("resources") or {}
        unknown = sorted(set(resources) - set(Resources.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"sweep: unknown key 'resources.{unknown[0]}' "
                              f"(known: {sorted(Resources.__dataclass_fields__)})")
        spec = cls(name=str(data.get("name") or default_name), base=base,
                   budgets=list(data.get("budgets") or [base.process.num_steps]),
                   space={key: _parse_domain(key, value) for key, value in (data.get("space") or {}).items()},
                   samples=data.get("samples", 1), metric=data.get("metric", VALID_NELBO_METRIC),
                   scheduler=dict(data.get("scheduler") or {"type": "asha"}), resources=Resources(**resources),
                   source=source)
        return spec.validate()

    def validate(self) -> SweepSpec:
        if not self.name or "/" in self.name:
            raise ConfigError(f"sweep: name={self.name!r} must be non-empty without '/'")
        if not self.budgets or any(not isinstance(T, int) or isinstance(T, bool) or T < 1 for T in self.budgets):
            raise ConfigError(f"sweep: budgets={self.budgets!r} must be a list of step budgets T >= 1")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"sweep: budgets={self.budgets!r} repeats a budget")
        if "process.num_steps" in self.space:
            raise ConfigError("sweep: the step budget is `budgets:`, not a space key (process.num_steps)")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"sweep: samples={self.samples!r} must be an integer >= 1")
        if self.metric not in METRICS:
            raise ConfigError(f"sweep: metric={self.metric!r}: choose on validation data, one of {METRICS}")
        kind = self.scheduler.get("type", "asha")
        if kind not in SCHEDULERS:
            raise ConfigError(f"sweep: scheduler.type={kind!r} must be one of {SCHEDULERS}")
        unknown = sorted(set(self.scheduler) - {"type", "grace_period", "reduction_factor"})
        if unknown:
            raise ConfigError(f"sweep: unknown key 'scheduler.{unknown[0]}'")
        r = self.resources
        for key, kind in (("cpus_per_worker", (int, float)), ("gpus_per_worker", (int, float)),
                          ("max_concurrent_trials", int)):
            value = getattr(r, key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"sweep: resources.{key}={value!r} must be a number")
        if r.gpus_per_worker not in (0, 1):
            raise ConfigError(f"sweep: resources.gpus_per_worker={r.gpus_per_worker!r} must be 0 or 1 (one GPU per "
                              "Train worker, as `fldd train --gpu`)")
        if not isinstance(r.workers_per_trial, int) or r.workers_per_trial < 1:
            raise ConfigError(f"sweep: resources.workers_per_trial={r.workers_per_trial!r} must be >= 1 "
                              "(Tune reports through Ray Train workers; local mode has none)")
        if r.cpus_per_worker <= 0 or r.gpus_per_worker < 0 or r.max_concurrent_trials < 0:
            raise ConfigError(f"sweep: resources {r} must be positive (max_concurrent_trials 0 = automatic)")
        if self.reports_per_trial < 1:
            raise ConfigError("sweep: train.steps < train.checkpoint_every: a trial would report no validation "
                              "metric to the scheduler")
        seeds = self.space.get("train.seed")
        if seeds is not None and seeds["domain"] == "grid":  # one config under several seeds, ranked by its mean
            random = sorted(k for k, e in self.space.items() if e["domain"] not in ("grid", "value"))
            if random:
                raise ConfigError(f"sweep: space.train.seed is a grid, so each config is ranked by its mean over seeds, "
                                  f"but {random[0]!r} is random: every seed would draw its own value and no two "
                                  "trials would share a config. Make it a grid")
            if self.scheduler.get("type", "asha") == "asha":
                raise ConfigError("sweep: space.train.seed is a grid (a config is ranked by its mean over seeds, and "
                                  "only when every seed finished): use scheduler: {type: fifo}, since ASHA stops "
                                  "single seeds")
        # every corner of the space must be a valid config: fail here, not in trial 17
        for T in self.budgets:
            for values in self._corners():
                self.trial_config(values, T)
        return self

    # ---- what the sweep runs ------------------------------------------------------------
    @property
    def reports_per_trial(self) -> int:
        """Validation reports per trial: one per checkpoint, and one at the last step."""
        return -(-self.base.train.steps // self.base.train.checkpoint_every)

    def digest(self) -> str:
        """What makes two runs of a sweep the same sweep (resuming a changed one is refused)."""
        payload = {"base": self.base.to_dict(), "budgets": self.budgets, "space": self.space, "samples": self.samples,
                   "metric": self.metric, "scheduler": self.scheduler, "resources": vars(self.resources)}
        return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def parameterizations(self) -> list[str]:
        entry = self.space.get(PARAMETERIZATION_KEY)
        if entry is None:
            return [self.base.parameterization]
        return [entry["values"]] if entry["domain"] == "value" else list(entry["values"])

    def trials_per_budget(self) -> int:
        grid = 1
        for entry in self.space.values():
            if entry["domain"] == "grid":
                grid *= len(entry["values"])
        return grid * self.samples

    def param_space(self) -> dict[str, Any]:
        """Tune's param space: the keys as given, `only` keys conditional on the parameterization."""
        space: dict[str, Any] = {}
        for key, entry in self.space.items():
            domain = _tune_domain(entry)
            if entry["only"]:
                space[key] = tune.sample_from(_Conditional(domain, entry["only"], self.base.parameterization))
            else:
                space[key] = domain
        return space

    def trial_config(self, values: dict[str, Any], budget: int) -> FLDDConfig:
        """The full config of one trial: base, then parameterization preset, then sampled values, then T."""
        cfg = self.base
        if values.get(PARAMETERIZATION_KEY) is not None:
            cfg = cfg.with_parameterization(values[PARAMETERIZATION_KEY])
        overrides = {k: v for k, v in values.items() if k != PARAMETERIZATION_KEY and v is not None}
        return cfg.with_overrides({**overrides, "process.num_steps": budget})

    def _corners(self) -> list[dict[str, Any]]:
        """Every grid/choice value and both ends of every range, one key varied at a time."""
        corners = [{}]
        for key, entry in self.space.items():
            kind = entry["domain"]
            values = ([entry["values"]] if kind == "value" else  # ranges: both ends (randint's high is exclusive)
                      [entry["values"][0], entry["values"][1] - 1] if kind == "randint" else entry["values"])
            for value in values:
                for parameterization in self.parameterizations:
                    if entry["only"] and parameterization not in entry["only"]:
                        continue
                    corner = {key: value}
                    if key != PARAMETERIZATION_KEY:
                        corner[PARAMETERIZATION_KEY] = parameterization
                    corners.append(corner)
        return corners


class _Conditional:
    """tune.sample_from body for an `only:` key: a value for the listed parameterizations, else None
    (the trial keeps the base value). A class, not a lambda, so it pickles into Tune's state."""

    def __init__(self, domain: Any, only: list[str], default_parameterization: str):
        self.domain, self.only, self.default = domain, only, default_parameterization

    def __call__(self, config: dict[str, Any]) -> Any:
        parameterization = config.get(PARAMETERIZATION_KEY) or self.default
        if parameterization not in self.only:
            return None
        return self.domain.sample() if hasattr(self.domain, "sample") else self.domain


def _base_config(base: Any, config_dir: Path) -> FLDDConfig:
    if isinstance(base, dict):
        return FLDDConfig.from_dict(base)
    path = Path(str(base))
    if not path.is_file() and (config_dir / f"{base}.yaml").is_file():
        path = config_dir / f"{base}.yaml"
    return FLDDConfig.from_yaml(path)


def _parse_domain(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        if key == PARAMETERIZATION_KEY and value not in PARAMETERIZATIONS:
            raise ConfigError(f"sweep: space.parameterization: unknown {value!r} (known: {list(PARAMETERIZATIONS)})")
        return {"domain": "value", "values": value, "only": []}
    only = value.get("only") or []
    kinds = [k for k in value if k != "only"]
    if len(kinds) != 1 or kinds[0] not in DOMAINS:
        raise ConfigError(f"sweep: space.{key}={value!r}: give exactly one of {DOMAINS} (and optionally `only`)")
    kind, values = kinds[0], value[kinds[0]]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep: space.{key}.{kind} must be a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2:
            raise ConfigError(f"sweep: space.{key}.{kind}={values!r} must be [low, high]")
        try:
            low, high = (float(v) for v in values)  # YAML 1.1 reads 1e-3 as a string
        except (TypeError, ValueError):
            raise ConfigError(f"sweep: space.{key}.{kind}={values!r} must be numbers") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"sweep: space.{key}.{kind}={values!r} needs 0 < low < high for loguniform, "
                              "low < high otherwise")
        values = [int(low), int(high)] if kind == "randint" else [low, high]  # randint: high exclusive
    if key == PARAMETERIZATION_KEY:
        if kind not in ("grid", "choice"):
            raise ConfigError(f"sweep: space.parameterization must be a grid or choice of {list(PARAMETERIZATIONS)}")
        unknown = [v for v in values if v not in PARAMETERIZATIONS]
        if unknown:
            raise ConfigError(f"sweep: space.parameterization: unknown {unknown[0]!r} "
                              f"(known: {list(PARAMETERIZATIONS)})")
        if only:
            raise ConfigError("sweep: space.parameterization cannot have `only`")
    if only and kind == "grid":
        raise ConfigError(f"sweep: space.{key}: `only` works with choice/uniform/loguniform/randint, not grid "
                          "(a grid would repeat identical trials for the other parameterizations)")
    unknown_only = [p for p in only if p not in PARAMETERIZATIONS]
    if unknown_only:
        raise ConfigError(f"sweep: space.{key}.only: unknown parameterization {unknown_only[0]!r}")
    return {"domain": kind, "values": values, "only": list(only)}


def _tune_domain(entry: dict[str, Any]) -> Any:
    kind, values = entry["domain"], entry["values"]
    if kind == "value":
        return values
    if kind == "grid":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    if kind == "uniform":
        return tune.uniform(*values)
    if kind == "loguniform":
        return tune.loguniform(*values)
    return tune.randint(*values)
