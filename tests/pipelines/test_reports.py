"""The reveal-order picture: one per data type, its numbers from FLDDModel.reveal_steps; the
samples picture; evaluate_model scoring a caller's samples, and its keys named for a split."""

import pytest
import torch

from fldd.codec import TokenCodec
from fldd.data import load_splits
from fldd.model import FLDDModel
from fldd.sampler import sample
from pipelines.reports import evaluate_model, save_reveal_order, save_tokens_picture, split_metrics
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


def test_evaluate_model_scores_the_samples_it_is_given_and_draws_the_same_ones_itself():
    model = tiny_model({"data.name": "digits-binary", "process.method": "masked"}, T=2, K=2, D=64)
    train, valid = load_splits(model.config)
    drawn = evaluate_model(model, valid[:64], passes=1, seed=3, num_samples=64)
    own = sample(model, 64, generator=torch.Generator().manual_seed(1003))  # the seed it draws with
    assert evaluate_model(model, valid[:64], passes=1, seed=3, samples=own) == pytest.approx(drawn)
    copies = evaluate_model(model, valid[:64], passes=1, seed=3, samples=train[:64])
    assert copies["copy_rate"] == 1.0 and drawn["copy_rate"] < 1.0
    assert copies["valid_nelbo_bits"] == drawn["valid_nelbo_bits"]  # the NELBO does not read samples


def test_split_metrics_names_every_key_for_its_split_or_drops_the_valid_prefix():
    measured = {"valid_nelbo_bits": 4.6, "valid_kl_t1_bits": 0.1, "kl": 0.01, "collapsed": False}
    assert split_metrics(measured, "test") == {"test_nelbo_bits": 4.6, "test_kl_t1_bits": 0.1, "test_kl": 0.01,
                                               "test_collapsed": False}
    assert split_metrics(measured, None) == {"nelbo_bits": 4.6, "kl_t1_bits": 0.1, "kl": 0.01, "collapsed": False}


def test_square_samples_are_drawn_as_pictures_and_other_lengths_refused(tmp_path):
    digits = torch.randint(0, 2, (70, 64))
    assert save_tokens_picture(digits, 2, tmp_path / "digits.png", images=True).stat().st_size > 1000
    with pytest.raises(ValueError, match="not a square picture"):
        save_tokens_picture(torch.randint(0, 2, (8, 10)), 2, tmp_path / "x.png", images=True)
