"""Molecules through the product's commands: a SMILES file prepared, trained with `fldd train`,
sampled as SMILES strings with `fldd sample`, scored by `fldd evaluate` (validity, uniqueness,
novelty, copies, FCD beside the NELBO), and gated by `fldd promote`, which records the scores."""

import json
import math
from pathlib import Path

from mlflow.tracking import MlflowClient

from commands.cli import main
from fldd.molecules import tokenize_smiles
from pipelines import registry
from pipelines.train import LaunchOptions, launch
from pipelines.tracking import tracking_uri
from fldd.config import CONFIG_DIR, FLDDConfig

FIXTURE = Path(__file__).parents[1] / "fldd" / "fixtures" / "molecules.smi"
SMALL = {"reverse_network.arch": "mlp", "forward_network.arch": "mlp", "reverse_network.width": 32,
         "forward_network.width": 32, "reverse_network.depth": 1, "forward_network.depth": 1,
         "train.batch_size": 32, "process.num_steps": 4}


def test_training_on_molecules_without_the_extra_stops_before_it_starts(home, tmp_path, capsys, monkeypatch):
    import sys

    import fldd.molecules

    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", "--smiles", str(FIXTURE), "--out", str(prepared)]) == 0
    monkeypatch.setitem(sys.modules, "rdkit", None)  # as if the molecules extra were not installed
    fldd.molecules.rdkit_chem.cache_clear()
    try:
        assert main(["train", "--config", "moses", "--set", f"data.path={prepared}", "--workers", "0",
                     "--name", "no-extra"]) == 2
    finally:
        monkeypatch.undo()
        fldd.molecules.rdkit_chem.cache_clear()
    assert "molecule validity needs RDKit: pip install 'fldd[molecules]'" in capsys.readouterr().err
    assert not (home / "runs" / "no-extra").exists()  # refused before any run was made


def test_a_smiles_file_trains_samples_evaluates_and_promotes(home, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", "--smiles", str(FIXTURE), "--out", str(prepared), "--valid-fraction", "0.15",
                 "--test-fraction", "0.15"]) == 0
    settings = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", "--config", "moses", "--set", f"data.path={prepared}", "--train-steps", "30",
                 "--workers", "0", "--name", "molecules", *settings]) == 0
    capsys.readouterr()
    checkpoint = str(home / "runs" / "molecules" / "model.pt")
    assert main(["sample", "--checkpoint", checkpoint, "-n", "5", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    vocabulary = {t for s in FIXTURE.read_text().split() for t in tokenize_smiles(s)}
    assert len(lines) == 5 and all(set(tokenize_smiles(line)) <= vocabulary for line in lines)  # strings, not ids

    assert main(["evaluate", "--checkpoint", checkpoint, "--split", "test", "--passes", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["split"] == "test" and scores["test_nelbo_bits"] > 0
    assert 0 <= scores["test_validity"] <= 1 and scores["test_fcd_molecules"] == round(scores["test_validity"] * 2000)
    assert 0 <= scores["test_interior_padding"] <= 1 and "test_uniqueness" in scores and "test_novelty" in scores
    # FCD over the valid samples: a number once two of the 2000 samples are valid, NaN (not an error) before
    assert math.isfinite(scores["test_fcd"]) == (scores["test_validity"] * 2000 >= 2)

    # the gate decides on the paired NELBO and records the molecule scores on the version
    cfg = FLDDConfig.from_yaml(CONFIG_DIR / "moses.yaml").with_overrides(
        {**SMALL, "data.path": str(prepared), "train.steps": 30, "data.name": "moses"})
    run_id = launch(cfg, LaunchOptions(workers=0, quiet=True, name="molecules-gate")).run_id
    (decision,) = registry.promote(run_id=run_id, model_name="molecules", passes=1)
    assert decision.promoted and set(decision.sample_scores) == {"validity", "uniqueness", "novelty", "copy_rate",
                                                                 "fcd", "fcd_molecules", "interior_padding"}
    tags = MlflowClient(tracking_uri()).get_model_version("molecules", decision.version).tags
    assert float(tags["fldd.test_validity"]) == decision.sample_scores["validity"]
    capsys.readouterr()
    assert main(["models", "molecules"]) == 0
    listed = capsys.readouterr().out
    assert "test scores" in listed and f"validity {decision.sample_scores['validity']:.4f}" in listed
