"""P13, P16: the float64 few-step sampler."""

import copy

import pytest
import torch

import fldd.objective
from fldd.exact import exact_sample_distribution
from fldd.objective import sample_categorical
from fldd.sampler import sample
from tests.conftest import RANDOM_FLDD, tiny_model


class CallRecorder:
    def __init__(self, network):
        self.network, self.inputs, self.steps = network, [], []
        self.original = network.forward

    def __call__(self, z, t):
        self.inputs.append(z.clone())
        self.steps.append(t.clone())
        return self.original(z, t)


def record_reverse_calls(model):
    recorder = CallRecorder(model.reverse)
    model.reverse.forward = recorder
    return recorder


@pytest.mark.parametrize("T", [1, 3, 8])
def test_exactly_T_reverse_calls_from_the_prior(T):  # P13
    model = tiny_model({"process.method": "masked"}, T=T, double=False)
    recorder = record_reverse_calls(model)
    out = sample(model, 50, generator=torch.Generator().manual_seed(0))
    assert len(recorder.inputs) == T
    assert [int(t[0]) for t in recorder.steps] == list(range(T, 0, -1))
    assert (recorder.inputs[0] == model.mask_id).all()  # z_T ~ pi = all MASK
    assert out.shape == (50, 2) and out.dtype == torch.long


def test_uniform_prior_start_is_uniform():
    model = tiny_model({"process.method": "uniform"}, T=2, K=3, double=False)
    recorder = record_reverse_calls(model)
    sample(model, 3000, generator=torch.Generator().manual_seed(0))
    first = recorder.inputs[0].flatten()
    counts = torch.bincount(first, minlength=3).double() / first.numel()
    assert (counts - 1 / 3).abs().max() < 0.03


def test_no_mask_left_at_z0():  # P13
    model = tiny_model({"process.method": "masked"}, T=2, double=False)
    with torch.no_grad():  # push the reverse hard toward predicting MASK
        model.reverse.output_layer.bias.view(2, -1)[:, model.mask_id] += 50.0
    out = sample(model, 500, generator=torch.Generator().manual_seed(0))
    assert (out < model.config.vocab_size).all()


def test_categorical_sampling_is_float64():  # P13
    # the middle category's 3e-8 is below float32's resolution at 0.5: a float32 CDF has cdf[0] ==
    # cdf[1] and never returns it; a float64 CDF returns it for u in [0.5 - 1.5e-8, 0.5 + 1.5e-8)
    probs = torch.tensor([0.5 - 1.5e-8, 3e-8, 0.5 - 1.5e-8], dtype=torch.float64)
    logits = torch.log(probs)
    u = torch.tensor([0.5], dtype=torch.float64)
    assert sample_categorical(logits, uniforms=u).item() == 1
    assert sample_categorical(logits.float(), uniforms=u).item() == 1  # float32 logits: CDF still float64
    cdf32 = torch.cumsum(probs.float(), dim=0)
    assert torch.searchsorted(cdf32, u.float(), right=True).item() == 2  # what float32 would have done
    assert sample_categorical(logits, uniforms=torch.tensor([0.25], dtype=torch.float64)).item() == 0


def test_samples_follow_the_exact_model_distribution():
    model = tiny_model({**RANDOM_FLDD, "process.forward_init_scale": 3.0}, T=3, double=False)
    with torch.no_grad():
        for p in model.reverse.parameters():
            p.add_(0.5 * torch.randn_like(p))
    exact = exact_sample_distribution(model).float()
    n = 40_000
    out = sample(model, n, generator=torch.Generator().manual_seed(1), batch_size=4096)
    index = out[:, 0] * 3 + out[:, 1]
    empirical = torch.bincount(index, minlength=9).float() / n
    assert (empirical - exact).abs().sum() / 2 < 0.02  # total variation
    assert exact.max() < 0.9  # non-trivial distribution


def test_seeded_and_batched_reproducibly():
    model = tiny_model({"process.method": "masked"}, T=4, double=False)
    a = sample(model, 64, generator=torch.Generator().manual_seed(7))
    b = sample(model, 64, generator=torch.Generator().manual_seed(7))
    c = sample(model, 64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_conditioning_clamps_positions_at_every_step():
    model = tiny_model({"process.method": "masked"}, T=4, K=5, D=3, double=False)
    recorder = record_reverse_calls(model)
    condition = torch.tensor([4, 0, 0])
    mask = torch.tensor([True, False, False])
    out = sample(model, 100, generator=torch.Generator().manual_seed(0), condition=condition, condition_mask=mask)
    assert (out[:, 0] == 4).all()
    assert all((z[:, 0] == 4).all() for z in recorder.inputs)
    assert out[:, 1:].unique().numel() > 1
    with pytest.raises(ValueError, match="condition holds token 7"):
        sample(model, 2, condition=torch.tensor([7, 0, 0]), condition_mask=mask)
    with pytest.raises(ValueError, match="together"):
        sample(model, 2, condition=condition)


def test_sampler_never_uses_the_forward_network():  # P16
    model = tiny_model({"process.method": "fldd"}, T=3, double=False)

    def broken(*args, **kwargs):
        raise AssertionError("the sampler called the forward network")

    model.forward_process.network.forward = broken
    out = sample(model, 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (10, 2)


@pytest.mark.parametrize("overrides", [
    RANDOM_FLDD,
    {"process.method": "fldd-mask", "process.reverse_parameterization": "carry-over"},
    {"process.method": "masked", "process.reverse_parameterization": "x0"},
])
def test_reverse_network_never_sees_x(overrides, monkeypatch):  # P16
    """In training, the reverse network's input is the sampled z_t (and t), and the log p(z_s|z_t)
    scored against the posterior is what a copy of the model that never saw x computes from them."""
    model = tiny_model(overrides, T=3)
    never_saw_x = copy.deepcopy(model)
    recorder = record_reverse_calls(model)
    posterior_z_t, scored_log_p = [], []
    real_posterior, real_kl = fldd.objective.max_coupling_posterior, fldd.objective.step_kl

    def posterior_spy(z_t, log_u_s, log_u_t):
        posterior_z_t.append(z_t.clone())
        return real_posterior(z_t, log_u_s, log_u_t)

    def kl_spy(q, log_p):
        scored_log_p.append(log_p.detach().clone())
        return real_kl(q, log_p)

    monkeypatch.setattr(fldd.objective, "max_coupling_posterior", posterior_spy)
    monkeypatch.setattr(fldd.objective, "step_kl", kl_spy)
    for x in (torch.tensor([[0, 0], [1, 2], [2, 1]] * 4), torch.tensor([[2, 2], [0, 1], [1, 0]] * 4)):
        model(x)
    assert len(recorder.inputs) == len(posterior_z_t) == len(scored_log_p) == 2
    for z, t, z_t, log_p in zip(recorder.inputs, recorder.steps, posterior_z_t, scored_log_p):
        assert torch.equal(z, z_t)  # the network is fed the sample, not x
        assert torch.equal(log_p, never_saw_x.reverse_log_probs(z, t))
