"""The reveal-order picture: one per data type, its numbers from FLDDModel.reveal_steps."""

import pytest
import torch

from fldd.codec import TokenCodec
from fldd.model import FLDDModel
from pipelines.reports import save_reveal_order
from tests.conftest import tiny_config, tiny_model


def pair(D: int, K: int, codec: TokenCodec | None = None) -> dict[str, FLDDModel]:
    learned = tiny_model({"process.method": "fldd-mask"}, T=4, K=K, D=D)
    fixed = tiny_model({"process.method": "masked"}, T=4, K=K, D=D)
    if codec is not None:
        learned, fixed = (FLDDModel(m.config, codec).double() for m in (learned, fixed))
    return {"learned": learned, "fixed": fixed}


@pytest.mark.parametrize("D, K, codec", [(2, 5, None), (4, 2, None), (6, 3, TokenCodec("chars", "ab "))],
                         ids=["two-positions", "square-image", "text"])
def test_each_data_type_gets_its_picture_and_the_fixed_forward_has_no_order(tmp_path, D, K, codec):
    data = torch.randint(0, K, (40, D))
    path = tmp_path / "reveal.png"
    numbers = save_reveal_order(pair(D, K, codec), data, path, examples=3)
    assert path.stat().st_size > 1000
    fixed, learned = numbers["fixed"], numbers["learned"]
    assert fixed["mean_step"] == pytest.approx(2.5)  # (T + 1) / 2
    assert fixed["spread_across_examples"] == pytest.approx(0, abs=1e-6)
    assert fixed["spread_across_positions"] == pytest.approx(0, abs=1e-6)
    assert 1 <= learned["mean_step"] <= 4
    if codec is not None:
        assert set(learned["mean_step_by_char"]) <= set("ab ") and sorted(learned["first"]) == sorted(
            learned["mean_step_by_char"])


def test_data_it_cannot_draw_is_refused_with_the_reason(tmp_path):
    models = {"m": FLDDModel(tiny_config({"process.method": "masked"}, T=2, K=3, D=3))}
    with pytest.raises(ValueError, match="no reveal-order picture for this data"):
        save_reveal_order(models, torch.randint(0, 3, (8, 3)), tmp_path / "x.png")
