"""benchmarks/quality_per_ms.py's headline: the learned forward's throughput at the fixed forward's best
quality, as a ratio; null where the learned forward never reaches it."""

import pytest

from benchmarks.quality_per_ms import headline


def row(forward: str, steps: int, bits: float, rate: float) -> dict:
    return {"forward": forward, "steps": steps, "test_nelbo_bits": bits, "samples_per_s": rate}


def test_the_fewest_learned_steps_at_the_fixed_forwards_best_quality_against_its_throughput():
    rows = [row("masked-x0", 2, 4.79, 7000), row("masked-x0", 16, 4.57, 2800),
            row("carry", 2, 4.60, 8000), row("carry", 4, 4.55, 7700), row("carry", 16, 4.56, 3600)]
    top = headline(rows, "carry")
    assert (top["fixed_steps"], top["learned_steps"]) == (16, 4)  # T=2 (4.60) does not reach 4.57
    assert top["ratio"] == pytest.approx(7700 / 2800)
    never = headline([row("masked-x0", 16, 4.50, 2800), row("carry", 2, 4.55, 8000)], "carry")
    assert never["learned_steps"] is None and never["ratio"] is None
