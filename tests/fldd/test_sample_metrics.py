"""digits-FD, classifier confidence, copy rate; text gen-BPC with entropy and distinct-4-grams."""

import numpy as np
import pytest
import torch

from fldd.config import FLDDConfig
from fldd.data import load_splits, load_test_split
from fldd.sample_metrics import CharNGram, digits_metrics, frechet_distance, text_metrics


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I): |mu|^2 = 3, trace term = 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("name, levels", [("digits", 17), ("digits-binary", 2)])
def test_digits_metrics_separate_real_from_noise(name, levels):
    cfg = FLDDConfig(seq_len=64, vocab_size=levels).with_overrides({"data.name": name})
    train, valid = load_splits(cfg)
    test = load_test_split(cfg)
    real = digits_metrics(valid, test, train, levels)
    noise = digits_metrics(torch.randint(0, levels, (300, 64), generator=torch.Generator().manual_seed(0)),
                           test, train, levels)
    copies = digits_metrics(train[:100], test, train, levels)
    assert real["digits_fd"] < 0.25 * noise["digits_fd"]
    assert real["classifier_confidence"] > noise["classifier_confidence"]
    assert copies["copy_rate"] == 1.0 and noise["copy_rate"] == 0.0


def test_text_metrics_reward_real_text_and_expose_collapse():
    cfg = FLDDConfig(seq_len=64, vocab_size=27).with_overrides({"data.name": "text"})
    train, valid = load_splits(cfg)
    reference = CharNGram(train, 27)
    real = text_metrics(valid[:200], reference)
    noise = text_metrics(torch.randint(0, 27, (200, 64), generator=torch.Generator().manual_seed(0)), reference)
    collapsed = text_metrics(valid[:1].repeat(200, 1), reference)
    assert real["gen_bpc"] < 3.0 < noise["gen_bpc"]
    assert real["entropy"] > 3.5 and noise["entropy"] > 4.7
    # a collapsed generator repeats itself: low distinct-4-gram ratio gives it away
    assert collapsed["distinct4"] < 0.05 < real["distinct4"]
    probs = [reference.probability((0, 1), k) for k in range(27)]
    assert sum(probs) == pytest.approx(1.0)
