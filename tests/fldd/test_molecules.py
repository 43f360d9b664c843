"""fldd.molecules and `fldd data prepare --smiles`: SMILES tokens round-trip, the smiles codec, prepared
molecule tables, the built-in moses data set, and the chemistry scores on lists with known answers
(RDKit, fcd and molsets come from the `molecules` extra, which `make test` installs)."""

import gzip
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from commands.cli import main
from fldd.codec import CodecError, TokenCodec
from fldd.config import FLDDConfig
from fldd.data import load_splits, load_test_split, read_token_table
from fldd.datasets import MOSES_SEQ_LEN, MOSES_SYMBOLS, builtin_codec
from fldd.molecules import (MissingExtra, SmilesError, canonical, chemnet_statistics, frechet_chemnet_distance,
                            molecule_metrics, moses_file, tokenize_smiles)
from fldd.prepare import prepare_smiles
from fldd.token_table import DataError

FIXTURE = Path(__file__).parent / "fixtures" / "molecules.smi"  # 30 hand-written + 270 from MOSES's test file


def fixture_smiles() -> list[str]:
    return FIXTURE.read_text().split()


def test_tokens_join_back_to_every_fixture_smiles():
    molecules = fixture_smiles()
    assert len(molecules) == 300
    for smiles in molecules:
        assert "".join(tokenize_smiles(smiles)) == smiles
    # one token each: bracket atoms (stereo, charges, isotopes), two-letter elements, %nn ring bonds
    assert tokenize_smiles("C[C@@H](N)Cl") == ["C", "[C@@H]", "(", "N", ")", "Cl"]
    assert tokenize_smiles("[NH4+].[O-]Br") == ["[NH4+]", ".", "[O-]", "Br"]
    assert tokenize_smiles("C%11CCCCC%11") == ["C", "%11", "C", "C", "C", "C", "C", "%11"]
    assert tokenize_smiles("F/C=C\\F") == ["F", "/", "C", "=", "C", "\\", "F"]
    assert tokenize_smiles("c1cc[se]c1") == ["c", "1", "c", "c", "[se]", "c", "1"]


def test_untokenizable_smiles_names_the_character():
    with pytest.raises(SmilesError, match=r"character 'X' at position 3"):
        tokenize_smiles("CCXC")
    with pytest.raises(SmilesError, match=r"character ' ' at position 2"):
        tokenize_smiles("C CO")


def test_smiles_codec_round_trip_and_padding():
    codec = TokenCodec("smiles", symbols=("", "(", ")", "1", "C", "Cl", "O", "c"))
    ids = codec.encode("Clc1ccccc1")
    assert codec.decode(ids) == "Clc1ccccc1" and ids[0] == codec.symbols.index("Cl")
    assert codec.decode([4, 0, 4, 6, 0, 0]) == "CCO"  # padding anywhere disappears
    assert TokenCodec.from_json(codec.to_json()) == codec and codec.vocab_size == 8 and codec.is_text
    with pytest.raises(CodecError, match=r"SMILES tokens \['N'\] are outside the vocabulary"):
        codec.encode("CCN")
    with pytest.raises(CodecError, match="not a SMILES token"):
        codec.encode("C C")
    for symbols in (("C", "O"), ("", "C", "C"), ("",), ("", "C", "")):
        with pytest.raises(CodecError, match="a smiles codec needs"):
            TokenCodec("smiles", symbols=symbols)


def test_prepare_smiles_round_trip(tmp_path):
    molecules = fixture_smiles()
    result = prepare_smiles([str(FIXTURE)], tmp_path / "mol", valid_fraction=0.1, test_fraction=0.1, seed=3)
    longest = max(len(tokenize_smiles(s)) for s in molecules)
    codec = result.token_codec
    assert result.seq_len == longest and codec.kind == "smiles" and codec.symbols[0] == ""
    assert set(codec.symbols[1:]) == {t for s in molecules for t in tokenize_smiles(s)}
    decoded = []
    for split in ("train", "valid", "test"):
        tokens, vocab = read_token_table(tmp_path / "mol" / (split if split == "train" else f"{split}.parquet"))
        assert tokens.shape[1] == longest and vocab == codec.vocab_size
        decoded += [codec.decode(row) for row in tokens.tolist()]
    assert sorted(decoded) == sorted(molecules)  # every molecule once, exactly as written
    summary = result.summary()
    assert "prepared 1 smiles file(s) (300 molecules)" in summary and "codec smiles" in summary
    assert json.loads((tmp_path / "mol" / "fldd_data.json").read_text())["kind"] == "smiles"


def test_prepare_smiles_csv_gz_column_and_invalid_lines(tmp_path):
    molecules = fixture_smiles()[:40]
    rows = ["id,smiles,name"] + [f"{i},{s},m{i}" for i, s in enumerate(molecules)]
    rows.insert(5, "99,C1CC,broken")  # an unclosed ring: line 6 of the file
    rows.insert(9, "98,C C,spaced")  # RDKit would read "C C" as CC named C; no SMILES token covers the space
    path = tmp_path / "mols.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    with pytest.raises(DataError, match=r"mols\.csv\.gz:6: 'C1CC' is not a molecule RDKit can parse.*--invalid skip"):
        prepare_smiles([str(path)], tmp_path / "refused")
    assert not (tmp_path / "refused" / "train").exists()
    result = prepare_smiles([str(path)], tmp_path / "skipped", invalid="skip", valid_fraction=0.2, test_fraction=0.2)
    assert sum(result.rows.values()) == 40
    assert any(note.startswith("left out 2 SMILES (RDKit cannot parse them, or not SMILES tokens; first: ")
               and note.endswith("mols.csv.gz:6, " + str(path) + ":10)") for note in result.notes), result.notes
    rows.pop(5)
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    with pytest.raises(DataError, match=r"mols\.csv\.gz:9: 'C C': character ' ' at position 2 is not a SMILES token"):
        prepare_smiles([str(path)], tmp_path / "refused_space")
    with pytest.raises(DataError, match=r"no column 'SMILES'; the columns are \['id', 'smiles', 'name'\]"):
        prepare_smiles([str(path)], tmp_path / "c", column="SMILES")
    (tmp_path / "named.csv").write_text("id,structure\n1,CCO\n")
    with pytest.raises(DataError, match=r"no SMILES column; name it with --column"):
        prepare_smiles([str(tmp_path / "named.csv")], tmp_path / "d")
    (tmp_path / "empty_column.csv").write_text("smiles,x\n,1\n,2\n")
    with pytest.raises(DataError, match="no SMILES in column 'smiles'"):
        prepare_smiles([str(tmp_path / "empty_column.csv")], tmp_path / "e", column="smiles")
    (tmp_path / "empty.smi").write_text("")
    with pytest.raises(DataError, match="empty.smi: no SMILES"):
        prepare_smiles([str(tmp_path / "empty.smi")], tmp_path / "f")
    (tmp_path / "all_bad.smi").write_text("smiles\nC1CC\nC(C\n")
    with pytest.raises(DataError, match=r"no valid SMILES \(2 left out\)"):
        prepare_smiles([str(tmp_path / "all_bad.smi")], tmp_path / "g", invalid="skip")
    with pytest.raises(DataError, match="--column is for CSV files"):
        prepare_smiles([str(FIXTURE)], tmp_path / "h", column="smiles")


def test_cli_prepare_smiles_options(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "prepare", "--smiles", str(FIXTURE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "codec smiles" in printed and f"fldd train --config moses --set data.path={out.resolve()}" in printed
    assert main(["data", "inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "codec: smiles, " in report and "'<pad>'" in report  # the padding token named in the histogram
    first = next(line for line in report.splitlines() if "train row 0: " in line).split("train row 0: ")[1]
    assert first.strip("'") in fixture_smiles()  # examples decode to the molecules
    assert main(["data", "prepare", "--smiles", str(FIXTURE), "--out", str(tmp_path / "x"), "--seq-len", "9",
                 "--columns", "a"]) == 2
    assert "--seq-len: for --text only; --columns: for --csv only" in capsys.readouterr().err
    assert main(["data", "prepare", "--text", str(FIXTURE), "--out", str(tmp_path / "y"), "--invalid", "skip"]) == 2
    assert "--invalid: for --smiles only" in capsys.readouterr().err


def test_molecule_metrics_on_known_lists():
    train = ["CCO", "c1ccccc1", "CC(=O)O"]
    # OCC is CCO written another way; C1CC does not parse; "" (all padding) is invalid
    samples = ["OCC", "CCO", "CCN", "CCN", "C1CC", "", "c1ccncc1", "CC(O)=O"]
    scores = molecule_metrics(samples, train, reference=None)
    assert scores["validity"] == pytest.approx(6 / 8)
    assert scores["uniqueness"] == pytest.approx(4 / 6)  # CCO, CCN, pyridine, acetic acid
    assert scores["novelty"] == pytest.approx(2 / 4)  # CCN and pyridine are not training molecules
    assert scores["copy_rate"] == pytest.approx(3 / 8)  # OCC, CCO and CC(O)=O are
    assert "fcd" not in scores and "fcd_molecules" not in scores
    nothing = molecule_metrics(["C1CC", ""], train, reference=None)  # no valid sample: nothing to measure
    assert nothing["validity"] == 0 and np.isnan(nothing["uniqueness"]) and np.isnan(nothing["novelty"])
    assert canonical("OCC") == canonical("CCO") and canonical("C1CC") is None and canonical("") is None
    with pytest.raises(ValueError, match="no samples"):
        molecule_metrics([], train, None)


def test_fcd_separates_real_molecules_from_shuffled_characters():
    from fldd.molecules import moses_smiles, reference_statistics

    molecules = list(moses_smiles("test")[:1200])  # two disjoint sets of real molecules
    reference = reference_statistics(molecules[600:])
    real = frechet_chemnet_distance(molecules[:600], reference)
    rng = random.Random(0)
    shuffled = frechet_chemnet_distance(["".join(rng.sample(s, len(s))) for s in molecules[:600]], reference)
    assert 0 < real < 10 and shuffled > 5 * real, (real, shuffled)


def test_fcd_reads_canonical_forms_of_the_valid_samples_only():
    from rdkit import Chem

    from fldd.molecules import reference_statistics

    molecules = fixture_smiles()
    reference = reference_statistics(molecules)
    # another spelling of every molecule (random atom order): the same molecules, so FCD ~ 0 after
    # canonicalisation (ChemNet alone, on the raw strings, puts them apart)
    respelled = [Chem.MolToSmiles(Chem.MolFromSmiles(s), doRandom=True, canonical=False) for s in molecules]
    assert respelled != molecules and abs(molecule_metrics(respelled, [], reference)["fcd"]) < 1e-3
    assert frechet_chemnet_distance(respelled, reference) > 1  # raw strings: not the same to ChemNet
    # invalid samples are left out of the FCD, not scored as strings
    mixed = molecule_metrics(molecules + ["C1CC", "C(C", ""], [], reference)
    assert mixed["validity"] == pytest.approx(300 / 303) and abs(mixed["fcd"]) < 1e-3
    assert mixed["fcd_molecules"] == 300
    # fewer than 2 valid samples: NaN, not an error
    assert np.isnan(molecule_metrics(["C1CC", "CCO"], molecules, reference)["fcd"])


def test_token_samples_with_padding_inside_are_invalid():
    from fldd.molecules import score_token_samples

    symbols = ("", "C", "O", "N")
    samples = np.array([[1, 1, 2, 0, 0],   # CCO
                        [1, 1, 0, 0, 2],   # C C . . O: a token after padding, invalid though "CCO" parses
                        [0, 0, 0, 0, 0],   # empty: invalid
                        [0, 1, 1, 2, 0],   # . C C O .: padding first, then tokens: invalid too
                        [1, 3, 0, 0, 0]])  # CN
    held_out = np.array([[1, 1, 2, 0, 0], [1, 1, 3, 0, 0], [1, 2, 0, 0, 0]])
    scores = score_token_samples(samples, np.array([[1, 1, 2, 0, 0]]), held_out, symbols)
    assert scores["interior_padding"] == pytest.approx(2 / 5) and scores["validity"] == pytest.approx(2 / 5)
    assert scores["copy_rate"] == pytest.approx(1 / 5) and scores["novelty"] == pytest.approx(1 / 2)
    assert scores["fcd_molecules"] == 2


def test_builtin_moses_splits():
    cfg = FLDDConfig().with_overrides({"data.name": "moses", "data.num_train": 300, "data.num_valid": 50})
    train, valid = load_splits(cfg)
    test = load_test_split(cfg.with_overrides({"seq_len": MOSES_SEQ_LEN, "vocab_size": len(MOSES_SYMBOLS)}))
    assert train.shape == (300, MOSES_SEQ_LEN) and valid.shape == test.shape == (50, MOSES_SEQ_LEN)
    codec = builtin_codec("moses")
    decoded = {split: [codec.decode(row) for row in rows.tolist()]
               for split, rows in (("train", train), ("valid", valid), ("test", test))}
    assert all(canonical(s) is not None for rows in decoded.values() for s in rows)
    assert not set(decoded["train"]) & set(decoded["valid"])  # carved from one permutation of the train file
    moses_test = set(gzip.decompress(moses_file("test.csv.gz").read_bytes()).decode().split()[1:])
    assert set(decoded["test"]) <= moses_test


def test_missing_extra_says_what_to_install(monkeypatch):
    import fldd.molecules

    monkeypatch.setitem(sys.modules, "rdkit", None)  # import rdkit -> ImportError
    fldd.molecules.rdkit_chem.cache_clear()  # imported by earlier tests: import it again
    with pytest.raises(MissingExtra, match=r"RDKit: pip install 'fldd\[molecules\]'"):
        canonical("CCO")
    monkeypatch.undo()
    fldd.molecules.rdkit_chem.cache_clear()
    monkeypatch.setitem(sys.modules, "fcd", None)
    fldd.molecules.fcd_module.cache_clear()
    with pytest.raises(MissingExtra, match=r"fcd package: pip install 'fldd\[molecules\]'"):
        chemnet_statistics(["CCO", "CCN"])

    from importlib.metadata import PackageNotFoundError

    def no_molsets(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.files", no_molsets)
    fldd.molecules.fcd_module.cache_clear()  # the fcd import refused above is not remembered
    with pytest.raises(MissingExtra, match=r"molsets wheel: pip install --no-deps molsets==0.3\.1"):
        fldd.molecules.moses_file("train.csv.gz")
