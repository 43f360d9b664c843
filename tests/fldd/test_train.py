"""The one training loop: schedule phases, optimizer groups, callbacks."""

import math

import pytest
import torch
from torch import nn

from fldd.config import FLDDConfig
from fldd.data import DataError, infinite_batches, load_splits
from fldd.exact import exact_nelbo
from fldd.train import TrainSchedule, build_optimizer, fit, train_loop
from tests.conftest import RANDOM_FLDD, tiny_config, tiny_model

DATA = torch.randint(0, 3, (64, 2), generator=torch.Generator().manual_seed(0))


def test_schedule_phases():
    cfg = tiny_config({"train.steps": 100, "train.forward_freeze_fraction": 0.2, "train.concrete_warmup_steps": 10,
                       "train.tau_start": 1.0, "train.tau_end": 0.01}).train
    schedule = TrainSchedule(cfg, learns_forward=True)
    assert schedule.phase(0).name == "reverse-only" and not schedule.phase(19).train_forward
    assert schedule.phase(20).name == "concrete-warmup" and schedule.phase(20).tau == pytest.approx(1.0)
    assert schedule.phase(29).tau == pytest.approx(0.01)
    assert schedule.phase(30).name == "reinforce" and schedule.phase(30).tau is None
    assert TrainSchedule(cfg, learns_forward=False).phase(0).name == "fixed-forward"


def test_a_resumed_longer_run_keeps_its_phase_boundaries():
    """The reverse-only phase is a fraction of the steps the run started with: resuming a 100-step
    run with train.steps=200 must not move its end from step 30 to step 60."""
    started = TrainSchedule(tiny_config({"train.steps": 100, "train.forward_freeze_fraction": 0.3,
                                         "train.concrete_warmup_steps": 10}).train, learns_forward=True)
    longer = tiny_config({"train.steps": 200, "train.forward_freeze_fraction": 0.3,
                          "train.concrete_warmup_steps": 10}).train
    resumed = TrainSchedule(longer, learns_forward=True, boundaries=started.boundaries())
    assert [resumed.phase(s).name for s in (29, 30, 39, 40, 59)] == [
        "reverse-only", "concrete-warmup", "concrete-warmup", "reinforce", "reinforce"]
    assert [resumed.phase(s) for s in range(200)] == [started.phase(s) for s in range(200)]
    assert TrainSchedule(longer, learns_forward=True).phase(59).name == "reverse-only"  # a fresh 200-step run


def test_optimizer_has_separate_forward_learning_rate():
    model = tiny_model({"train.lr": 1e-3, "train.forward_lr": 3e-4}, T=2, double=False)
    groups = {g["name"]: g for g in build_optimizer(model, model.config.train).param_groups}
    assert groups["reverse"]["lr"] == 1e-3 and groups["forward"]["lr"] == 3e-4
    masked = tiny_model({"process.method": "masked"}, T=2, double=False)
    assert [g["name"] for g in build_optimizer(masked, masked.config.train).param_groups] == ["reverse"]


def test_forward_learning_rate_shrinks_above_the_reference_steps():
    for T, expected in [(2, 3e-4), (4, 3e-4), (8, 3e-4 / 4), (16, 3e-4 / 16)]:
        model = tiny_model({"train.forward_lr": 3e-4, "train.forward_lr_ref_steps": 4}, T=T, double=False)
        groups = {g["name"]: g for g in build_optimizer(model, model.config.train).param_groups}
        assert groups["forward"]["lr"] == pytest.approx(expected)
    fixed = tiny_model({"train.forward_lr": 3e-4, "train.forward_lr_ref_steps": 0}, T=16, double=False)
    assert fixed.config.forward_lr == pytest.approx(3e-4)


def run_steps(model, steps, **kwargs):
    optimizer = build_optimizer(model, model.config.train)
    batches = infinite_batches(DATA, model.config.train.batch_size // model.samples_per_x, torch.Generator())
    return train_loop(model, batches, optimizer, num_steps=steps,
                      schedule=TrainSchedule(model.config.train, model.config.learns_forward), **kwargs)


def test_reverse_only_phase_freezes_the_forward():
    model = tiny_model({"train.steps": 10, "train.forward_freeze_fraction": 0.5}, T=2, double=False)
    before_f = [p.clone() for p in model.forward_parameters()]
    before_r = [p.clone() for p in model.reverse_parameters()]
    run_steps(model, 5)
    assert all(torch.equal(a, b) for a, b in zip(before_f, model.forward_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_r, model.reverse_parameters()))
    run_steps(model, 10)  # fresh optimizer, same schedule: steps 0..9 include the forward phase
    assert not all(torch.equal(a, b) for a, b in zip(before_f, model.forward_parameters()))


@pytest.mark.parametrize("overrides", [
    {"train.estimator": "ema", "train.num_zt_samples": 1},
    {"train.estimator": "loo", "train.num_zt_samples": 4},
    {"train.concrete_warmup_steps": 3},
    {"process.method": "fldd-mask"},
])
def test_estimators_and_warmup_train(overrides):
    model = tiny_model({"train.forward_freeze_fraction": 0.0, **overrides, "train.steps": 6}, T=3, double=False)
    seen = []
    run_steps(model, 6, log_every=2, on_metrics=lambda step, m: seen.append((step, m)))
    assert [s for s, _ in seen] == [2, 4, 6]
    if "train.concrete_warmup_steps" in overrides:
        assert seen[0][1]["phase"] == "concrete-warmup" and "relaxed_loss" in seen[0][1]
        assert "nelbo" not in seen[0][1]  # the relaxed loss is never reported as a bound
        assert seen[-1][1]["phase"] == "reinforce" and "nelbo" in seen[-1][1]
    if overrides.get("train.estimator") == "ema":
        assert bool(model.baseline_seen[1:].any())


def test_callbacks_checkpoint_and_evaluate():
    model = tiny_model({"train.steps": 7}, T=2, double=False)
    checkpoints, evaluations = [], []
    run_steps(model, 7, checkpoint_every=3, on_checkpoint=checkpoints.append,
              eval_every=2, evaluate=lambda step: evaluations.append(step) or {"score": 1.0})
    assert checkpoints == [3, 6, 7] and evaluations == [2, 4, 6]


class SpikedForwardGradient(nn.Module):
    """Wraps a model: adds `spike` to every forward-network gradient entry, like a wild
    score-function sample; the loss value and the reverse gradient stay as they are."""

    def __init__(self, model, spike: float):
        super().__init__()
        self.module, self.spike = model, spike

    def forward(self, x, **kwargs):
        out = self.module(x, **kwargs)
        total = sum(p.sum() for p in self.module.forward_parameters())
        return {**out, "loss": out["loss"] + self.spike * (total - total.detach())}


def test_per_network_clip_a_forward_gradient_spike_does_not_shrink_the_reverse_update():
    updates, logged = {}, {}
    for spike in (0.0, 1e6):
        model = tiny_model({**RANDOM_FLDD, "train.forward_freeze_fraction": 0.0}, T=2, double=False)
        before = [p.detach().clone() for p in model.reverse_parameters()]
        torch.manual_seed(0)  # the same t and z_t draws in both runs
        seen = []
        train_loop(SpikedForwardGradient(model, spike), iter([DATA[:4]]), build_optimizer(model, model.config.train),
                   num_steps=1, schedule=TrainSchedule(model.config.train, True), grad_clip=1.0,
                   grad_clip_mode="per-network", on_metrics=lambda step, metrics: seen.append(metrics))
        updates[spike] = [p.detach() - b for p, b in zip(model.reverse_parameters(), before)]
        logged[spike] = seen[-1]
    assert any(u.abs().max() > 0 for u in updates[0.0])
    assert all(torch.equal(a, b) for a, b in zip(updates[0.0], updates[1e6]))
    assert logged[1e6]["grad_norm_forward"] > 1e6 > 10 * logged[0.0]["grad_norm_forward"]
    assert logged[1e6]["grad_norm_reverse"] == logged[0.0]["grad_norm_reverse"]
    assert logged[1e6]["grad_norm"] == pytest.approx(math.hypot(logged[1e6]["grad_norm_reverse"],
                                                                logged[1e6]["grad_norm_forward"]))


def test_frozen_phase_logs_no_forward_gradient_norm():
    model = tiny_model({"train.steps": 4, "train.forward_freeze_fraction": 0.5}, T=2, double=False)
    seen = []
    run_steps(model, 4, log_every=2, on_metrics=lambda step, metrics: seen.append(metrics))
    assert "grad_norm_forward" not in seen[0] and seen[0]["grad_norm"] == seen[0]["grad_norm_reverse"]
    assert seen[1]["grad_norm_forward"] > 0


def mixture8_config(**overrides) -> FLDDConfig:
    return FLDDConfig().with_overrides({"data.name": "mixture8", "vocab_size": 8, "train.steps": 20,
                                        "train.batch_size": 32, "train.log_every": 10, "data.num_train": 256,
                                        "data.num_valid": 64, "reverse_network.width": 32,
                                        "forward_network.width": 32, **overrides})


def test_fit_on_builtin_toy_returns_nelbo_and_collapse_report():
    cfg = mixture8_config()
    train, valid = load_splits(cfg)
    result = fit(cfg, train, valid, eval_passes=2)
    # the reported NELBO is the returned model's: Monte Carlo around the exact value (sum over t)
    with torch.no_grad():
        exact_bits = exact_nelbo(result.model, valid).mean().item() / (2 * math.log(2))
    estimate = result.valid_nelbo
    assert estimate.num_examples == 64
    assert abs(estimate.bits_per_token - exact_bits) < 4 * estimate.stderr_bits_per_token + 1e-6
    assert result.collapse is not None and len(result.collapse.information_bits) == 3
    assert [h["step"] for h in result.history] == [10, 20]


def test_evaluating_more_often_does_not_change_the_trained_model():
    """Evaluation draws its z_t from its own generator: eval_every must not change the training."""
    parameters, evaluations = [], []
    for eval_every in (0, 3):
        cfg = mixture8_config(**{"train.steps": 12, "train.eval_every": eval_every})
        train, valid = load_splits(cfg)
        result = fit(cfg, train, valid, eval_passes=1)
        parameters.append([p.detach().clone() for p in result.model.parameters()])
        evaluations.append([h["step"] for h in result.history if "valid_nelbo_bits" in h])
    assert evaluations == [[], [3, 6, 9]]
    assert all(torch.equal(a, b) for a, b in zip(*parameters))


def test_builtin_data_checks_shape():
    from fldd.data import resolve_data_shape

    # the shape comes from the data where the config leaves it 0; a stated value must agree
    resolved, described = resolve_data_shape(FLDDConfig().with_overrides({"data.name": "mixture8"}))
    assert (resolved.seq_len, resolved.vocab_size, described.vocab_from) == (2, 8, "built-in")
    with pytest.raises(DataError, match="vocab_size=50 in the config, but built-in mixture8 has a vocabulary of 8"):
        load_splits(FLDDConfig(vocab_size=50).with_overrides({"data.name": "mixture8"}))
    with pytest.raises(DataError, match="seq_len=3 in the config, but built-in mixture8 has rows of length 2"):
        load_splits(FLDDConfig(seq_len=3).with_overrides({"data.name": "mixture8"}))
    with pytest.raises(DataError, match="data.name='nope'"):
        load_splits(FLDDConfig().with_overrides({"data.name": "nope"}))


def test_fit_refuses_a_config_that_asks_to_start_from_a_model():
    from fldd.config import ConfigError
    from fldd.train import fit
    from tests.conftest import tiny_config

    cfg = tiny_config({"train.init_from": "runs:/abc/model"})
    with pytest.raises(ConfigError, match="train.init_from"):
        fit(cfg, torch.zeros(8, 2, dtype=torch.long), torch.zeros(8, 2, dtype=torch.long))


def test_fit_refuses_tensors_its_config_does_not_describe():
    from fldd.config import ConfigError

    cfg = mixture8_config()
    with pytest.raises(ConfigError, match=r"seq_len=2 \(from mixture8\), but train_data has shape \(16, 3\)"):
        fit(cfg, torch.zeros(16, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))


def test_keep_best_returns_the_weights_of_the_best_evaluation():
    """Trained on one repeated row, the model gets worse on validation as it trains: keep_best must hand
    back the weights its best evaluation scored, not the last (nor a view that kept training)."""
    from fldd.objective import evaluate_nelbo
    from fldd.train import CHECKPOINT_EVAL_SEED

    cfg = mixture8_config(**{"train.steps": 12, "train.eval_every": 3, "train.lr": 3e-2})
    _, valid = load_splits(cfg)
    one_row = valid[:1].repeat(64, 1)
    result = fit(cfg, one_row, valid, eval_passes=1, keep_best=True)
    evaluated = [(h["step"], h["valid_nelbo_bits"]) for h in result.history if "valid_nelbo_bits" in h]
    assert [step for step, _ in evaluated] == [3, 6, 9, 12]  # the last step is a candidate, evaluated once
    scores = dict(evaluated)
    assert result.best_step == min(scores, key=scores.get) and result.best_step < 12
    again = evaluate_nelbo(result.model, valid, num_passes=2,
                           generator=torch.Generator().manual_seed(CHECKPOINT_EVAL_SEED))
    assert again.bits_per_token == pytest.approx(scores[result.best_step], abs=1e-9)
    assert again.bits_per_token < scores[12]


def test_keep_best_needs_evaluations_to_choose_from():
    from fldd.config import ConfigError

    cfg = mixture8_config(**{"train.eval_every": 0})
    train, valid = load_splits(cfg)
    with pytest.raises(ConfigError, match="keep_best needs train.eval_every > 0"):
        fit(cfg, train, valid, keep_best=True)


def test_keep_best_refuses_to_choose_when_every_evaluation_is_non_finite(monkeypatch):
    """NaN compares false with everything, so no weights are ever kept: fit must say why, not fail
    later loading nothing (or hand back weights no evaluation chose)."""
    import dataclasses

    import fldd.train
    from fldd.train import NonFiniteLossError

    real = fldd.train.evaluate_nelbo

    def nan_estimate(*args, **kwargs):  # a model whose held-out NELBO went non-finite at every evaluation
        return dataclasses.replace(real(*args, **kwargs), bits_per_token=math.nan)

    monkeypatch.setattr(fldd.train, "evaluate_nelbo", nan_estimate)
    cfg = mixture8_config(**{"train.steps": 4, "train.eval_every": 2})
    train, valid = load_splits(cfg)
    with pytest.raises(NonFiniteLossError, match="every validation evaluation was non-finite"):
        fit(cfg, train, valid, eval_passes=1, keep_best=True)
    fit(cfg, train, valid, eval_passes=1, keep_best=False)  # without keep_best nothing is chosen: no error


@pytest.mark.parametrize("mode", ["joint", "per-network"])
def test_clip_modes(mode):
    """joint (the default): one norm over both networks, so a large forward gradient shortens the
    reverse's gradient too; per-network: each group clipped on its own. Norms are reported before
    clipping either way."""
    from fldd.train import clip_gradients

    model = tiny_model({**RANDOM_FLDD, "train.forward_freeze_fraction": 0.0}, T=2, double=False)
    optimizer = build_optimizer(model, model.config.train)
    for p in model.reverse_parameters():
        p.grad = torch.full_like(p, 0.01)
    for p in model.forward_parameters():
        p.grad = torch.full_like(p, 10.0)
    norm = lambda params: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()  # noqa: E731
    reverse_before, forward_before = norm(model.reverse_parameters()), norm(model.forward_parameters())
    reported = clip_gradients(optimizer, 1.0, mode)
    assert reported["grad_norm_reverse"] == pytest.approx(reverse_before)
    assert reported["grad_norm_forward"] == pytest.approx(forward_before)
    assert reported["grad_norm"] == pytest.approx(math.hypot(reverse_before, forward_before))
    if mode == "joint":
        scale = 1.0 / math.hypot(reverse_before, forward_before)
        assert norm(model.reverse_parameters()) == pytest.approx(reverse_before * scale, rel=1e-4)
        assert math.hypot(norm(model.reverse_parameters()), norm(model.forward_parameters())) == pytest.approx(1.0, rel=1e-4)
    else:
        assert norm(model.reverse_parameters()) == pytest.approx(min(reverse_before, 1.0), rel=1e-4)
        assert norm(model.forward_parameters()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="clip mode"):
        clip_gradients(optimizer, 1.0, "sideways")


def test_learning_rates_decay_linearly_over_the_last_fraction_of_steps():
    cfg = tiny_config({"train.steps": 100, "train.lr_decay_fraction": 0.2}).train
    schedule = TrainSchedule(cfg, learns_forward=True)
    assert [schedule.lr_factor(s) for s in (0, 79, 80, 90, 99)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.05])
    assert schedule.lr_factor(150) == 0.0  # never negative
    flat = TrainSchedule(tiny_config({"train.steps": 100, "train.lr_decay_fraction": 0.0}).train, True)
    assert flat.lr_factor(99) == 1.0
    model = tiny_model({"train.steps": 10, "train.lr_decay_fraction": 0.5, "process.method": "masked"}, double=False)
    optimizer = build_optimizer(model, model.config.train)
    seen = []
    train_loop(model, iter([DATA[:4]] * 10), optimizer, num_steps=10,
               schedule=TrainSchedule(model.config.train, False), on_step=lambda step: seen.append(
                   optimizer.param_groups[0]["lr"]))
    base = model.config.train.lr
    assert seen == pytest.approx([base] * 5 + [base * f for f in (1.0, 0.8, 0.6, 0.4, 0.2)])
