"""Quality metrics that need no sampling: exact comparisons against a known data pmf (D=2 toys)."""

from __future__ import annotations

from torch import Tensor

from fldd.exact import exact_sample_distribution


def exact_distribution_metrics(model, data_pmf: Tensor, *, between_modes_below: float = 1e-4) -> dict[str, float]:
    """Exact KL(data || model), total variation, and the model's mass where the data pmf is < 1e-4.

    The model's distribution is computed by summing every sampling path (fldd.exact), so these
    numbers have no Monte Carlo error.
    """
    model_pmf = exact_sample_distribution(model)
    data_pmf = data_pmf.double()
    if model_pmf.shape != data_pmf.shape:
        raise ValueError(f"data pmf has {data_pmf.numel()} cells, the model's space has {model_pmf.numel()}")
    support = data_pmf > 0
    kl = (data_pmf[support] * (data_pmf[support].log() - model_pmf[support].clamp_min(1e-300).log())).sum()
    return {
        "kl": kl.item(),
        "tv": 0.5 * (data_pmf - model_pmf).abs().sum().item(),
        "between_modes_mass": model_pmf[data_pmf < between_modes_below].sum().item(),
    }
