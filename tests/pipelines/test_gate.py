"""The gate's rule without a registry: scores in, verdict and its numbers out."""

import math

import pytest
import torch

from pipelines.gate import ABSOLUTE_MARGIN_RULE, DEFAULT_MARGIN_RULE, Scores, judge, paired_difference


def scores(per_example: list[float] | torch.Tensor) -> Scores:
    values = torch.as_tensor(per_example, dtype=torch.float64)
    return Scores(values.mean().item(), values)


def test_the_first_version_at_a_budget_needs_only_a_finite_nelbo():
    first = judge(scores([4.5, 4.6]), None, first_reason="first version at T=2 under 'm'")
    assert first.promoted and first.reason == "first version at T=2 under 'm'; test NELBO finite"
    assert math.isnan(first.difference_bits)
    broken = judge(Scores(math.inf, torch.tensor([math.inf])), None)
    assert not broken.promoted and "non-finite test NELBO inf" in broken.reason


def test_the_paired_difference_is_the_mean_of_per_example_differences_with_its_standard_error():
    holder = scores([5.0, 4.0, 6.0, 5.0])
    candidate = scores([4.0, 3.5, 5.0, 4.5])
    mean, stderr = paired_difference(holder, candidate)
    diff = torch.tensor([1.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    assert mean == pytest.approx(0.75) and stderr == pytest.approx((diff.std() / 2).item())
    with pytest.raises(ValueError, match="different test rows"):
        paired_difference(holder, scores([1.0, 2.0]))


def test_a_candidate_wins_only_by_more_than_twice_the_paired_standard_error():
    generator = torch.Generator().manual_seed(0)
    holder = 4.6 + 0.5 * torch.randn(2000, generator=generator, dtype=torch.float64)
    shared_noise = 0.05 * torch.randn(2000, generator=generator, dtype=torch.float64)
    shared_noise -= shared_noise.mean()  # the candidate is better by 0.02 on average, exactly
    clearly_better = judge(scores(holder - 0.02 + shared_noise), scores(holder), holder_version="3")
    assert clearly_better.promoted and clearly_better.margin_rule == DEFAULT_MARGIN_RULE
    assert clearly_better.margin_bits == pytest.approx(2 * clearly_better.difference_stderr)
    assert clearly_better.reason.startswith("better than holder version 3 by 0.0200")
    # the same mean advantage with per-example noise 20x larger sits inside the margin
    noisy = judge(scores(holder - 0.02 + 20 * shared_noise), scores(holder), holder_version="3")
    assert not noisy.promoted and noisy.reason.startswith("within the margin of holder version 3")
    worse = judge(scores(holder + 0.01), scores(holder), holder_version="3")
    assert not worse.promoted and worse.reason.startswith("not better than holder version 3")
    assert worse.difference_bits == pytest.approx(-0.01)


def test_an_absolute_margin_replaces_the_statistical_one_and_must_be_a_finite_non_negative_number():
    holder = scores([4.0, 4.2, 4.4])
    candidate = scores([3.9, 4.1, 4.3])  # better by exactly 0.1 on every example: stderr 0
    assert judge(candidate, holder).promoted  # 0.1 > 2 x 0
    strict = judge(candidate, holder, margin=0.2)
    assert not strict.promoted and strict.margin_rule == ABSOLUTE_MARGIN_RULE and strict.margin_bits == 0.2
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite number >= 0"):
            judge(candidate, holder, margin=bad)


def test_a_non_finite_score_on_either_side_refuses_and_says_which():
    holder = scores([4.0, 4.2])
    candidate = Scores(math.nan, torch.tensor([math.nan, 4.0], dtype=torch.float64))
    assert "of the candidate" in judge(candidate, holder).reason
    broken_holder = Scores(math.inf, torch.tensor([math.inf, 4.2], dtype=torch.float64))
    verdict = judge(scores([4.0, 4.1]), broken_holder, holder_version="1")
    assert not verdict.promoted and "holder version 1" in verdict.reason and "roll it back" in verdict.reason


def test_a_decision_prints_its_numbers_and_a_refusal_before_registering_prints_none():
    from commands.formatting import format_decision
    from pipelines.gate import Decision

    decision = Decision(model_name="m", budget=4, run_id="r1", decision="promoted", reason="better",
                        version="2", holder_version="1", valid_bits=4.55)
    decision.apply(judge(scores([4.0, 4.1, 4.2]), scores([4.2, 4.3, 4.4]), holder_version="1"))
    decision.candidate_test_bits, decision.candidate_test_stderr, decision.test_examples = 4.1, 0.05, 3
    decision.aliases_moved = ["champion-t4"]
    text = format_decision(decision)
    assert text.startswith("PROMOTED: run r1 at T=4 -> m version 2")
    assert "paired difference (holder - candidate): +0.2000 +- 0.0000" in text and "champion-t4" in text
    assert decision.tags()["fldd.paired_difference_bits"] == repr(decision.difference_bits)
    refused = Decision(model_name="m", budget=4, run_id="r2", decision="refused", reason="collapsed forward")
    assert format_decision(refused).splitlines() == ["REFUSED: run r2 at T=4 -> m (not registered)",
                                                     "  reason: collapsed forward"]
