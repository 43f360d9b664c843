"""The promotion gate's rule, as a pure function: two models' test scores and a margin -> a verdict.

No registry, no tracking store: `pipelines/registry.py` loads the models, evaluates them on the
test split and records what `judge` decides. The rule: the candidate and the holder of
`champion-t<T>` are scored on the same test examples with the same seeds, so their per-example
NELBOs pair up and the mean of the differences has a standard error. The candidate wins when
holder_mean - candidate_mean > margin (default: 2 x that standard error). With no holder, the first
version at a budget wins when its NELBO is finite.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from pipelines.vocabulary import (DECIDED_AT_TAG, DECISION_REASON_TAG, DECISION_TAG, HOLDER_TEST_NELBO_TAG,
                                  HOLDER_VERSION_TAG, MARGIN_RULE_TAG, MARGIN_TAG, PAIRED_DIFFERENCE_TAG,
                                  PAIRED_STDERR_TAG, TEST_EXAMPLES_TAG, TEST_NELBO_TAG, TEST_SAMPLE_TAG_PREFIX,
                                  TEST_SPLIT_TAG, TEST_STDERR_TAG)

PROMOTED, REFUSED, UNCHANGED = "promoted", "refused", "unchanged"

DEFAULT_MARGIN_RULE = "2 x paired stderr"
ABSOLUTE_MARGIN_RULE = "absolute (--margin)"


@dataclass(frozen=True)
class Scores:
    """One model's test NELBO: the mean (bits/token) and the per-example values it averages, in the
    order of the test rows (the pairing)."""

    bits_per_token: float
    per_example_bits: torch.Tensor


@dataclass(frozen=True)
class Verdict:
    """What the gate decided and the numbers it decided on (NaN where there was no holder)."""

    promoted: bool
    reason: str
    holder_test_bits: float = math.nan
    difference_bits: float = math.nan  # holder - candidate, paired, mean over test examples (> 0: better)
    difference_stderr: float = math.nan
    margin_bits: float = math.nan
    margin_rule: str = ""


def paired_difference(holder: Scores, candidate: Scores) -> tuple[float, float]:
    """(mean, standard error) of holder - candidate over the shared test examples."""
    if holder.per_example_bits.shape != candidate.per_example_bits.shape:
        raise ValueError(f"scores on different test rows: {tuple(holder.per_example_bits.shape)} vs "
                         f"{tuple(candidate.per_example_bits.shape)}")
    diff = holder.per_example_bits.double() - candidate.per_example_bits.double()
    n = diff.numel()
    stderr = (diff.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else math.nan
    return diff.mean().item(), stderr


def judge(candidate: Scores, holder: Scores | None = None, *, margin: float | None = None,
          holder_version: str | None = None, first_reason: str = "first version at this budget") -> Verdict:
    """The gate's decision for `candidate` against the current `holder` (None: nobody holds the budget).
    `margin` in bits/token overrides the default 2 x paired standard error."""
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin={margin!r}: must be a finite number >= 0 (bits/token)")
    if holder is None:
        if math.isfinite(candidate.bits_per_token):
            return Verdict(True, f"{first_reason}; test NELBO finite")
        return Verdict(False, f"non-finite test NELBO {candidate.bits_per_token}")

    who = f"holder version {holder_version}" if holder_version is not None else "the holder"
    difference, stderr = paired_difference(holder, candidate)
    if margin is None:
        margin_bits, rule = 2.0 * stderr, DEFAULT_MARGIN_RULE
    else:
        margin_bits, rule = float(margin), ABSOLUTE_MARGIN_RULE
    numbers = dict(holder_test_bits=holder.bits_per_token, difference_bits=difference, difference_stderr=stderr,
                   margin_bits=margin_bits, margin_rule=rule)
    if not math.isfinite(candidate.bits_per_token):
        return Verdict(False, f"non-finite test NELBO of the candidate: {candidate.bits_per_token}", **numbers)
    if not (math.isfinite(holder.bits_per_token) and math.isfinite(margin_bits)):
        return Verdict(False, f"non-finite test NELBO of {who} ({holder.bits_per_token}) or of the margin: "
                       "investigate the holder, or roll it back", **numbers)
    if difference > margin_bits:
        return Verdict(True, f"better than {who} by {difference:.4f} bits/token > margin {margin_bits:.4f}",
                       **numbers)
    if difference <= 0:
        return Verdict(False, f"not better than {who}: test NELBO {candidate.bits_per_token:.4f} vs "
                       f"{holder.bits_per_token:.4f} bits/token", **numbers)
    return Verdict(False, f"within the margin of {who}: better by {difference:.4f} <= margin "
                   f"{margin_bits:.4f} bits/token", **numbers)


@dataclass
class Decision:
    """One promotion decision. `decision`: promoted | refused | unchanged (the run already holds it)."""

    model_name: str
    budget: int | None
    run_id: str | None
    decision: str
    reason: str
    version: str | None = None  # the candidate's model version (None: refused before registering)
    holder_version: str | None = None  # who held champion-t<T> when the decision was taken
    candidate_test_bits: float = math.nan
    candidate_test_stderr: float = math.nan
    holder_test_bits: float = math.nan
    difference_bits: float = math.nan  # holder - candidate, paired, mean over test examples (> 0: better)
    difference_stderr: float = math.nan
    margin_bits: float = math.nan
    margin_rule: str = ""
    test_examples: int = 0
    test_split: str = ""  # split_fingerprint of the test rows both models were evaluated on
    valid_bits: float = math.nan  # the run's final validation NELBO (what chose it)
    aliases_moved: list[str] = field(default_factory=list)
    sample_scores: dict[str, float] = field(default_factory=dict)  # the candidate's, on test (molecules)

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def apply(self, verdict: Verdict) -> None:
        """Take the gate's verdict and the numbers it was reached on."""
        self.decision, self.reason = (PROMOTED if verdict.promoted else REFUSED), verdict.reason
        for name in ("holder_test_bits", "difference_bits", "difference_stderr", "margin_bits", "margin_rule"):
            setattr(self, name, getattr(verdict, name))

    def tags(self) -> dict[str, str]:
        """The version tags that record this decision."""
        tags = {DECISION_TAG: self.decision, DECISION_REASON_TAG: self.reason[:4900],
                DECIDED_AT_TAG: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                TEST_NELBO_TAG: number_tag(self.candidate_test_bits),
                TEST_STDERR_TAG: number_tag(self.candidate_test_stderr),
                TEST_EXAMPLES_TAG: str(self.test_examples), TEST_SPLIT_TAG: self.test_split,
                HOLDER_VERSION_TAG: self.holder_version or "none"}
        tags.update({TEST_SAMPLE_TAG_PREFIX + name: number_tag(value) for name, value in self.sample_scores.items()})
        if self.holder_version is not None:
            tags.update({HOLDER_TEST_NELBO_TAG: number_tag(self.holder_test_bits),
                         PAIRED_DIFFERENCE_TAG: number_tag(self.difference_bits),
                         PAIRED_STDERR_TAG: number_tag(self.difference_stderr),
                         MARGIN_TAG: number_tag(self.margin_bits), MARGIN_RULE_TAG: self.margin_rule})
        return tags


def number_tag(value: float) -> str:
    """A float as a tag value that reads back exactly (repr; nan and inf included)."""
    return repr(float(value))
