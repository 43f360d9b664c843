"""fldd.prepare and `fldd data`: text and CSV files as token tables (round trips through
fldd.data.read_token_table and the codec), seeded block splits, errors that name the problem, and
the streaming inspect report."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from commands.cli import main
import fldd.prepare as prepare
import fldd.split_writer as split_writer
from commands.formatting import format_inspect
from fldd.codec import CODEC_KEY, CodecError, TokenCodec, codec_from_metadata
from fldd.data import read_token_table
from fldd.datasets import SPLITS
from fldd.inspection import inspect_data
from fldd.prepare import prepare_csv, prepare_text
from fldd.split_writer import plan_splits
from fldd.token_table import VOCAB_KEY, DataError

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café", "—", "42"]


def corpus_files(tmp_path, count=3, words=4000):
    """Files of pseudo-random text with newlines; returns (paths, their concatenation)."""
    rng = np.random.default_rng(1)
    texts = []
    for i in range(count):
        picked = rng.choice(WORDS, size=words // count)
        texts.append("".join(w + ("\n" if rng.random() < 0.1 else " ") for w in picked))
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / "corpus" / f"part{i}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths, "".join(texts)


def expected_splits(chunks, valid_fraction, test_fraction, seed):
    plan = plan_splits(len(chunks), valid_fraction, test_fraction, seed)
    which = plan.assignment[np.arange(len(chunks)) // plan.block_rows]
    return {name: [c for c, w in zip(chunks, which) if w == i] for i, name in enumerate(SPLITS)}, plan


def split_path(out, split):
    """Where prepare writes a split: train is a directory of part files, valid and test are files."""
    return out / "train" if split == "train" else out / f"{split}.parquet"


def decoded_splits(out, codec=None):
    """{split: decoded rows}: valid and test in corpus order; train (shuffled into parts) sorted."""
    result = {}
    for split in SPLITS:
        tokens, vocab = read_token_table(split_path(out, split))
        first = sorted(split_path(out, split).glob("*.parquet"))[0] if split == "train" else split_path(out, split)
        metadata = pq.read_schema(first).metadata
        found = codec_from_metadata(metadata)
        assert codec is None or found == codec
        assert vocab == found.vocab_size == int(metadata[VOCAB_KEY])
        result[split] = [found.decode(row) for row in tokens.tolist()]
    result["train"] = sorted(result["train"], key=json.dumps)
    return result


def sorted_train(splits):
    return {**splits, "train": sorted(splits["train"], key=json.dumps)}


@pytest.mark.parametrize("read_chars", [7, prepare.READ_CHARS])
def test_text_round_trip(tmp_path, monkeypatch, read_chars):
    monkeypatch.setattr(prepare, "READ_CHARS", read_chars)  # 7: rows, lines and the carry cross block ends
    paths, text = corpus_files(tmp_path)
    out = tmp_path / "out"
    result = prepare_text([str(tmp_path / "corpus" / "*.txt")], out, seq_len=16, valid_fraction=0.1,
                          test_fraction=0.1, seed=3)
    assert result.sources == [str(p) for p in paths]
    codec = TokenCodec("chars", "".join(sorted(set(text))))
    assert result.vocabulary_from == "corpus" and result.token_codec == codec
    chunks = [text[i:i + 16] for i in range(0, len(text) - 15, 16)]
    want, plan = expected_splits(chunks, 0.1, 0.1, 3)
    assert decoded_splits(out, codec) == sorted_train(want)
    assert result.tokens_dropped == len(text) % 16 and result.tokens_total == len(text)
    assert result.rows == {name: len(rows) for name, rows in want.items()} and all(result.rows.values())
    described = json.loads((out / "fldd_data.json").read_text())
    assert described["rows"] == result.rows and described["codec"] == codec.to_dict()
    assert described["tokens_dropped"] == len(text) % 16 and described["seed"] == 3 and described["seq_len"] == 16
    assert described["files"] == {"train": [{"file": "train/part-00000.parquet", "rows": result.rows["train"]}],
                                  "valid": [{"file": "valid.parquet", "rows": result.rows["valid"]}],
                                  "test": [{"file": "test.parquet", "rows": result.rows["test"]}]}
    assert sorted(p.name for p in out.iterdir()) == ["fldd_data.json", "test.parquet", "train", "valid.parquet"]
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert schema.field("tokens").type == pa.list_(pa.int64(), 16)
    assert json.loads(schema.metadata[CODEC_KEY]) == codec.to_dict()


def test_bytes_round_trip_and_lowercase(tmp_path):
    raw = ("Ünïcode AND ascii\r\n" * 300).encode("utf-8")
    (tmp_path / "a.bin").write_bytes(raw)
    result = prepare_text([str(tmp_path / "a.bin")], tmp_path / "out", seq_len=10, use_bytes=True, lowercase=True)
    assert result.vocab_size == 256 and result.token_codec == TokenCodec("bytes")
    chunks = [raw.lower()[i:i + 10] for i in range(0, len(raw) - 9, 10)]
    want, _ = expected_splits(chunks, 0.05, 0.05, 0)
    for split in SPLITS:
        tokens, vocab = read_token_table(split_path(tmp_path / "out", split))
        rows = [bytes(row) for row in tokens.tolist()]
        assert vocab == 256 and (sorted(rows) == sorted(want[split]) if split == "train" else rows == want[split])


def test_given_alphabet_unknown_characters(tmp_path):
    (tmp_path / "a.txt").write_text("abc\nab\nabXc\n")
    with pytest.raises(DataError, match=r"a\.txt:3:3: character 'X' \(U\+0058\) is not in the alphabet"):
        prepare_text([str(tmp_path / "a.txt")], tmp_path / "out", seq_len=2, alphabet="abc\n")
    assert not (tmp_path / "out").exists()
    (tmp_path / "b.txt").write_text("abc\nabXc" * 40)
    result = prepare_text([str(tmp_path / "b.txt")], tmp_path / "out2", seq_len=4, alphabet="\nabc", unknown="c")
    assert result.unknown_replaced == 40 and result.vocabulary_from == "--alphabet"
    decoded = [s for rows in decoded_splits(tmp_path / "out2").values() for s in rows]
    assert sorted(decoded) == sorted(["abc\n", "abcc"] * 40)


def test_seeds_choose_blocks(tmp_path):
    _, text = corpus_files(tmp_path, count=1, words=6000)
    path = str(tmp_path / "corpus" / "part0.txt")
    tables = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_text([path], tmp_path / name, seq_len=4, seed=seed)
        tables[name] = {s: read_token_table(split_path(tmp_path / name, s))[0] for s in SPLITS}
    assert all((tables["a"][s] == tables["b"][s]).all() for s in SPLITS)
    a, c = tables["a"]["valid"], tables["c"]["valid"]
    assert a.shape != c.shape or (a != c).any()
    # whole blocks of consecutive rows go to one split: runs of a split are whole blocks
    plan = plan_splits(len(text) // 4, 0.05, 0.05, 0)
    assert plan.block_rows == 32
    which = plan.assignment[np.arange(len(text) // 4) // plan.block_rows]
    starts = np.flatnonzero(np.diff(which)) + 1
    assert (starts % plan.block_rows == 0).all() and len(starts) > 4


def test_plan_splits_small_and_invalid():
    plan = plan_splits(3, 0.05, 0.05, seed=0)
    assert plan.block_rows == 1 and sorted(plan.assignment.tolist()) == [0, 1, 2]
    plan = plan_splits(100, 0.05, 0.05, seed=0)  # blocks shrink so each held-out split gets about two
    assert plan.block_rows == 2 and (plan.assignment == 1).sum() >= 2
    with pytest.raises(DataError, match="too few to fill train, valid and test"):
        plan_splits(2, 0.05, 0.05, seed=0)
    with pytest.raises(DataError, match="--valid-fraction=0: must be in"):
        plan_splits(100, 0, 0.05, seed=0)
    with pytest.raises(DataError, match="leave nothing to train on"):
        plan_splits(100, 0.5, 0.5, seed=0)


def write_csv(path, rows, header=("id", "size", "colour", "note")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = [[str(i), str(rng.choice(["S", "M", "L", "XL"])), str(rng.choice(["red", "blue", ""])),
             str(rng.choice(["a, quoted", "é", "plain"]))] for i in range(400)]
    write_csv(tmp_path / "t.csv", rows)
    result = prepare_csv([str(tmp_path / "t.csv")], ["note", "size", "colour"], tmp_path / "out", seed=5)
    codec = result.token_codec
    assert codec.columns == ("note", "size", "colour")
    assert codec.categories == (("a, quoted", "plain", "é"), ("L", "M", "S", "XL"), ("", "blue", "red"))
    assert result.vocab_size == 4 and result.seq_len == 3
    records = [{"note": r[3], "size": r[1], "colour": r[2]} for r in rows]
    want, _ = expected_splits(records, 0.05, 0.05, 5)
    assert decoded_splits(tmp_path / "out", codec) == sorted_train(want)
    assert sum(result.rows.values()) == 400 and all(result.rows.values())


def test_csv_errors(tmp_path):
    write_csv(tmp_path / "t.csv", [["1", "S", "red", "x"]] * 50)
    with pytest.raises(DataError, match=r"no column\(s\) \['weight'\]; its columns are \['id', 'size', 'colour', "):
        prepare_csv([str(tmp_path / "t.csv")], ["size", "weight"], tmp_path / "out")
    with pytest.raises(DataError, match=r"needs --columns a,b,c: the columns of .* are \['id', 'size'"):
        prepare_csv([str(tmp_path / "t.csv")], None, tmp_path / "out")
    with pytest.raises(DataError, match="every column holds a single value"):
        prepare_csv([str(tmp_path / "t.csv")], ["size", "colour"], tmp_path / "out2")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(DataError, match=r"bad\.csv: .*Expected 2 columns, got 1"):
        prepare_csv([str(tmp_path / "bad.csv")], ["a"], tmp_path / "out3")
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="no records below the header"):
        prepare_csv([str(tmp_path / "header.csv")], ["a"], tmp_path / "out4")


def test_text_errors(tmp_path):
    (tmp_path / "short.txt").write_text("abcdef")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    out = tmp_path / "out"
    cases = [
        (dict(inputs=[str(tmp_path / "nothing*.txt")]), "nothing\\*.txt: no such file, and no files match"),
        (dict(inputs=[str(tmp_path)]), "is a directory"),
        (dict(inputs=[str(tmp_path / "empty.txt")]), "the corpus is empty"),
        (dict(inputs=[str(tmp_path / "short.txt")], seq_len=0), "--seq-len=0: must be an integer >= 1"),
        (dict(inputs=[str(tmp_path / "short.txt")], seq_len=10), "6 token\\(s\\), fewer than --seq-len 10"),
        (dict(inputs=[str(tmp_path / "short.txt")], seq_len=3), "too few to fill train, valid and test"),
        (dict(inputs=[str(tmp_path / "latin1.txt")], seq_len=1), "not UTF-8 text .* --bytes"),
        (dict(inputs=[str(tmp_path / "short.txt")], unknown="a"), "--unknown needs --alphabet"),
        (dict(inputs=[str(tmp_path / "short.txt")], alphabet="ab", unknown="z"), "must be one character of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            prepare_text(out=out, **kwargs)
    with pytest.raises(CodecError, match="at least 2 distinct"):
        prepare_text([str(tmp_path / "short.txt")], out, alphabet="aab")
    (tmp_path / "same.txt").write_text("aaaaaaaaaa")
    with pytest.raises(DataError, match="single distinct character"):
        prepare_text([str(tmp_path / "same.txt")], out, seq_len=1)
    assert not out.exists()  # nothing is created before the input is known to be good


def test_output_directory_is_not_overwritten_without_force(tmp_path):
    paths, _ = corpus_files(tmp_path, count=1)
    out = tmp_path / "out"
    prepare_text([str(paths[0])], out, seq_len=8)
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty; choose another, or pass --force"):
        prepare_text([str(paths[0])], out, seq_len=8)
    result = prepare_text([str(paths[0])], out, seq_len=4, force=True)
    assert (out / "mine.txt").read_text() == "keep" and result.seq_len == 4
    assert read_token_table(out / "train")[0].shape[1] == 4
    assert not list(out.glob(".*partial"))


def test_inspect_prepared_directory(tmp_path):
    (tmp_path / "a.txt").write_text("abcd" * 2000)  # every row is the same: held-out rows copy train rows
    prepare_text([str(tmp_path / "a.txt")], tmp_path / "out", seq_len=4)
    report = inspect_data(tmp_path / "out")
    rows = {t["split"]: t["rows"] for t in report["tables"]}
    assert list(rows) == list(SPLITS) and rows == report["prepared"]["rows"] and sum(rows.values()) == 2000
    assert report["seq_len"] == 4 and report["vocab_size"] == 4 and report["codec_kind"] == "chars"
    assert report["vocab_from"].startswith("fldd.vocab_size metadata")
    assert {h["symbol"] for h in report["histogram"]} == set("abcd") and report["histogram"][0]["count"] == 2000
    assert report["duplicates"] == {s: {"copies_of_train_rows": rows[s], "rows": rows[s]} for s in ("valid", "test")}
    assert [e["decoded"] for e in report["examples"]] == ["abcd"] * 3
    assert report["prepared"]["tokens_dropped"] == 0 and report["problems"] == []
    text = format_inspect(report)
    assert "vocabulary size 4 (from fldd.vocab_size metadata)" in text
    assert f"valid {rows['valid']} of {rows['valid']} rows" in text


def test_inspect_csv_and_no_copies(tmp_path):
    rows = [[str(i), str(i % 7), str(i % 11), "x"] for i in range(700)]  # (i mod 7, i mod 11): 77 distinct rows
    write_csv(tmp_path / "t.csv", rows)
    prepare_csv([str(tmp_path / "t.csv")], ["id", "size"], tmp_path / "out")  # id: every row distinct
    report = inspect_data(tmp_path / "out")
    assert report["codec_kind"] == "columns" and report["vocab_size"] == 700 and report["seq_len"] == 2
    assert all(d["copies_of_train_rows"] == 0 for d in report["duplicates"].values())
    assert [c["column"] for c in report["columns"]] == ["id", "size"] and report["columns"][1]["used"] == 7
    first = report["examples"][0]  # train rows are shuffled into their part: any row, decoded whole
    assert first["split"] == "train" and first["row"] == 0 and first["file"].endswith("train/part-00000.parquet")
    assert set(first["decoded"]) == {"id", "size"} and int(first["decoded"]["size"]) == int(first["decoded"]["id"]) % 7


def test_inspect_table_without_metadata(tmp_path):
    values = pa.array([[0, 5, 2], [1, 1, 1], [4, 0, 0]], type=pa.list_(pa.int32()))
    pq.write_table(pa.table({"tokens": values}), tmp_path / "plain.parquet", row_group_size=2)
    report = inspect_data(tmp_path / "plain.parquet")
    assert report["tables"] == [{"split": "all", "files": [str(tmp_path / "plain.parquet")], "rows": 3,
                                 "row_groups": 2, "file_rows": [{"file": str(tmp_path / "plain.parquet"), "rows": 3}]}]
    assert report["vocab_size"] == 6 and report["vocab_from"].startswith("largest token + 1: the table has no")
    assert report["codec"] is None and report["duplicates"] == {} and report["histogram"][0] == \
        {"token": 0, "count": 3, "share": 3 / 9, "symbol": None}
    assert [e["tokens"] for e in report["examples"]] == [[0, 5, 2], [1, 1, 1], [4, 0, 0]]
    assert "largest token + 1" in format_inspect(report)


def test_inspect_reports_problems(tmp_path):
    table = pa.table({"tokens": pa.array([[0, 5], [1, 1]], type=pa.list_(pa.int64()))})
    pq.write_table(table.replace_schema_metadata({VOCAB_KEY: b"3"}), tmp_path / "t.parquet")
    assert "token 5 is outside [0, 3)" in inspect_data(tmp_path / "t.parquet")["problems"][0]
    pq.write_table(pa.table({"tokens": pa.array([[0, 5], [1]])}), tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="ragged.parquet: row 1, column 'tokens': ragged row of length 1"):
        inspect_data(tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="column 'ids' is missing"):
        inspect_data(tmp_path / "t.parquet", column="ids")


def test_train_parts_rule():
    assert [split_writer.train_parts(n) for n in (0, 1, 99_999, 100_000, 149_999, 150_000)] == [1, 1, 1, 2, 2, 3]
    assert split_writer.train_parts(64 * 50_000) == 64 and split_writer.train_parts(10**9) == 64


def test_train_split_is_written_as_random_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(split_writer, "PART_ROWS", 200)
    rows = [[str(i), str(i % 3), "", ""] for i in range(2000)]  # the id says where a row is in the corpus
    write_csv(tmp_path / "t.csv", rows)
    result = prepare_csv([str(tmp_path / "t.csv")], ["id", "size"], tmp_path / "out", seed=4)
    train, plan = result.rows["train"], plan_splits(2000, 0.05, 0.05, 4)
    parts = sorted((tmp_path / "out" / "train").iterdir())
    assert len(parts) == plan.num_parts == split_writer.train_parts(train) == train // 200 > 4
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    assert result.files["train"] == [{"file": f"train/{p.name}", "rows": pq.read_metadata(p).num_rows}
                                     for p in parts]
    assert json.loads((tmp_path / "out" / "fldd_data.json").read_text())["files"] == result.files
    want, _ = expected_splits(list(range(2000)), 0.05, 0.05, 4)
    ids = [[int(r["id"]) for r in map(result.token_codec.decode, read_token_table(p)[0].tolist())] for p in parts]
    assert sorted(i for part in ids for i in part) == want["train"]
    sizes = [len(part) for part in ids]
    assert max(sizes) - min(sizes) <= 2 * plan.block_rows  # equal numbers of blocks (each up to block_rows rows)
    for part in ids:  # a random sample of blocks from the whole corpus, not one stretch of it
        assert max(part) - min(part) > 3 * len(part)
        neighbours = sum(abs(a - b) == 1 for a, b in zip(part, part[1:]))
        assert neighbours < len(part) // 4  # rows within a part's row groups are in random order too
    from fldd.data import find_splits
    assert len(find_splits(tmp_path / "out")["train"].paths) == len(parts)  # training reads every part
    again = prepare_csv([str(tmp_path / "t.csv")], ["id", "size"], tmp_path / "again", seed=4)
    assert again.files == result.files and all(
        pq.read_table(p).equals(pq.read_table(tmp_path / "again" / "train" / p.name)) for p in parts)


def test_force_replaces_an_older_layout_and_only_its_own_parts(tmp_path, monkeypatch):
    from fldd.data import write_token_table
    paths, _ = corpus_files(tmp_path, count=1)
    out = tmp_path / "out"
    for split in SPLITS:  # what older versions of prepare wrote: train.parquet (it would shadow train/)
        write_token_table(out / f"{split}.parquet", np.zeros((4, 3), dtype=np.int64), 5)
    (out / "fldd_data.json").write_text("{}")
    (out / "mine.txt").write_text("keep")
    prepare_text([str(paths[0])], out, seq_len=4, force=True)
    assert not (out / "train.parquet").exists() and (out / "mine.txt").read_text() == "keep"
    assert read_token_table(out)[0].shape[1] == 4
    monkeypatch.setattr(split_writer, "PART_ROWS", 100)
    many = prepare_text([str(paths[0])], out, seq_len=4, force=True)
    assert len(list((out / "train").iterdir())) == len(many.files["train"]) > 3
    monkeypatch.setattr(split_writer, "PART_ROWS", 50_000)
    few = prepare_text([str(paths[0])], out, seq_len=4, force=True)  # the old, extra parts are removed
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet"] == \
        [f["file"].split("/")[1] for f in few.files["train"]]
    assert sorted(p.name for p in out.iterdir()) == ["fldd_data.json", "mine.txt", "test.parquet", "train",
                                                     "valid.parquet"]
    (out / "train" / "other.parquet").write_bytes(b"")  # not ours: it would join the training data
    with pytest.raises(DataError, match=r"train: holds files `fldd data prepare` did not write \(other\.parquet\)"):
        prepare_text([str(paths[0])], out, seq_len=4, force=True)
    assert (out / "train" / "part-00000.parquet").is_file() and (out / "fldd_data.json").is_file()


def test_input_that_changes_between_the_passes_is_refused(tmp_path):
    codec, plan = TokenCodec("chars", "ab"), plan_splits(100, 0.05, 0.05, seed=0)
    for rows in (99, 101):  # the first pass counted 100 rows
        out = tmp_path / str(rows)
        split_writer.claim_output(out)
        writer = split_writer.SplitWriter(out, 3, codec, plan)
        with pytest.raises(DataError, match="the input changed while it was being prepared"):
            split_writer.write_all(writer, (writer.add_rows(np.zeros((rows, 3), dtype=np.int64)) for _ in range(1)))
            split_writer.finish(writer, split_writer.Prepared(str(out), "text", [], 3, 2, codec.to_dict(), {}, 0, 0.05,
                                                     0.05, plan.block_rows, 300, 0, "corpus"))
        assert sorted(p.name for p in out.iterdir()) == []


def write_split_files(root, files, vocabs=None):
    """{relative path: rows} -> Parquet token files (list<int64>) with fldd.vocab_size metadata."""
    for i, (name, values) in enumerate(files.items()):
        vocab = (vocabs or {}).get(name, 5)
        table = pa.table({"tokens": pa.array(values, type=pa.list_(pa.int64()))})
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.replace_schema_metadata({VOCAB_KEY: str(vocab).encode()}), root / name)


def test_inspect_counts_rows_per_file(tmp_path):
    good = [[0, 1], [1, 2], [2, 3]]
    write_split_files(tmp_path / "r", {"train/a.parquet": good, "train/b.parquet": [[0, 1], [4, 0], [1, 2, 3]],
                                       "valid.parquet": good})
    with pytest.raises(DataError, match=r"train/b\.parquet: row 2, column 'tokens': ragged row of length 3"):
        inspect_data(tmp_path / "r")
    write_split_files(tmp_path / "o", {"train/a.parquet": good, "train/b.parquet": [[0, 1], [4, 0], [1, 7]],
                                       "valid.parquet": good, "test.parquet": [[0, 0]]})
    report = inspect_data(tmp_path / "o")
    assert report["problems"] == [f"{tmp_path / 'o' / 'train' / 'b.parquet'}: row 2, column 'tokens': token 7 is "
                                  "outside [0, 5): training would refuse this table"]
    train = report["tables"][0]
    assert train["rows"] == 6 and train["file_rows"] == [{"file": str(tmp_path / "o" / "train" / n), "rows": 3}
                                                         for n in ("a.parquet", "b.parquet")]
    text = format_inspect(report)
    assert f"2 files in {tmp_path / 'o' / 'train'}/" in text and "train a.parquet row 0: 0 1" in text


def test_inspect_finds_tables_as_training_does(tmp_path):
    from fldd.config import FLDDConfig
    from fldd.data import describe_data
    (tmp_path / "a.txt").write_text("abcd efgh " * 400)
    prepare_text([str(tmp_path / "a.txt")], tmp_path / "out", seq_len=5)
    local, remote = inspect_data(tmp_path / "out"), inspect_data(f"file://{tmp_path / 'out'}")
    assert remote["prepared"] == local["prepared"] and remote["problems"] == local["problems"] == []
    assert [t["rows"] for t in remote["tables"]] == [t["rows"] for t in local["tables"]]
    assert remote["tables"][0]["files"] == [f"file://{tmp_path / 'out' / 'train' / 'part-00000.parquet'}"]
    write_split_files(tmp_path / "v", {"train/a.parquet": [[0, 1]], "train/b.parquet": [[0, 1]],
                                       "valid.parquet": [[0, 1]]}, vocabs={"train/b.parquet": 9})
    report = inspect_data(tmp_path / "v")  # the first file's metadata; a disagreement names both files
    assert report["vocab_size"] == 5 and report["problems"] == [
        f"{tmp_path / 'v' / 'train' / 'b.parquet'} says fldd.vocab_size=9 in its metadata, but "
        f"{tmp_path / 'v' / 'train' / 'a.parquet'} says 5: the files of one table must agree (training refuses "
        "this table)"]
    with pytest.raises(DataError, match="the files of one table must agree"):
        describe_data(FLDDConfig().with_overrides({"data.path": str(tmp_path / "v")}))
    write_split_files(tmp_path / "h", {"train.parquet": [[0, 1]], "test.parquet": [[0, 1]]})
    with pytest.raises(DataError, match="has a test and train split but no valid"):
        inspect_data(tmp_path / "h")


# ---- the command line ------------------------------------------------------------------------

def test_cli_prepare_and_inspect(tmp_path, capsys):
    paths, text = corpus_files(tmp_path, count=2)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--text", str(tmp_path / "corpus" / "*.txt"), "--out", str(out),
                 "--seq-len", "32", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sorted set of characters found in the corpus" in printed
    dropped = f"dropped the last {len(text) % 32} token(s)" if len(text) % 32 else "no tokens dropped"
    assert dropped in printed and "fldd train --config text" in printed
    assert main(["data", "inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq_len"] == 32 and report["codec"]["kind"] == "chars"
    assert sum(t["rows"] for t in report["tables"]) == len(text) // 32
    assert main(["data", "inspect", str(out)]) == 0
    assert "examples:" in capsys.readouterr().out
    # refusals: exit 2, one line naming the problem
    for argv, message in (
        (["--text", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "o2")], "no files match"),
        (["--text", str(paths[0]), "--out", str(out)], "not empty"),
        (["--text", str(paths[0]), "--out", str(tmp_path / "o3"), "--seq-len", "0"], "--seq-len=0"),
        (["--text", str(paths[0]), "--out", str(tmp_path / "o4"), "--alphabet", "ab"], "is not in the alphabet"),
        (["--text", str(paths[0]), "--out", str(tmp_path / "o5"), "--alphabet", "aa"], "at least 2 distinct"),
        (["--text", str(paths[0]), "--out", str(tmp_path / "o6"), "--columns", "a"], "--columns: for --csv only"),
        (["--csv", str(paths[0]), "--out", str(tmp_path / "o7"), "--seq-len", "3"], "--seq-len: for --text only"),
    ):
        assert main(["data", "prepare", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fldd data prepare: error:") and message in err and err.count("\n") == 1, err


def test_cli_csv_and_inspect_exit_codes(tmp_path, capsys):
    write_csv(tmp_path / "t.csv", [[str(i), str(i % 3), str(i % 5), ""] for i in range(300)])
    assert main(["data", "prepare", "--csv", str(tmp_path / "t.csv"), "--columns", "size, colour",
                 "--out", str(tmp_path / "out")]) == 0
    assert "codec columns: 2 columns, categories per column: size 3, colour 5" in capsys.readouterr().out
    assert main(["data", "prepare", "--csv", str(tmp_path / "t.csv"), "--columns", "size,weight",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "no column(s) ['weight']; its columns are ['id', 'size', 'colour', 'note']" in capsys.readouterr().err
    table = pa.table({"tokens": pa.array([[0, 5]], type=pa.list_(pa.int64()))})
    pq.write_table(table.replace_schema_metadata({VOCAB_KEY: b"3"}), tmp_path / "bad.parquet")
    assert main(["data", "inspect", str(tmp_path / "bad.parquet")]) == 1
    assert "problem: " + str(tmp_path / "bad.parquet") + ": row 0, column 'tokens': token 5 is outside [0, 3)" \
        in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "fldd data inspect: error:" in capsys.readouterr().err


def test_cli_sample_decodes_with_the_codec(tmp_path, capsys):
    from fldd.model import FLDDModel
    from tests.conftest import tiny_config

    alphabet = "ab\nc"
    FLDDModel(tiny_config({"process.method": "masked"}, K=4, D=5), codec=TokenCodec("chars", alphabet)).save(
        tmp_path / "text.pt")
    assert main(["sample", "--checkpoint", str(tmp_path / "text.pt"), "-n", "40", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 40 and "JSON string" in captured.err  # some samples hold a newline: quoted
    texts = [json.loads(line) for line in lines]
    assert all(len(t) == 5 and set(t) <= set(alphabet) for t in texts)
    assert main(["sample", "--checkpoint", str(tmp_path / "text.pt"), "-n", "40", "--seed", "3", "--out",
                 str(tmp_path / "s.jsonl")]) == 0
    assert [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()] == texts
    assert "wrote 40 samples (text, one JSON value per line)" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(tmp_path / "text.pt"), "-n", "2", "--format", "tokens"]) == 0
    assert all(len(line.split()) == 5 for line in capsys.readouterr().out.splitlines())
    assert main(["sample", "--checkpoint", str(tmp_path / "text.pt"), "--format", "rows"]) == 2
    assert "--format rows: this model has a chars codec; use --format text" in capsys.readouterr().err

    codec = TokenCodec("columns", columns=("size", "colour"), categories=(("L", "S"), ("blue", "red")))
    FLDDModel(tiny_config(K=2, D=2), codec=codec).save(tmp_path / "rows.pt")
    assert main(["sample", "--checkpoint", str(tmp_path / "rows.pt"), "-n", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and all(r["size"] in ("L", "S") and r["colour"] in ("blue", "red") for r in rows)
    FLDDModel(tiny_config(K=2, D=2)).save(tmp_path / "plain.pt")
    assert main(["sample", "--checkpoint", str(tmp_path / "plain.pt"), "--format", "text"]) == 2
    assert "this model has no codec" in capsys.readouterr().err
