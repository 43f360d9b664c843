"""benchmarks/gate_table.py: which runs it trains is read from select_then_test's choices (made on
validation), with the exact overrides selection trained them with; bad input stops before training."""

import json

import pytest

from benchmarks.gate_table import digest, main, overrides_of

ALWAYS = {"train.forward_lr_ref_steps": 0}
SELECTION = [
    {"method": "fldd", "steps": 2, "overrides": {**ALWAYS, "recipe": "random/1e-3", "process.warm_start": "none",
                                                 "train.forward_freeze_fraction": 0.0, "train.forward_lr": 1e-3}},
    {"method": "fldd", "steps": 2, "overrides": {**ALWAYS, "recipe": "masked-warm/3e-4",
                                                 "process.warm_start": "masked",
                                                 "train.forward_freeze_fraction": 0.3, "train.forward_lr": 3e-4}},
    {"method": "masked-x0", "steps": 2, "overrides": {**ALWAYS, "train.lr": 5e-4}},
]


def test_a_choice_is_trained_with_the_overrides_selection_used_and_the_recipe_name_is_not_a_config_key():
    choice = {"method": "fldd", "steps": 2, "knob": "recipe", "value": "masked-warm/3e-4"}
    assert overrides_of(choice, SELECTION) == {**ALWAYS, "process.warm_start": "masked",
                                               "train.forward_freeze_fraction": 0.3, "train.forward_lr": 3e-4}
    assert overrides_of({"method": "masked-x0", "steps": 2, "knob": "train.lr", "value": 5e-4},
                        SELECTION) == {**ALWAYS, "train.lr": 5e-4}
    with pytest.raises(ValueError, match="no selection run"):
        overrides_of({"method": "masked-x0", "steps": 4, "knob": "train.lr", "value": 5e-4}, SELECTION)


def test_choices_without_a_learned_method_or_a_budget_are_refused_before_training(tmp_path, capsys):
    only_fixed = tmp_path / "fixed.json"
    only_fixed.write_text(json.dumps({"protocol": {"dataset": "toy2d", "train_steps": 100},
                                      "choices": [{"method": "masked-x0", "steps": 2, "knob": "train.lr",
                                                   "value": 5e-4}], "selection_runs": SELECTION}))
    with pytest.raises(SystemExit):
        main(["--choices", str(only_fixed), "--out", str(tmp_path / "g.json"), "--home", str(tmp_path / "h")])
    assert "no choice for" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--choices", str(tmp_path / "absent.json"), "--out", str(tmp_path / "g.json")])
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists() and not (tmp_path / "h").exists()


def test_a_run_is_found_again_only_if_it_was_made_of_the_same_choice():
    """Runs and models are named with a digest of what made them: other overrides, steps or runs
    give another name (a fresh run), the same ones in any key order the same name (a resume)."""
    lr = {**ALWAYS, "train.lr": 5e-4}
    assert digest(lr, 3000, 500) == digest(dict(reversed(list(lr.items()))), 3000, 500)
    assert len({digest(lr, 3000, 500), digest({**lr, "train.lr": 1e-3}, 3000, 500), digest(lr, 6000, 500),
                digest(lr, 3000, 250)}) == 4
