"""One typed, validated configuration for a model and its training run.

The same object is serialised into checkpoints (as a plain dict), into YAML files and, later, into
MLflow params. The sections are pydantic models, checked when they are built; from_dict, from_yaml,
with_overrides and validate() report the first problem as a ConfigError naming the dotted field and
its value (`train.lr=0: must be greater than 0`). Assigning to a field is not checked: validate() is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

# warm_start "auto": a random start up to this T, the masked warm start above it. Chosen on
# validation (toy2d, selection seeds 0-2): a random start won at T=2 and collapsed at T=4, 8, 16,
# where the masked warm start won; the reference script collapses from a random start at T=4 too
# (docs/training_recipe.md). Measured on toy2d only (D=2, MLP networks): the D=64 presets keep the
# masked warm start at every T, and a new data set should be checked the same way before using auto.
AUTO_RANDOM_START_MAX_T = 2
# forward_freeze_fraction "auto": no reverse-only phase for a random start (with one it collapsed),
# this much for a warm start or a learned masking order (without one the masked warm start collapsed)
AUTO_FREEZE_FRACTION = 0.3
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


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads "1e-3" as a string: such a string is the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# strict: no bool or "12" read as an int, no number read as a string; a float also takes an int
Float = Annotated[float, BeforeValidator(_yaml_float)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[Float, Field(gt=0, lt=1)]


class _Section(BaseModel):
    """A config section: strict types, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ProcessConfig(_Section):
    """The forward (noising) process and its step budget."""

    method: Literal["fldd", "fldd-mask", "masked", "uniform"] = "fldd"
    num_steps: Positive = 2  # T: sampling costs exactly T reverse-network calls
    # For method=fldd. These library defaults keep the masked warm start + reverse-first schedule,
    # which the D=64 presets (digits, text) need; the toy2d preset uses a random start, which won on
    # validation at T=2 there but collapsed at T=8 (docs/training_recipe.md).
    # uniform over K, or a point mass on an extra MASK token; auto: the one the warm start needs
    # (mask for a masked warm start, else uniform, the paper's setting for a random start)
    prior: Literal["auto", "uniform", "mask"] = "auto"
    # none (random init) | masked | uniform: start u(x,t) at a fixed marginal | auto: none at
    # T <= AUTO_RANDOM_START_MAX_T, masked above (see resolved_warm_start)
    warm_start: Literal["none", "masked", "uniform", "auto"] = "masked"
    warm_start_floor: Fraction = 1e-3  # eps in (1-eps)*ubar + eps/S before the log
    # scale of the learned forward's initial logits: a near-uniform random start carries no
    # information about x and sits at the collapsed saddle (spec section 5b)
    forward_init_scale: Annotated[Float, Field(ge=0)] = 1.0
    # method=fldd: u(x,t) = (1 - eps) softmax(f) + eps / S for 0<t<T, so every state stays reachable.
    # It does not revive a saturated softmax's gradient (the floor is mixed in after it); measured in
    # docs/training_recipe.md ("A floor on u"). 0: none, the default.
    forward_floor: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    schedule: Literal["linear", "cosine"] = "linear"  # alpha_t for fixed processes and warm starts
    # How the reverse network's output becomes p(z_s | z_t): "direct" (spec section 3; the only
    # choice for a learned forward, whose q(x | z_t) is not factorized) or "x0" for the fixed
    # processes: the network predicts x and p(z_s|z_t) = sum_x q(z_s|z_t,x) p(x|z_t) per position
    # (MDLM's parameterization for masked). A stronger fixed baseline at large T. "carry-over" for
    # masking-only forwards (masked, fldd-mask): direct, but revealed tokens are kept exactly.
    reverse_parameterization: Literal["direct", "x0", "carry-over"] = "direct"


class NetworkConfig(_Section):
    """A time-conditioned network over positions (the reverse, or the learned forward)."""

    arch: Literal["transformer", "mlp"] = "mlp"  # the MLP flattens all positions; for tiny D
    width: Positive = 256
    depth: Positive = 2
    heads: int = 4  # transformer only: must divide width


class TrainConfig(_Section):
    steps: Positive = 2000
    batch_size: Positive = 256  # (x, z_t) pairs per step: the reverse network's batch
    lr: Annotated[Float, Field(gt=0)] = 1e-3  # reverse network
    forward_lr: Annotated[Float, Field(ge=0)] = 3e-4  # learned forward network (at T <= forward_lr_ref_steps)
    # Above this many steps T the forward learning rate shrinks as forward_lr * (ref/T)^2: the
    # REINFORCE signal per marginal thins out with T, and at 3e-4 toy2d T=16 drifted off its warm
    # start and collapsed on 1 of 3 seeds (docs/training_recipe.md). 0: forward_lr at every T.
    forward_lr_ref_steps: NonNegative = 4
    weight_decay: Float = 0.0
    grad_clip: Annotated[Float, Field(gt=0)] = 1.0  # max gradient norm
    # joint: one norm over both networks (the reference script's habit, and the setting with which
    # a random start reached the reference on toy2d: docs/training_recipe.md). per-network: each
    # network clipped on its own, so a spike in the forward's noisy score-function gradient does not
    # shrink the reverse update.
    grad_clip_mode: Literal["joint", "per-network"] = "joint"
    # linear learning-rate decay to 0 over the last fraction of the steps (both networks); 0: constant
    lr_decay_fraction: Annotated[Float, Field(ge=0, le=1)] = 0.2
    # REINFORCE baseline: loo (leave-one-out over M z_t) | ema (per t)
    estimator: Literal["loo", "ema"] = "loo"
    num_zt_samples: Positive = 2  # M: z_t samples per (x, t) for loo; batch_size/M distinct x per step
    ema_decay: Fraction = 0.99
    # train the reverse alone for this fraction of steps; "auto": 0 for a random start, else
    # AUTO_FREEZE_FRACTION (see FLDDConfig.resolved_freeze_fraction)
    forward_freeze_fraction: float | Literal["auto"] = 0.3
    concrete_warmup_steps: NonNegative = 0  # relaxed (Concrete) warm-up; off by default (spec 5b)
    tau_start: Float = 1.0
    tau_end: Annotated[Float, Field(gt=0)] = 1e-3  # <= tau_start
    grad_accum_steps: Positive = 1  # micro-batches per optimizer step (batch_size is split into them)
    log_every: Positive = 100
    eval_every: NonNegative = 0  # 0: evaluate only at the end
    checkpoint_every: Positive = 500  # distributed runs: checkpoint (and validate) every N steps, and at the end
    seed: int = 0
    # start from a trained model (a run id, runs:/..., models:/NAME@ALIAS or a model.pt path): its
    # reverse weights, with this config's forward starting exactly at its fixed marginals
    # (FLDDModel.init_from); "" trains from random weights
    init_from: str = ""

    @field_validator("forward_freeze_fraction", mode="before")
    @classmethod
    def _fraction_or_auto(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("expected a number or a word such as 'auto'")
        value = _yaml_float(value)
        if value == "auto" or (not isinstance(value, str) and 0 <= value < 1):
            return value
        raise ValueError("must be in [0, 1) or 'auto'")


class DataConfig(_Section):
    name: str = "toy2d"  # built-in data set, used when `path` is empty
    num_train: Positive = 20000  # built-in data sets: rows generated per split (both splits need rows)
    num_valid: Positive = 2000
    seed: int = 0
    path: str = ""  # a Parquet token table (file or directory); with train.parquet + valid.parquet inside
    column: str = "tokens"  # its fixed-length integer list column
    vocab_size: NonNegative = 0  # a table without vocabulary metadata: its vocabulary (0: largest token + 1)
    valid_fraction: Fraction = 0.1  # held out when `path` has no valid.parquet (rows split with data.seed)


class FLDDConfig(_Section):
    seq_len: NonNegative = 0  # D; 0: from the data (fldd.data.resolve_data_shape)
    vocab_size: int = 0  # K >= 2 (data tokens; MASK, when used, is the extra state K); 0: from the data
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    reverse_network: NetworkConfig = Field(default_factory=NetworkConfig)
    forward_network: NetworkConfig = Field(default_factory=NetworkConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)

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
    @field_validator("vocab_size")
    @classmethod
    def _two_tokens_or_from_data(cls, value: int) -> int:
        if value == 1 or value < 0:
            raise ValueError("must be >= 2 (or 0: from the data)")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> FLDDConfig:
        """The checks that involve more than one field (each field's own type and bounds are declared)."""
        def require(ok: bool, name: str, value: Any, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={value!r}: {why}")

        p, tr = self.process, self.train
        require(p.reverse_parameterization != "carry-over" or p.method in ("masked", "fldd-mask"),
                "process.reverse_parameterization", p.reverse_parameterization,
                "'carry-over' needs a masking-only forward (masked or fldd-mask): others change revealed tokens")
        require(p.reverse_parameterization == "direct" or tr.concrete_warmup_steps == 0,
                "process.reverse_parameterization", p.reverse_parameterization,
                "takes hard z_t only: set train.concrete_warmup_steps=0")
        require(p.reverse_parameterization != "x0" or p.method in ("masked", "uniform"),
                "process.reverse_parameterization", p.reverse_parameterization,
                "'x0' needs a fixed forward (masked or uniform): a learned forward's q(x | z_t) is not factorized")
        require(p.forward_floor == 0.0 or p.method == "fldd", "process.forward_floor", p.forward_floor,
                "applies to the learned general forward (process.method=fldd) only")
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
            if net.arch == "transformer":
                require(net.heads >= 1 and net.width % net.heads == 0, f"{name}.heads", net.heads,
                        f"must divide width={net.width}")
        if tr.estimator == "loo":
            require(tr.num_zt_samples >= 2, "train.num_zt_samples", tr.num_zt_samples,
                    "leave-one-out needs M >= 2 samples of z_t per (x, t)")
        micro = tr.num_zt_samples * tr.grad_accum_steps
        require(tr.batch_size % micro == 0, "train.batch_size", tr.batch_size,
                f"must be a multiple of train.num_zt_samples x train.grad_accum_steps = {micro}")
        require(tr.tau_end <= tr.tau_start, "train.tau_end", tr.tau_end, "need 0 < tau_end <= tau_start")
        return self

    def validate(self) -> FLDDConfig:  # type: ignore[override]  # pydantic v1's deprecated classmethod
        """Check the config again, for fields assigned after it was built; returns self."""
        FLDDConfig.from_dict(self.model_dump(warnings=False))  # a wrong type assigned: ConfigError, no warning
        return self

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

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
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise _config_error(error) from None

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


def _config_error(error: ValidationError) -> ConfigError:
    """pydantic's first problem as `dotted.field=value: why` (an unknown key first, as `unknown config
    key 'train.lrr'`); a cross-field check's ConfigError as it was raised."""
    problem = min(error.errors(), key=lambda p: p["type"] != "extra_forbidden")
    cause = problem.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    *parents, leaf = [str(part) for part in problem["loc"]] or ["config"]
    name = ".".join([*parents, leaf])
    if problem["type"] == "extra_forbidden":
        section: type[BaseModel] = FLDDConfig
        for part in parents:
            section = section.model_fields[part].annotation
        return ConfigError(f"unknown config key {name!r} (known: {sorted(section.model_fields)})")
    why = str(cause) if cause is not None else problem["msg"].replace("Input should be", "must be")
    return ConfigError(f"{name}={problem['input']!r}: {why}")
