"""The one training loop. Framework-free: Ray Train's worker function wraps this same loop.

Schedule of a run (spec section 5b): an optional reverse-only phase (forward frozen), an optional
Concrete warm-up (relaxed z_t, tau annealed geometrically), then exact REINFORCE training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fldd.config import ConfigError, FLDDConfig, TrainConfig
from fldd.data import infinite_batches, resolve_data_shape
from fldd.model import CollapseReport, FLDDModel
from fldd.objective import NELBOEstimate, evaluate_nelbo

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient became NaN or inf; the message names the step and the term."""


@dataclass(frozen=True)
class Phase:
    name: str  # reverse-only | concrete-warmup | reinforce
    train_forward: bool
    tau: float | None  # Concrete temperature, None for exact discrete z_t


class TrainSchedule:
    """Where the phases of a run begin and end. The boundaries are fixed when the run starts: a run
    resumed with a larger `train.steps` passes the `boundaries()` saved in its checkpoint, else the
    reverse-only phase (a fraction of the *new* total) would move under it."""

    def __init__(self, cfg: TrainConfig, learns_forward: bool, boundaries: dict[str, int] | None = None,
                 freeze_fraction: float | None = None):
        """`freeze_fraction`: the reverse-only fraction with "auto" resolved
        (FLDDConfig.resolved_freeze_fraction); needed when cfg.forward_freeze_fraction is "auto"."""
        self.learns_forward = learns_forward
        fraction = cfg.forward_freeze_fraction if freeze_fraction is None else freeze_fraction
        if isinstance(fraction, str):
            raise ValueError(f"train.forward_freeze_fraction={fraction!r}: pass freeze_fraction, resolved by "
                             "FLDDConfig.resolved_freeze_fraction")
        self.freeze_steps = int(fraction * cfg.steps) if learns_forward else 0
        self.warmup_steps = cfg.concrete_warmup_steps if learns_forward else 0
        if boundaries is not None and learns_forward:
            self.freeze_steps, self.warmup_steps = int(boundaries["freeze_steps"]), int(boundaries["warmup_steps"])
        self.tau_start, self.tau_end = cfg.tau_start, cfg.tau_end
        self.total_steps, self.decay_fraction = cfg.steps, cfg.lr_decay_fraction

    def lr_factor(self, step: int) -> float:
        """The learning rates' multiplier at `step`: 1, then linear to 0 over the last decay_fraction
        of `train.steps` (the last step still moves, by 1 / decay_steps of the full rate), never
        below 0. The decay follows the run's current `train.steps`: a finished run resumed with more
        steps trains at the full rate again and decays again before its new end."""
        decay_steps = self.decay_fraction * self.total_steps
        if decay_steps <= 0:
            return 1.0
        return max(0.0, min(1.0, (self.total_steps - step) / decay_steps))

    def boundaries(self) -> dict[str, int]:
        """What a checkpoint stores: the last reverse-only step + 1 (the warm-up's start) and the warm-up length."""
        return {"freeze_steps": self.freeze_steps, "warmup_steps": self.warmup_steps}

    def phase(self, step: int) -> Phase:
        if not self.learns_forward:
            return Phase("fixed-forward", False, None)
        if step < self.freeze_steps:
            return Phase("reverse-only", False, None)
        warm = step - self.freeze_steps
        if warm < self.warmup_steps:
            frac = warm / max(self.warmup_steps - 1, 1)
            return Phase("concrete-warmup", True, self.tau_start * (self.tau_end / self.tau_start) ** frac)
        return Phase("reinforce", True, None)


def build_optimizer(model: FLDDModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with separate learning rates for the reverse and the learned forward network (the
    latter scaled for the model's T: FLDDConfig.forward_lr)."""
    groups = [{"params": model.reverse_parameters(), "lr": cfg.lr, "name": "reverse"}]
    if model.forward_parameters():
        groups.append({"params": model.forward_parameters(), "lr": model.config.forward_lr, "name": "forward"})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:  # what TrainSchedule.lr_factor multiplies
        group["base_lr"] = group["lr"]
    return optimizer


def _check_finite(out: dict[str, Tensor], step: int) -> None:
    finite = bool(torch.isfinite(out["loss"]))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # collective: every rank stops at the same step, so none waits forever in an all-reduce
        flag = torch.tensor(float(finite), device=out["loss"].device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() < 1 and finite:
            raise NonFiniteLossError(f"non-finite loss on another worker at step {step}")
        finite = flag.item() >= 1
    if finite:
        return
    bad = [name for name, value in out.items() if name != "loss" and not torch.isfinite(value).all()]
    raise NonFiniteLossError(f"non-finite loss at step {step}: term(s) {bad or ['loss']} are NaN/inf "
                             f"({ {k: float(v) for k, v in out.items() if v.numel() == 1} })")


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, mode: str = "joint") -> dict[str, float]:
    """Clip the gradient of both networks together ("joint") or of each network (each optimizer
    group: reverse, forward) on its own ("per-network") to `max_norm`.

    Joint (the default, as in the reference script) shrinks the forward's step whenever the reverse
    gradient is large; per-network keeps a spike in the forward's noisy score-function gradient
    from shrinking the reverse update. Returns the norms before clipping: "grad_norm_<group>" per
    network and "grad_norm" for both together.
    """
    norms = {f"grad_norm_{group.get('name', index)}": float(torch.linalg.vector_norm(torch.stack(
                [p.grad.detach().norm() for p in group["params"] if p.grad is not None] or [torch.zeros(())])))
             for index, group in enumerate(optimizer.param_groups)}
    total = math.sqrt(sum(norm ** 2 for norm in norms.values()))
    if mode == "joint":
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
    elif mode == "per-network":
        for group in optimizer.param_groups:
            nn.utils.clip_grad_norm_(group["params"], max_norm)
    else:
        raise ValueError(f"clip mode {mode!r}: expected 'joint' or 'per-network'")
    return {**norms, "grad_norm": total}


def train_loop(model: nn.Module, batches: Iterator[Tensor], optimizer: torch.optim.Optimizer, *,
               num_steps: int, schedule: TrainSchedule, start_step: int = 0, grad_clip: float = 1.0,
               grad_clip_mode: str = "joint",
               log_every: int = 100, on_metrics: MetricsCallback | None = None,
               checkpoint_every: int = 0, on_checkpoint: Callable[[int], None] | None = None,
               eval_every: int = 0, evaluate: Callable[[int], dict[str, float]] | None = None,
               information_batch: Callable[[], Tensor] | None = None,
               accumulation_steps: int = 1, autocast_dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Run steps [start_step, num_steps). `model` is an FLDDModel (or a DDP wrapper of one) whose
    forward returns {"loss": ...}; `batches` yields micro-batches, `accumulation_steps` per step.
    `autocast_dtype` (e.g. bfloat16 on GPU) runs the networks in reduced precision; the posterior
    and the KL stay in fp32. Callbacks receive the 1-based count of finished steps; `on_step` is
    called after every step (a progress bar), the others at their intervals.
    Returns the last logged metrics."""
    core: FLDDModel = getattr(model, "module", model)
    device_type = torch.device(device).type
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # per key: some statistics exist only in some phases
    count, last_metrics, tick = 0, {}, time.perf_counter()
    collapse_warned = saturation_warned = False
    for group in optimizer.param_groups:  # an optimizer not made by build_optimizer: its rates are the base
        group.setdefault("base_lr", group["lr"])
    model.train()
    for step in range(start_step, num_steps):
        phase = schedule.phase(step)
        lr_factor = schedule.lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulation_steps):
            x = next(batches).to(device, non_blocking=True)
            # DDP: all-reduce gradients only on the last micro-batch
            sync = contextlib.nullcontext() if micro == accumulation_steps - 1 or not hasattr(model, "no_sync") \
                else model.no_sync()
            with sync, torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                      enabled=autocast_dtype is not None):
                out = model(x, train_forward=phase.train_forward, tau=phase.tau)
                _check_finite(out, step)
                (out["loss"] / accumulation_steps).backward()
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / accumulation_steps
        grad_norms = clip_gradients(optimizer, grad_clip, grad_clip_mode)
        if not phase.train_forward:
            grad_norms.pop("grad_norm_forward", None)  # frozen: no gradient to report
        if not all(math.isfinite(norm) for norm in grad_norms.values()):
            raise NonFiniteLossError(f"non-finite gradient norm at step {step} (phase {phase.name}): {grad_norms}")
        optimizer.step()
        for name, norm in grad_norms.items():
            sums[name] = sums.get(name, 0.0) + norm
        for name in (*out, *grad_norms):
            counts[name] = counts.get(name, 0) + 1
        count += 1
        done = step + 1
        if on_step is not None:
            on_step(done)
        if done % log_every == 0 or done == num_steps:
            elapsed = time.perf_counter() - tick
            metrics = {name: total / counts[name] for name, total in sums.items()}
            metrics.update(steps_per_second=count / elapsed, forward_trained=float(phase.train_forward))
            if information_batch is not None and core.forward_process.learned and core.num_steps > 1:
                bits, entropy = core.forward_statistics(information_batch().to(device))
                retained = (bits[1:core.num_steps] / bits[0].clamp_min(1e-12)).max().item()
                entropy_min = entropy[1:core.num_steps].min().item()
                metrics.update(information_retained_max=retained, forward_entropy_min=entropy_min)
                if retained < 0.01 and phase.train_forward and not collapse_warned:
                    log.warning("step %d: the forward process is collapsing (max retained information %.4f)",
                                done, retained)
                    collapse_warned = True
                floor = core.forward_process.entropy_floor_bits
                if core.forward_process.saturable and entropy_min < floor + 0.01 and phase.train_forward \
                        and not saturation_warned:
                    log.warning("step %d: the forward process is saturating (u(x,t) one-hot at some 0<t<T: "
                                "mean entropy %.2e bits; its gradient there is zero)", done, entropy_min)
                    saturation_warned = True
            if on_metrics is not None:
                on_metrics(done, {**metrics, "phase": phase.name})
            last_metrics = metrics
            sums, counts, count, tick = {}, {}, 0, time.perf_counter()
        if evaluate is not None and eval_every and done % eval_every == 0 and done != num_steps:
            scores = evaluate(done)
            if on_metrics is not None:
                on_metrics(done, scores)
        if on_checkpoint is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == num_steps):
            on_checkpoint(done)
    return last_metrics


# every validation estimate that compares checkpoints of one run (fit's evaluations, fldd train's
# checkpoints) draws the same random numbers: the comparison is between models, not noise draws
CHECKPOINT_EVAL_SEED = 0


@dataclass
class FitResult:
    model: FLDDModel
    valid_nelbo: NELBOEstimate
    collapse: CollapseReport | None
    best_step: int  # the step whose weights `model` holds: the last, or the best with keep_best
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def fit(cfg: FLDDConfig, train_data: Tensor, valid_data: Tensor, *, on_metrics: MetricsCallback | None = None,
        eval_passes: int = 10, device: torch.device | str = "cpu", keep_best: bool = False) -> FitResult:
    """Train a model on in-memory data with the one loop; evaluate on the validation split. A config
    whose seq_len or vocab_size is 0 takes them from the data its `data` section names.

    Every `train.eval_every` steps the validation NELBO is estimated with the same random numbers
    each time, so the curve compares models, not noise draws. With `keep_best` the last step is
    evaluated the same way and the returned model is the one with the lowest of these estimates
    (`FitResult.best_step`), as `fldd train` keeps its best checkpoint; otherwise it is the last."""
    cfg.validate()
    if keep_best and not cfg.train.eval_every:
        raise ConfigError("keep_best needs train.eval_every > 0: without evaluations during training "
                          "there is nothing to choose from but the last step")
    if not (cfg.seq_len and cfg.vocab_size):
        cfg = resolve_data_shape(cfg)[0]
    if train_data.dim() != 2 or train_data.shape[1] != cfg.seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} (from {cfg.data.path or cfg.data.name}), but train_data has shape "
                          f"{tuple(train_data.shape)}: the config's data section must describe the tensors given")
    if cfg.train.init_from:  # a run id or registry URI means MLflow, which this package never imports
        raise ConfigError(f"train.init_from={cfg.train.init_from!r}: applied by pipelines.train.launch (fldd train "
                          "--init-from); with fit(), load the source and call FLDDModel.init_from yourself")
    torch.manual_seed(cfg.train.seed)
    model = FLDDModel(cfg).to(device)
    optimizer = build_optimizer(model, cfg.train)
    batch_generator = torch.Generator().manual_seed(cfg.train.seed)
    batches = infinite_batches(train_data, cfg.rows_per_micro_batch(), batch_generator)
    probe = valid_data[:1024]
    history: list[dict] = []

    def record(step: int, metrics: dict) -> None:
        history.append({"step": step, **metrics})
        if on_metrics is not None:
            on_metrics(step, metrics)

    best: dict[str, Any] = {"bits": math.inf, "step": None, "state": None}  # with keep_best

    def evaluate(step: int) -> dict[str, float]:
        # its own generator (drawing from the global RNG would make eval_every change the training),
        # seeded the same at every step: common random numbers across checkpoints
        estimate = evaluate_nelbo(model, valid_data, num_passes=2,
                                  generator=torch.Generator(device=device).manual_seed(CHECKPOINT_EVAL_SEED))
        model.train()
        if keep_best and estimate.bits_per_token < best["bits"]:
            state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            best.update(bits=estimate.bits_per_token, step=step, state=state)
        return {"valid_nelbo_bits": estimate.bits_per_token}

    start = time.perf_counter()
    train_loop(model, batches, optimizer, num_steps=cfg.train.steps,
               schedule=TrainSchedule(cfg.train, cfg.learns_forward, freeze_fraction=cfg.resolved_freeze_fraction),
               grad_clip=cfg.train.grad_clip,
               grad_clip_mode=cfg.train.grad_clip_mode,
               log_every=cfg.train.log_every, on_metrics=record, eval_every=cfg.train.eval_every,
               evaluate=evaluate, information_batch=lambda: probe,
               accumulation_steps=cfg.train.grad_accum_steps, device=device)
    train_seconds = time.perf_counter() - start
    best_step = cfg.train.steps
    if keep_best:
        record(cfg.train.steps, evaluate(cfg.train.steps))  # the last step is a candidate too
        if best["state"] is None:
            raise NonFiniteLossError("keep_best: every validation evaluation was non-finite")
        best_step = best["step"]
        model.load_state_dict(best["state"])
    model.eval()
    nelbo = evaluate_nelbo(model, valid_data, num_passes=eval_passes,
                           generator=torch.Generator(device=device).manual_seed(cfg.train.seed))
    collapse = model.check_collapse(probe.to(device)) if cfg.learns_forward else None
    return FitResult(model, nelbo, collapse, best_step, history, train_seconds)

