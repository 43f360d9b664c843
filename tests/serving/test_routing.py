"""Quality-routed requests without Serve: the fewest-steps champion whose recorded test metric meets
the target, or a refusal naming the best value on offer. And the request schema's rules."""

import pytest
from pydantic import ValidationError

from serving.registry import ModelSnapshot, RoutingError, VersionInfo, route_by_quality
from serving.schemas import GenerateRequest


def snapshot(nelbo_by_steps: dict[int, float | None]) -> ModelSnapshot:
    versions = {str(i): VersionInfo(version=str(i), steps=T, aliases=(f"champion-t{T}",), test_nelbo_bits=value,
                                    test_nelbo_stderr=None if value is None else 0.01)
                for i, (T, value) in enumerate(sorted(nelbo_by_steps.items()), start=1)}
    return ModelSnapshot("m", True, {v.steps: v.version for v in versions.values()}, min(nelbo_by_steps), versions)


def test_the_fewest_steps_that_meet_the_target_win():
    menu = snapshot({2: 4.79, 4: 4.66, 8: 4.60, 16: 4.57})
    assert route_by_quality(menu, "nelbo_bits", 5.0, "max").steps == 2  # every budget meets it: the fewest steps
    chosen = route_by_quality(menu, "nelbo_bits", 4.61, "max")
    assert (chosen.steps, chosen.version, chosen.value, chosen.stderr) == (8, "3", 4.60, 0.01)
    assert route_by_quality(menu, "nelbo_bits", 4.57, "max").steps == 16  # the bound is inclusive


def test_no_budget_meets_it_and_the_refusal_names_the_best_on_offer():
    menu = snapshot({2: 4.79, 4: 4.66})
    with pytest.raises(RoutingError, match=r"nelbo_bits <= 4.5; the best is 4.6600 \(T=4, version 2\)"):
        route_by_quality(menu, "nelbo_bits", 4.5, "max")
    unrecorded = snapshot({2: None, 4: None})  # versions registered without a gate decision
    with pytest.raises(RoutingError, match="no served budget of 'm' has a recorded test nelbo_bits"):
        route_by_quality(unrecorded, "nelbo_bits", 9.0, "max")
    # a budget without a record is skipped, not chosen
    assert route_by_quality(snapshot({2: None, 4: 4.66}), "nelbo_bits", 9.0, "max").steps == 4


def test_a_bound_on_the_wrong_side_or_an_unknown_metric_is_refused():
    menu = snapshot({2: 4.79})
    with pytest.raises(ValueError, match="lower is better, so give max, not min"):
        route_by_quality(menu, "nelbo_bits", 4.0, "min")
    with pytest.raises(ValueError, match="not recorded by the gate"):
        route_by_quality(menu, "gen_bpc", 3.0, "max")
    # a molecule score on a model whose gate recorded none (not a molecule model)
    with pytest.raises(RoutingError, match="no served budget of 'm' has a recorded test validity"):
        route_by_quality(menu, "validity", 0.9, "min")


def test_molecule_scores_route_higher_or_lower_is_better():
    scores = {2: {"validity": 0.61, "fcd": 9.0}, 4: {"validity": 0.83, "fcd": 4.2}, 8: {"validity": 0.80}}
    versions = {str(T): VersionInfo(version=str(T), steps=T, aliases=(f"champion-t{T}",), test_nelbo_bits=1.0,
                                    test_sample_scores=s) for T, s in scores.items()}
    menu = ModelSnapshot("m", True, {T: str(T) for T in scores}, 2, versions)
    assert route_by_quality(menu, "validity", 0.8, "min").steps == 4  # higher is better: the fewest steps >= 0.8
    assert route_by_quality(menu, "validity", 0.5, "min").steps == 2
    chosen = route_by_quality(menu, "fcd", 5.0, "max")
    assert (chosen.steps, chosen.value, chosen.stderr) == (4, 4.2, None)
    with pytest.raises(RoutingError, match=r"validity >= 0.9; the best is 0.8300 \(T=4, version 4\)"):
        route_by_quality(menu, "validity", 0.9, "min")
    with pytest.raises(RoutingError, match=r"fcd <= 1.0; the best is 4.2000 \(T=4"):  # T=8 has no fcd: skipped
        route_by_quality(menu, "fcd", 1.0, "max")


@pytest.mark.parametrize("body, message", [
    ({"quality": {"metric": "validity", "max": 0.9}}, "validity: higher is better, so give min, not max"),
    ({"quality": {"metric": "fcd", "min": 3.0}}, "fcd: lower is better, so give max, not min"),
    ({"steps": 2, "quality": {"metric": "nelbo_bits", "max": 4.6}}, "give steps or quality, not both"),
    ({"quality": {"metric": "nelbo_bits"}}, "give exactly one of max or min"),
    ({"quality": {"metric": "nelbo_bits", "max": 4.6, "min": 4.0}}, "give exactly one of max or min"),
    ({"quality": {"metric": "nelbo_bits", "max": float("nan")}}, "finite number"),
    ({"quality": {"metric": "nelbo_bits", "max": "4.6"}}, "valid number"),
    ({"quality": {"metric": "fid", "max": 1.0}}, "nelbo_bits"),
    ({"quality": {"metric": "nelbo_bits", "min": 4.0}}, "lower is better, so give max"),
    ({"quality": {"metric": "nelbo_bits", "max": 4.6, "tolerance": 0.1}}, "Extra inputs"),
])
def test_the_request_schema_refuses_a_malformed_quality(body, message):
    with pytest.raises(ValidationError, match=message):
        GenerateRequest.model_validate(body)
    assert GenerateRequest.model_validate({"quality": {"metric": "nelbo_bits", "max": 5}}).quality.bound == (5.0, "max")
