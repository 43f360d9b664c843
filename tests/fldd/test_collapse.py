"""P17: the forward-collapse guard."""

import warnings

import pytest
import torch

from fldd.model import FLDDModel, ForwardCollapseWarning
from tests.conftest import RANDOM_FLDD, tiny_model

X = torch.randint(0, 5, (256, 3), generator=torch.Generator().manual_seed(0))


def x_blind(model):
    """Force the learned forward to ignore x: its trunk input carries nothing about x."""
    with torch.no_grad():
        model.forward_process.network.embed.zero_()
        torch.nn.init.normal_(model.forward_process.network.output_layer.bias, std=3.0)
    return model


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_guard_fires_on_a_forward_that_ignores_x(arch, tmp_path):
    model = x_blind(tiny_model(RANDOM_FLDD, T=4, K=5, D=3, arch=arch, double=False))
    with pytest.warns(ForwardCollapseWarning, match="FORWARD COLLAPSE"):
        report = model.check_collapse(X)
    assert report.collapsed and bool(model.collapsed)
    assert max(report.information_bits[1:4]) < 1e-6 and report.information_bits[0] > 1.0
    model.save(tmp_path / "m.pt")
    assert bool(FLDDModel.load(tmp_path / "m.pt").collapsed)  # the flag travels with the model


@pytest.mark.parametrize("overrides", [
    {"process.method": "masked"},
    {"process.method": "uniform"},
    {**RANDOM_FLDD, "process.forward_init_scale": 30.0},
    {"process.method": "fldd-mask"},
])
def test_guard_is_quiet_on_informative_forwards(overrides):
    model = tiny_model(overrides, T=4, K=5, D=3, double=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForwardCollapseWarning)
        report = model.check_collapse(X)
    assert not report.collapsed and not bool(model.collapsed)
    assert max(report.retained_fraction[1:4]) > 0.05


def test_masked_information_is_the_signal_fraction():
    model = tiny_model({"process.method": "masked"}, T=4, K=5, D=3, double=False)
    report = model.check_collapse(X)
    torch.testing.assert_close(torch.tensor(report.retained_fraction), torch.tensor([1, 0.75, 0.5, 0.25, 0.0]),
                               atol=1e-5, rtol=0)


def with_signal_fractions(model, alpha):
    """Replace u(x,t) by alpha_t onehot(x) + (1 - alpha_t) e_MASK: z_t then keeps exactly the
    fraction alpha_t of the information z_0 carries about x (as the masked forward does)."""
    alpha = torch.tensor(alpha, dtype=torch.float64)
    mask = torch.nn.functional.one_hot(torch.tensor(model.mask_id), model.num_states).double()

    def log_marginals(x, t):
        a = alpha[t][..., None, None]
        return torch.log(a * torch.nn.functional.one_hot(x, model.num_states).double() + (1 - a) * mask)

    model.forward_process.log_marginals = log_marginals
    return model


@pytest.mark.parametrize("interior, collapsed", [
    ((0.5, 0.0), False),  # one informative interior step is enough, whichever it is
    ((0.0, 0.5), False),
    ((0.02, 0.0), False),  # just above the 1% threshold
    ((0.005, 0.008), True),  # every interior step below it
    ((0.0, 0.0), True),
])
def test_guard_flags_only_when_every_interior_step_is_uninformative(interior, collapsed):
    model = with_signal_fractions(tiny_model({"process.method": "masked"}, T=3, K=5, D=3, double=False),
                                  (1.0, *interior, 0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ForwardCollapseWarning)
        report = model.check_collapse(X)
    torch.testing.assert_close(torch.tensor(report.retained_fraction[1:3]), torch.tensor(interior), atol=1e-5, rtol=0)
    assert report.collapsed == collapsed == bool(model.collapsed)
    assert any(issubclass(w.category, ForwardCollapseWarning) for w in caught) == collapsed


def saturate(model, t_value: int):
    """Make the learned forward's u(x, t_value) the same one-hot for every x (a dead softmax)."""
    with torch.no_grad():
        model.forward_process.network.output_layer.weight.zero_()
        model.forward_process.network.output_layer.bias.zero_()
        model.forward_process.network.output_layer.bias.view(3, -1)[:, 0] = 1e4
    return model


@pytest.mark.parametrize("floor", [0.0, 0.01])
def test_guard_reports_a_saturated_learned_forward(floor):
    """A one-hot u(x,t) is reported as saturated (and, being the same for every x, as collapsed);
    with process.forward_floor the least entropy u can have is the floored one-hot's, and the
    guard measures against that, so a floor cannot hide a dead softmax from it."""
    model = saturate(tiny_model({**RANDOM_FLDD, "process.forward_floor": floor}, T=3, K=5, D=3, double=False), 1)
    with pytest.warns(ForwardCollapseWarning, match="FORWARD SATURATED"):
        report = model.check_collapse(X)
    assert report.saturated and report.collapsed
    assert max(report.entropy_bits[1:3]) < model.forward_process.entropy_floor_bits + 0.01
    assert (model.forward_process.entropy_floor_bits > 0.05) == (floor > 0)


@pytest.mark.parametrize("overrides", [
    {**RANDOM_FLDD, "process.forward_init_scale": 30.0},  # informative and spread
    {"process.method": "fldd-mask"},  # a masking forward is never "saturated"
    {"process.method": "masked"},
])
def test_guard_does_not_report_saturation_otherwise(overrides):
    model = tiny_model(overrides, T=4, K=5, D=3, double=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForwardCollapseWarning)
        report = model.check_collapse(X)
    assert not report.saturated
