"""The FLDD model object: config + forward process + reverse network, saved as state dict + config."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fldd.codec import TokenCodec
from fldd.config import ConfigError, FLDDConfig
from fldd.forward import LOG_ZERO, ForwardProcess, build_forward_process, safe_log
from fldd.networks import TokenNetwork
from fldd.objective import leave_one_out_baseline, training_loss
from fldd.posterior import coupling_parts
from fldd.tokens import check_tokens

log = logging.getLogger(__name__)

# 2: time enters the networks through per-step tables (issue 23); format 1 weights do not fit
CHECKPOINT_FORMAT = "fldd-model/2"
# config sections that define the parameters; train/data settings may differ between runs
MODEL_DEFINING_KEYS = ("seq_len", "vocab_size", "process", "reverse_network", "forward_network")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, malformed, or does not match the expected model."""


class ForwardCollapseWarning(UserWarning):
    """Every interior z_t carries ~no information about x: the T-step model degenerated to T=1."""


@dataclass
class CollapseReport:
    """What z_t carries about x, per step, and the two ways a learned forward dies.

    collapsed: every interior step is *uninformative* (z_t independent of x); the T-step model
    samples like a 1-step model. saturated (a learned general forward only): some interior step is
    *deterministic* (u(x,t) one-hot for every x, or as close as process.forward_floor allows); its
    softmax is dead, the forward's gradient there is ~zero (every sample of z_t is the same, and a
    saturated softmax passes no pathwise gradient; a floor mixed in after the softmax does not
    change that), so that step can never change again, informative or not. A masking forward's
    deterministic reveal order is not reported: it is a valid solution, not a dead softmax.
    """

    information_bits: list[float]  # t = 0..T: mean over positions of I(x; z_t^i), in bits
    retained_fraction: list[float]  # information_bits[t] / information_bits[0]
    collapsed: bool
    threshold: float
    entropy_bits: list[float] = field(default_factory=list)  # t = 0..T: mean over x and positions of H[u^i(x,t)]
    saturated: bool = False
    saturation_threshold: float = 0.01  # bits

    def __str__(self) -> str:
        steps = ", ".join(f"t={t}: {f:.3f}" for t, f in enumerate(self.retained_fraction))
        state = "COLLAPSED" if self.collapsed else "ok"
        text = f"forward process {state}; information retained per step ({steps})"
        if self.entropy_bits:
            entropy = ", ".join(f"t={t}: {h:.3f}" for t, h in enumerate(self.entropy_bits))
            text += f"; entropy of u(x,t) in bits ({entropy})" + ("; SATURATED" if self.saturated else "")
        return text


class FLDDModel(nn.Module):
    """Forward process u_phi (training only) + reverse network v_theta (training and sampling)."""

    def __init__(self, config: FLDDConfig, codec: TokenCodec | None = None):
        super().__init__()
        self.config = config.validate()
        if not (config.seq_len and config.vocab_size):
            raise ConfigError(f"seq_len={config.seq_len}, vocab_size={config.vocab_size}: 0 means 'from the data'; "
                              "resolve the config first (fldd.data.resolve_data_shape)")
        self.codec = codec  # how token ids read back as text or table rows (None: plain ids)
        self.num_steps = config.process.num_steps
        self.num_states = config.num_states
        self.mask_id = config.vocab_size if config.uses_mask_state else None
        self.forward_process: ForwardProcess = build_forward_process(config)
        self.reverse = TokenNetwork(config.reverse_network, seq_len=config.seq_len, num_inputs=self.num_states,
                                    num_outputs=self.num_states, num_steps=self.num_steps, time_in_trunk=True)
        T = self.num_steps
        self.register_buffer("baseline_ema", torch.zeros(T + 1))  # REINFORCE EMA baseline per t
        self.register_buffer("baseline_seen", torch.zeros(T + 1, dtype=torch.bool))
        self.register_buffer("information_bits", torch.zeros(T + 1))  # last collapse check
        self.register_buffer("collapsed", torch.tensor(False))

    @property
    def samples_per_x(self) -> int:
        return self.config.samples_per_x

    def forward_parameters(self) -> list[nn.Parameter]:
        return list(self.forward_process.parameters())

    def reverse_parameters(self) -> list[nn.Parameter]:
        return list(self.reverse.parameters())

    # ---- starting from a trained model -----------------------------------------------------
    def init_from(self, source: FLDDModel) -> None:
        """Copy a trained model's reverse weights into this untrained one, so that at step 0 this
        model *is* the source: same reverse network, and a forward process whose starting marginals
        equal the source's (a learned masking forward starts on the linear masked schedule; a learned
        general forward with a zero-scale warm start on its warm-start process). Raises ConfigError
        naming the first field that makes the two differ."""
        reason = init_mismatch(self.config, source.config)
        if reason:
            raise ConfigError(f"train.init_from: {reason}")
        self.reverse.load_state_dict(source.reverse.state_dict())

    # ---- reverse process -----------------------------------------------------------------
    def reverse_log_probs(self, z_t: Tensor, t: Tensor) -> Tensor:
        """log p_theta(z_s | z_t) per position: (B, D) states or (B, D, S) soft one-hot -> (B, D, S).

        At t = 1 the MASK logit is removed, so no mass can land on MASK at z_0.
        """
        parameterization = self.config.process.reverse_parameterization
        if parameterization != "direct" and z_t.dim() == 3:
            raise ValueError(f"the {parameterization} parameterization takes hard states z_t (no relaxed warm-up)")
        logits = self.reverse(z_t, t)
        if parameterization == "x0":
            return self.x0_reverse_log_probs(torch.log_softmax(logits[..., :self.config.vocab_size], dim=-1), z_t, t)
        if self.mask_id is not None:
            is_mask = torch.arange(self.num_states, device=logits.device) == self.mask_id
            logits = torch.where((t == 1)[:, None, None] & is_mask, LOG_ZERO, logits)
        log_p = torch.log_softmax(logits, dim=-1)
        if parameterization == "carry-over":
            # a masking-only forward never changes a revealed token, so neither does the reverse
            revealed = (z_t != self.mask_id)[..., None]
            keep = torch.nn.functional.one_hot(z_t, self.num_states).to(log_p.dtype)
            log_p = torch.where(revealed, safe_log(keep), log_p)
        return log_p

    def x0_reverse_log_probs(self, log_p_x: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """p(z_s^i | z_t) = sum_c p(x^i = c | z_t) q(z_s^i | z_t^i, x^i = c) for a fixed forward.

        log_p_x: (B, D, K) predicted data tokens; z_t: (B, D) states -> (B, D, S). Fixed marginals
        depend on x^i alone, so the posterior is the per-position max coupling of u(c, s), u(c, t).
        With a point-mass prediction at the true x this is exactly q(z_s | z_t, x).
        """
        K = self.config.vocab_size
        # only the steps this batch is at (a sampling step: one), each token c as a "position"
        steps, which = torch.unique(t, return_inverse=True)
        every_token = torch.arange(K, device=z_t.device).expand(len(steps), K)
        log_u = self.forward_process.log_marginals(every_token, torch.stack([steps, steps - 1], dim=1))  # (U,2,K,S)
        # the coupling's row for z_t = k is stay_k * onehot(k) + (1 - stay_k) * move (posterior.py),
        # gathered per (example, position): building every (t, c, k, j) table instead cost O(T K S^2)
        # per call and T calls per sample (13 ms per step at T=16, K=50; 60x the learned forward's)
        with torch.autocast(device_type=z_t.device.type, enabled=False):  # the posterior stays fp32 or wider
            wide = torch.promote_types(log_u.dtype, torch.float32)
            stay, move = coupling_parts(log_u[:, 1].to(wide), log_u[:, 0].to(wide))  # (U, c, S) each
            p_x = log_p_x.exp().to(stay.dtype)  # (B, D, c)
            stay_here = stay.transpose(1, 2)[which[:, None], z_t]  # (B, D, c): stay_{z_t} given x = c
            moved = torch.einsum("bdc,bcj->bdj", p_x * (1.0 - stay_here), move[which])
            kept = (p_x * stay_here).sum(dim=-1, keepdim=True) * F.one_hot(z_t, self.num_states).to(stay.dtype)
            return safe_log(kept + moved)

    # ---- training ------------------------------------------------------------------------
    def forward(self, x: Tensor, *, train_forward: bool = True, tau: float | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The training loss for a batch of data (B_x, D); returns {"loss": ..., statistics}."""
        check_tokens(x, self.config.vocab_size, self.config.seq_len)
        return training_loss(self, x, train_forward=train_forward, tau=tau, generator=generator)

    def baseline(self, loss: Tensor, t: Tensor) -> Tensor:
        """A REINFORCE baseline that does not depend on the z_t whose loss it is compared with."""
        if self.config.train.estimator == "loo":
            return leave_one_out_baseline(loss, self.samples_per_x)
        # EMA per t, read before this batch updates it
        baseline = torch.where(self.baseline_seen[t], self.baseline_ema[t], torch.zeros_like(loss))
        if self.training:
            self._update_ema(loss, t)
        return baseline

    @torch.no_grad()
    def _update_ema(self, loss: Tensor, t: Tensor) -> None:
        T, decay = self.num_steps, self.config.train.ema_decay
        sums = torch.zeros(T + 1, device=loss.device).index_add_(0, t, loss.float())
        counts = torch.zeros(T + 1, device=loss.device).index_add_(0, t, torch.ones_like(loss, dtype=torch.float))
        present = counts > 0
        batch_mean = sums / counts.clamp_min(1)
        updated = torch.where(self.baseline_seen, decay * self.baseline_ema + (1 - decay) * batch_mean, batch_mean)
        self.baseline_ema.copy_(torch.where(present, updated, self.baseline_ema))
        self.baseline_seen |= present

    # ---- forward-collapse guard ----------------------------------------------------------
    @torch.no_grad()
    def information_per_step(self, x: Tensor) -> Tensor:
        """I(x; z_t^i) in bits, averaged over positions, for t = 0..T, with x uniform over the batch.

        I = H(mean_x u^i(x,t)) - mean_x H(u^i(x,t)): exact for the batch's empirical distribution,
        no sampling. It is 0 exactly when u(x,t) does not depend on x.
        """
        return self.forward_statistics(x)[0]

    @torch.no_grad()
    def forward_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(information, entropy), each (T+1,) in bits, averaged over positions: I(x; z_t^i) as in
        `information_per_step`, and mean_x H[u^i(x,t)], which is 0 exactly when u(x,t) is one-hot."""
        check_tokens(x, self.config.vocab_size, self.config.seq_len)
        D, S = self.config.seq_len, self.num_states
        bits = torch.zeros(self.num_steps + 1)
        entropy = torch.zeros(self.num_steps + 1)
        for t_value in range(self.num_steps + 1):  # per step and in chunks: memory ~ chunk x D x S
            mean_u = torch.zeros(D, S, dtype=torch.float64, device=x.device)
            mean_entropy = torch.zeros(D, dtype=torch.float64, device=x.device)
            for chunk in x.split(256):
                t = torch.full((chunk.shape[0],), t_value, dtype=torch.long, device=x.device)
                u = self.forward_process.log_marginals(chunk, t).double().exp()  # (b, D, S)
                mean_u += u.sum(dim=0) / x.shape[0]
                mean_entropy += _entropy(u).sum(dim=0) / x.shape[0]
            bits[t_value] = ((_entropy(mean_u) - mean_entropy).mean() / math.log(2.0)).clamp_min(0.0)
            entropy[t_value] = mean_entropy.mean() / math.log(2.0)
        return bits, entropy

    @torch.no_grad()
    def reveal_steps(self, x: Tensor) -> Tensor:
        """(B, D): for each example and position, the expected sampling step (1 = the first of T)
        at which x^i is revealed: T - sum_{t=1..T} P(z_t^i = x^i | x).

        Exact for a masking forward, whose paths keep x^i up to the step it is masked and MASK after:
        a position masked at forward step tau (so kept at tau - 1 of the steps 1..T) is revealed by
        the reverse step from tau to tau - 1, the (T + 1 - tau)-th. For other forwards it reads as
        "how late x^i is settled" (z_t^i may leave x^i and come back). A fixed forward gives the
        same value for every x and position: the picture of what a learned one changes."""
        check_tokens(x, self.config.vocab_size, self.config.seq_len)
        T = self.num_steps
        kept = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for t_value in range(1, T + 1):
            t = torch.full((x.shape[0],), t_value, dtype=torch.long, device=x.device)
            u = self.forward_process.log_marginals(x, t).double().exp()  # (B, D, S)
            kept += u.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        return T - kept

    @torch.no_grad()
    def check_collapse(self, x: Tensor, threshold: float = 0.01, saturation_threshold: float = 0.01) -> CollapseReport:
        """Flag the model when every interior step 0 < t < T keeps < `threshold` of the information
        z_0 carries about x (collapsed: a T-step model that samples like a 1-step model while its
        bound looks tight), and report when some interior step's u(x,t) has a mean entropy below
        `saturation_threshold` bits (saturated: a dead softmax, whose gradient is exactly zero).
        """
        bits, entropy = self.forward_statistics(x)
        retained = bits / bits[0].clamp_min(1e-12)
        interior = retained[1:self.num_steps]
        collapsed = bool(interior.numel() > 0 and interior.max().item() < threshold)
        interior_entropy = entropy[1:self.num_steps]
        floor = self.forward_process.entropy_floor_bits  # with process.forward_floor, a one-hot's entropy
        saturated = bool(self.forward_process.saturable and interior_entropy.numel() > 0
                         and interior_entropy.min().item() < floor + saturation_threshold)
        self.information_bits.copy_(bits)
        self.collapsed.fill_(collapsed)
        report = CollapseReport(bits.tolist(), retained.tolist(), collapsed, threshold, entropy.tolist(), saturated,
                                saturation_threshold)
        if collapsed:
            message = (f"FORWARD COLLAPSE: no step 0<t<{self.num_steps} carries information about x "
                       f"(max retained fraction {interior.max().item():.4f} < {threshold}); this "
                       f"{self.num_steps}-step model samples like a 1-step model. {report}")
            log.warning(message)
            warnings.warn(message, ForwardCollapseWarning, stacklevel=3)  # past no_grad's wrapper
        if saturated:
            step = 1 + int(interior_entropy.argmin())
            message = (f"FORWARD SATURATED: u(x,{step}) is one-hot for every x (mean entropy "
                       f"{interior_entropy.min().item():.2e} bits, within {saturation_threshold} of the least "
                       f"possible, {floor:.3g}); its softmax is dead, the forward's gradient there is ~zero and "
                       f"that step can no longer learn. {report}")
            log.warning(message)
            warnings.warn(message, ForwardCollapseWarning, stacklevel=3)
        return report

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        payload = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "state_dict": self.state_dict()}
        if self.codec is not None:
            payload["codec"] = self.codec.to_dict()
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, *, expected_config: FLDDConfig | None = None,
             map_location: str | torch.device = "cpu") -> FLDDModel:
        """Load a saved model (weights_only=True). With `expected_config`, the model-defining
        fields must match, else CheckpointError names the differing ones."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # torch raises several types for corrupt or foreign files
            raise CheckpointError(f"checkpoint {str(path)!r} could not be read: {error}") from error
        if isinstance(payload, dict) and payload.get("format") == "fldd-model/1":
            raise CheckpointError(f"{str(path)!r} was saved by an earlier fldd (format fldd-model/1) whose networks "
                                  f"had another layout; this version reads {CHECKPOINT_FORMAT}: train the model again")
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{str(path)!r} is not an FLDD model checkpoint (format {CHECKPOINT_FORMAT})")
        try:
            config = FLDDConfig.from_dict(payload["config"])
        except ConfigError as error:
            raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {error}") from error
        if expected_config is not None:
            differences = config_differences(expected_config, config)
            if differences:
                raise CheckpointError(f"checkpoint {str(path)!r} does not match the expected config: "
                                      + "; ".join(differences))
        model = cls(config, TokenCodec.from_dict(payload["codec"]) if payload.get("codec") else None)
        model.load_state(payload["state_dict"], source=str(path))
        return model

    def load_state(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own.keys() & state_dict.keys() if state_dict[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{source} does not fit this model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
        self.load_state_dict(state_dict)


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)


def config_differences(expected: FLDDConfig, actual: FLDDConfig) -> list[str]:
    """Model-defining fields whose values differ, as 'field: expected X, found Y'."""
    a, b = expected.resolved_flat_dict(), actual.resolved_flat_dict()  # "auto" == what it means
    model_defining = [k for k in a if k.split(".")[0] in MODEL_DEFINING_KEYS]
    return [f"{k}: expected {a[k]!r}, found {b[k]!r}" for k in model_defining if a[k] != b[k]]


def init_mismatch(target: FLDDConfig, source: FLDDConfig) -> str | None:
    """Why a model of config `target` cannot start as a trained model of config `source` (None: it can)."""
    a, b = target.to_flat_dict(), source.to_flat_dict()
    if target.uses_mask_state != source.uses_mask_state:
        return (f"the latent states differ (a MASK state here: {target.uses_mask_state}, in the source model: "
                f"{source.uses_mask_state}; see process.prior): the reverse network must be the same")
    same = ["seq_len", "vocab_size", "process.num_steps", "process.reverse_parameterization",
            *[k for k in a if k.startswith("reverse_network.")]]
    for key in same:
        if a[key] != b[key]:
            return (f"{key} is {a[key]!r} here but {b[key]!r} in the source model: the reverse network must be the "
                    "same (for fldd-mask-carry, start from masked with process.reverse_parameterization=carry-over)")
    if source.learns_forward:
        return f"the source's forward ({source.process.method}) is learned; start from a fixed-forward baseline"
    p, q = target.process, source.process
    if p.method == "fldd-mask":
        if q.method != "masked" or q.schedule != "linear":
            return (f"a learned masking forward starts on the linear masked schedule; the source is {q.method} with "
                    f"the {q.schedule} schedule")
    elif p.method == "fldd":
        # the warm start floors its fixed marginal at warm_start_floor: only a negligible floor starts *at* it
        warm_start = target.resolved_warm_start
        if warm_start != q.method or p.schedule != q.schedule or p.forward_init_scale != 0 \
                or p.warm_start_floor > 1e-9:
            return (f"a learned forward starts at the source's marginals only with process.warm_start={q.method}, "
                    f"process.schedule={q.schedule}, process.forward_init_scale=0 and process.warm_start_floor "
                    f"<= 1e-9 (found {warm_start}, {p.schedule}, {p.forward_init_scale}, {p.warm_start_floor})")
    elif (p.method, p.schedule) != (q.method, q.schedule):
        return f"the forward is {p.method}/{p.schedule} here but {q.method}/{q.schedule} in the source model"
    return None
