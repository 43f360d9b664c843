"""One typed, validated configuration for a model and its training run.

The same object is serialised into checkpoints (as a plain dict), into YAML files and, later, into
MLflow params. `validate()` runs once when a config is built from user input and names the field
that is wrong.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("fldd", "fldd-mask", "masked", "uniform")
PRIORS = ("auto", "uniform", "mask")
WARM_STARTS = ("none", "masked", "uniform", "auto")
# warm_start "auto": a random start up to this T, the masked warm start above it. Chosen on
# validation (toy2d, selection seeds 0-2): a random start won at T=2 and collapsed at T=4, 8, 16,
# where the masked warm start won; the reference script collapses from a random start at T=4 too
# (docs/training_recipe.md). Measured on toy2d only (D=2, MLP networks): the D=64 presets keep the
# masked warm start at every T, and a new data set should be checked the same way before using auto.
AUTO_RANDOM_START_MAX_T = 2
# forward_freeze_fraction "auto": no reverse-only phase for a random start (with one it collapsed),
# this much for a warm start or a learned masking order (without one the masked warm start collapsed)
AUTO_FREEZE_FRACTION = 0.3
SCHEDULES = ("linear", "cosine")
ARCHITECTURES = ("transformer", "mlp")
ESTIMATORS = ("loo", "ema")
CLIP_MODES = ("joint", "per-network")
# The named methods the benchmarks compare and `fldd train --method` offers: a forward process and
# the reverse parameterization that goes with it. Every preset sets both keys, so applying one never
# keeps the other half from the config it is applied to.
PARAMETERIZATIONS: dict[str, dict[str, Any]] = {
    "fldd": {"process.method": "fldd", "process.reverse_parameterization": "direct"},
    "fldd-mask": {"process.method": "fldd-mask", "process.reverse_parameterization": "direct"},
    # the learned masking order with a reverse that keeps revealed tokens
    "fldd-mask-carry": {"process.method": "fldd-mask", "process.reverse_parameterization": "carry-over"},
    "masked": {"process.method": "masked", "process.reverse_parameterization": "direct"},
    # MDLM: the masked forward with a predict-x reverse, the strongest fixed baseline
    "masked-x0": {"process.method": "masked", "process.reverse_parameterization": "x0"},
    "uniform": {"process.method": "uniform", "process.reverse_parameterization": "direct"},
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


@dataclass
class ProcessConfig:
    """The forward (noising) process and its step budget."""

    method: str = "fldd"  # fldd | fldd-mask | masked | uniform
    num_steps: int = 2  # T: sampling costs exactly T reverse-network calls
    # For method=fldd. These library defaults keep the masked warm start + reverse-first schedule,
    # which the D=64 presets (digits, text) need; the toy2d preset uses a random start, which won on
    # validation at T=2 there but collapsed at T=8 (docs/training_recipe.md).
    # uniform over K, or a point mass on an extra MASK token; auto: the one the warm start needs
    # (mask for a masked warm start, else uniform, the paper's setting for a random start)
    prior: str = "auto"
    # none (random init) | masked | uniform: start u(x,t) at a fixed marginal | auto: none at
    # T <= AUTO_RANDOM_START_MAX_T, masked above (see resolved_warm_start)
    warm_start: str = "masked"
    warm_start_floor: float = 1e-3  # eps in (1-eps)*ubar + eps/S before the log
    # scale of the learned forward's initial logits: a near-uniform random start carries no
    # information about x and sits at the collapsed saddle (spec section 5b)
    forward_init_scale: float = 1.0
    # method=fldd: u(x,t) = (1 - eps) softmax(f) + eps / S for 0<t<T, so every state stays reachable.
    # It does not revive a saturated softmax's gradient (the floor is mixed in after it); measured in
    # docs/training_recipe.md ("A floor on u"). 0: none, the default.
    forward_floor: float = 0.0
    schedule: str = "linear"  # alpha_t for fixed processes and warm starts: linear | cosine
    # How the reverse network's output becomes p(z_s | z_t): "direct" (spec section 3; the only
    # choice for a learned forward, whose q(x | z_t) is not factorized) or "x0" for the fixed
    # processes: the network predicts x and p(z_s|z_t) = sum_x q(z_s|z_t,x) p(x|z_t) per position
    # (MDLM's parameterization for masked). A stronger fixed baseline at large T. "carry-over" for
    # masking-only forwards (masked, fldd-mask): direct, but revealed tokens are kept exactly.
    reverse_parameterization: str = "direct"


@dataclass
class NetworkConfig:
    """A time-conditioned network over positions (the reverse, or the learned forward)."""

    arch: str = "mlp"  # transformer | mlp (the MLP flattens all positions; for tiny D)
    width: int = 256
    depth: int = 2
    heads: int = 4  # transformer only


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 256  # (x, z_t) pairs per step: the reverse network's batch
    lr: float = 1e-3  # reverse network
    forward_lr: float = 3e-4  # learned forward network (at T <= forward_lr_ref_steps)
    # Above this many steps T the forward learning rate shrinks as forward_lr * (ref/T)^2: the
    # REINFORCE signal per marginal thins out with T, and at 3e-4 toy2d T=16 drifted off its warm
    # start and collapsed on 1 of 3 seeds (docs/training_recipe.md). 0: forward_lr at every T.
    forward_lr_ref_steps: int = 4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm
    # joint: one norm over both networks (the reference script's habit, and the setting with which
    # a random start reached the reference on toy2d: docs/training_recipe.md). per-network: each
    # network clipped on its own, so a spike in the forward's noisy score-function gradient does not
    # shrink the reverse update.
    grad_clip_mode: str = "joint"
    # linear learning-rate decay to 0 over the last fraction of the steps (both networks); 0: constant
    lr_decay_fraction: float = 0.2
    estimator: str = "loo"  # REINFORCE baseline: loo (leave-one-out over M z_t) | ema (per t)
    num_zt_samples: int = 2  # M: z_t samples per (x, t) for loo; batch_size/M distinct x per step
    ema_decay: float = 0.99
    # train the reverse alone for this fraction of steps; "auto": 0 for a random start, else
    # AUTO_FREEZE_FRACTION (see FLDDConfig.resolved_freeze_fraction)
    forward_freeze_fraction: float | str = 0.3
    concrete_warmup_steps: int = 0  # relaxed (Concrete) warm-up; off by default (spec 5b)
    tau_start: float = 1.0
    tau_end: float = 1e-3
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size is split into them)
    log_every: int = 100
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 500  # distributed runs: checkpoint (and validate) every N steps, and at the end
    seed: int = 0
    # start from a trained model (a run id, runs:/..., models:/NAME@ALIAS or a model.pt path): its
    # reverse weights, with this config's forward starting exactly at its fixed marginals
    # (FLDDModel.init_from); "" trains from random weights
    init_from: str = ""


@dataclass
class DataConfig:
    name: str = "toy2d"  # built-in data set, used when `path` is empty
    num_train: int = 20000  # built-in data sets: rows generated per split
    num_valid: int = 2000
    seed: int = 0
    path: str = ""  # a Parquet token table (file or directory); with train.parquet + valid.parquet inside
    column: str = "tokens"  # its fixed-length integer list column
    vocab_size: int = 0  # a table without vocabulary metadata: its vocabulary (0: largest token + 1)
    valid_fraction: float = 0.1  # held out when `path` has no valid.parquet (rows split with data.seed)


@dataclass
class FLDDConfig:
    seq_len: int = 0  # D; 0: from the data (fldd.data.resolve_data_shape)
    vocab_size: int = 0  # K (data tokens; MASK, when used, is the extra state K); 0: from the data
    process: ProcessConfig = field(default_factory=ProcessConfig)
    reverse_network: NetworkConfig = field(default_factory=NetworkConfig)
    forward_network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def uses_mask_state(self) -> bool:
        p = self.process
        return p.method in ("fldd-mask", "masked") or (p.method == "fldd" and self.resolved_prior == "mask")

    @property
    def resolved_warm_start(self) -> str:
        """process.warm_start with "auto" resolved by T: a random start (none) up to
        AUTO_RANDOM_START_MAX_T steps, the masked warm start above."""
        p = self.process
        if p.warm_start != "auto":
            return p.warm_start
        return "none" if p.num_steps <= AUTO_RANDOM_START_MAX_T else "masked"

    @property
    def resolved_freeze_fraction(self) -> float:
        """train.forward_freeze_fraction with "auto" resolved: no reverse-only phase for the general
        learned forward's random start, AUTO_FREEZE_FRACTION otherwise."""
        fraction = self.train.forward_freeze_fraction
        if fraction != "auto":
            return float(fraction)
        random_start = self.process.method == "fldd" and self.resolved_warm_start == "none"
        return 0.0 if random_start else AUTO_FREEZE_FRACTION

    @property
    def resolved_prior(self) -> str:
        """process.prior with "auto" resolved: mask for a masked warm start, uniform otherwise."""
        p = self.process
        if p.prior != "auto":
            return p.prior
        return "mask" if self.resolved_warm_start == "masked" else "uniform"

    @property
    def num_states(self) -> int:
        """S: the size of the latent state space (K, or K+1 with MASK)."""
        return self.vocab_size + 1 if self.uses_mask_state else self.vocab_size

    @property
    def learns_forward(self) -> bool:
        return self.process.method in ("fldd", "fldd-mask")

    @property
    def samples_per_x(self) -> int:
        """M: z_t samples per (x, t); only a learned forward needs more than one (leave-one-out)."""
        return self.train.num_zt_samples if self.learns_forward else 1

    @property
    def forward_lr(self) -> float:
        """The learned forward network's learning rate at this config's T (train.forward_lr_ref_steps)."""
        ref, T = self.train.forward_lr_ref_steps, self.process.num_steps
        return self.train.forward_lr * (min(1.0, ref / T) ** 2 if ref else 1.0)

    @property
    def parameterization(self) -> str:
        """The PARAMETERIZATIONS name of this config's method and reverse parameterization, or
        "method+reverse_parameterization" for a valid pair no preset names (e.g. "masked+carry-over")."""
        p = self.process
        pair = {"process.method": p.method, "process.reverse_parameterization": p.reverse_parameterization}
        return next((name for name, preset in PARAMETERIZATIONS.items() if preset == pair),
                    f"{p.method}+{p.reverse_parameterization}")

    def rows_per_micro_batch(self, workers: int = 1) -> int:
        """Data points per micro-batch: the global reverse batch split over workers, accumulation
        steps and the M z_t samples drawn per data point."""
        return self.train.batch_size // (workers * self.train.grad_accum_steps * self.samples_per_x)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> FLDDConfig:
        def require(ok: bool, name: str, value: Any, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={value!r}: {why}")

        p, tr = self.process, self.train
        require(self.seq_len >= 0, "seq_len", self.seq_len, "must be >= 1 (or 0: from the data)")
        require(self.vocab_size == 0 or self.vocab_size >= 2, "vocab_size", self.vocab_size,
                "must be >= 2 (or 0: from the data)")
        require(p.method in METHODS, "process.method", p.method, f"must be one of {METHODS}")
        require(p.num_steps >= 1, "process.num_steps", p.num_steps, "T must be >= 1")
        require(p.prior in PRIORS, "process.prior", p.prior, f"must be one of {PRIORS}")
        require(p.warm_start in WARM_STARTS, "process.warm_start", p.warm_start, f"must be one of {WARM_STARTS}")
        require(p.schedule in SCHEDULES, "process.schedule", p.schedule, f"must be one of {SCHEDULES}")
        require(p.reverse_parameterization in ("direct", "x0", "carry-over"), "process.reverse_parameterization",
                p.reverse_parameterization, "must be 'direct', 'x0' or 'carry-over'")
        require(p.reverse_parameterization != "carry-over" or p.method in ("masked", "fldd-mask"),
                "process.reverse_parameterization", p.reverse_parameterization,
                "'carry-over' needs a masking-only forward (masked or fldd-mask): others change revealed tokens")
        require(p.reverse_parameterization == "direct" or self.train.concrete_warmup_steps == 0,
                "process.reverse_parameterization", p.reverse_parameterization,
                "takes hard z_t only: set train.concrete_warmup_steps=0")
        require(p.reverse_parameterization != "x0" or p.method in ("masked", "uniform"),
                "process.reverse_parameterization", p.reverse_parameterization,
                "'x0' needs a fixed forward (masked or uniform): a learned forward's q(x | z_t) is not factorized")
        require(p.forward_init_scale >= 0, "process.forward_init_scale", p.forward_init_scale, "must be >= 0")
        require(0.0 <= p.forward_floor < 1.0, "process.forward_floor", p.forward_floor, "must be in [0, 1)")
        require(p.forward_floor == 0.0 or p.method == "fldd", "process.forward_floor", p.forward_floor,
                "applies to the learned general forward (process.method=fldd) only")
        require(0.0 < p.warm_start_floor < 1.0, "process.warm_start_floor", p.warm_start_floor, "must be in (0, 1)")
        # name what "auto" resolved to, or the message contradicts the config the user wrote
        start = (f"process.warm_start=auto means {self.resolved_warm_start!r} at T={p.num_steps}"
                 if p.warm_start == "auto" else f"process.warm_start={p.warm_start!r}")
        if p.method == "fldd" and self.resolved_warm_start == "masked":
            require(self.resolved_prior == "mask", "process.prior", p.prior,
                    f"a masked warm start needs prior='mask' ({start})")
        if p.method == "fldd" and self.resolved_warm_start == "uniform":
            require(self.resolved_prior == "uniform", "process.prior", p.prior,
                    f"a uniform warm start needs prior='uniform' ({start})")
        for name, net in (("reverse_network", self.reverse_network), ("forward_network", self.forward_network)):
            require(net.arch in ARCHITECTURES, f"{name}.arch", net.arch, f"must be one of {ARCHITECTURES}")
            require(net.width >= 1, f"{name}.width", net.width, "must be >= 1")
            require(net.depth >= 1, f"{name}.depth", net.depth, "must be >= 1")
            if net.arch == "transformer":
                require(net.heads >= 1 and net.width % net.heads == 0, f"{name}.heads", net.heads,
                        f"must divide width={net.width}")
        require(tr.steps >= 1, "train.steps", tr.steps, "must be >= 1")
        require(tr.batch_size >= 1, "train.batch_size", tr.batch_size, "must be >= 1")
        require(tr.lr > 0, "train.lr", tr.lr, "must be > 0")
        require(tr.forward_lr >= 0, "train.forward_lr", tr.forward_lr, "must be >= 0")
        require(tr.forward_lr_ref_steps >= 0, "train.forward_lr_ref_steps", tr.forward_lr_ref_steps, "must be >= 0")
        require(tr.grad_clip > 0, "train.grad_clip", tr.grad_clip, "must be > 0")
        require(tr.grad_clip_mode in CLIP_MODES, "train.grad_clip_mode", tr.grad_clip_mode, f"must be one of {CLIP_MODES}")
        require(0.0 <= tr.lr_decay_fraction <= 1.0, "train.lr_decay_fraction", tr.lr_decay_fraction, "must be in [0, 1]")
        require(tr.estimator in ESTIMATORS, "train.estimator", tr.estimator, f"must be one of {ESTIMATORS}")
        require(tr.num_zt_samples >= 1, "train.num_zt_samples", tr.num_zt_samples, "must be >= 1")
        if tr.estimator == "loo":
            require(tr.num_zt_samples >= 2, "train.num_zt_samples", tr.num_zt_samples,
                    "leave-one-out needs M >= 2 samples of z_t per (x, t)")
        require(tr.grad_accum_steps >= 1, "train.grad_accum_steps", tr.grad_accum_steps, "must be >= 1")
        require(tr.checkpoint_every >= 1, "train.checkpoint_every", tr.checkpoint_every, "must be >= 1")
        micro = tr.num_zt_samples * tr.grad_accum_steps
        require(tr.batch_size % micro == 0, "train.batch_size", tr.batch_size,
                f"must be a multiple of train.num_zt_samples x train.grad_accum_steps = {micro}")
        require(0.0 < tr.ema_decay < 1.0, "train.ema_decay", tr.ema_decay, "must be in (0, 1)")
        require(tr.forward_freeze_fraction == "auto" or (isinstance(tr.forward_freeze_fraction, (int, float))
                                                         and not isinstance(tr.forward_freeze_fraction, bool)
                                                         and 0.0 <= tr.forward_freeze_fraction < 1.0),
                "train.forward_freeze_fraction", tr.forward_freeze_fraction, "must be in [0, 1) or 'auto'")
        require(tr.concrete_warmup_steps >= 0, "train.concrete_warmup_steps", tr.concrete_warmup_steps, "must be >= 0")
        require(0 < tr.tau_end <= tr.tau_start, "train.tau_end", tr.tau_end, "need 0 < tau_end <= tau_start")
        require(tr.log_every >= 1, "train.log_every", tr.log_every, "must be >= 1")
        require(tr.eval_every >= 0, "train.eval_every", tr.eval_every, "must be >= 0")
        d = self.data
        require(d.vocab_size >= 0, "data.vocab_size", d.vocab_size, "must be >= 0 (0: from the table)")
        require(0.0 < d.valid_fraction < 1.0, "data.valid_fraction", d.valid_fraction, "must be in (0, 1)")
        require(d.num_train >= 1 and d.num_valid >= 1, "data.num_train", d.num_train, "both splits need rows")
        return self

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """{"process.num_steps": 2, ...}: the dotted keys that --set and MLflow params use."""
        return flatten_dict(self.to_dict())

    def resolved_flat_dict(self) -> dict[str, Any]:
        """to_flat_dict with every "auto" replaced by what it means here, so that "auto" and the value it
        resolves to compare equal (resume checks, checkpoint checks). The warm start and the prior are the
        general learned forward's alone: for other methods they mean nothing and are left out."""
        flat = self.to_flat_dict()
        general = self.process.method == "fldd"
        flat["process.prior"] = self.resolved_prior if general else None
        flat["process.warm_start"] = self.resolved_warm_start if general else None
        flat["train.forward_freeze_fraction"] = self.resolved_freeze_fraction if self.learns_forward else None
        return flat

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FLDDConfig:
        return _build(cls, data, prefix="").validate()

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> FLDDConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def with_parameterization(self, name: str) -> FLDDConfig:
        """This config with a PARAMETERIZATIONS preset applied (e.g. "masked-x0"), re-validated."""
        if name not in PARAMETERIZATIONS:
            raise ConfigError(f"parameterization={name!r}: must be one of {tuple(PARAMETERIZATIONS)}")
        return self.with_overrides(PARAMETERIZATIONS[name])

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> FLDDConfig:
        """Apply `key.sub=value` overrides (values parsed as YAML scalars) and re-validate."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config key {key!r}")
                node = node[part]
            if leaf not in node or isinstance(node[leaf], dict):
                raise ConfigError(f"unknown config key {key!r}")
            node[leaf] = value
        return FLDDConfig.from_dict(data)


# The repository's YAML presets (toy2d, digits, text, sweep-*, serve): `--config NAME` names one
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data; `configs/` in a checkout links here


def resolve_config(path: str | None) -> FLDDConfig:
    """A YAML path, or the name of a preset in configs/ (e.g. `toy2d`)."""
    if path is None:
        return FLDDConfig.from_yaml(CONFIG_DIR / "toy2d.yaml")
    candidate = Path(path)
    if not candidate.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        candidate = CONFIG_DIR / f"{path}.yaml"
    return FLDDConfig.from_yaml(candidate)


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build a (nested) dataclass from a dict, rejecting unknown keys and mistyped values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, kind: type, name: str) -> Any:
    if kind == float | str:  # a number, or a word such as "auto" that validate() checks
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}={value!r}: expected a number or a word such as 'auto'")
        try:
            return float(value)
        except ValueError:
            return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}={value!r}: expected {kind.__name__}")
    return value
