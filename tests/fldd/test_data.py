"""Parquet token tables: round trip, splits, and validation that names the file, row and column."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fldd.config import FLDDConfig
from fldd.data import DataError, load_splits, read_token_table, write_token_table


def write_raw(path, values, type_=None, metadata=None, column="tokens"):
    metadata = {b"fldd.vocab_size": b"5"} if metadata is None else metadata
    table = pa.table({column: pa.array(values, type=type_)})
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


def test_round_trip_and_directory(tmp_path):
    tokens = torch.randint(0, 7, (20, 4))
    write_token_table(tmp_path / "d" / "a.parquet", tokens[:10], vocab_size=7)
    write_token_table(tmp_path / "d" / "b.parquet", tokens[10:], vocab_size=7)
    again, vocab = read_token_table(tmp_path / "d")
    assert vocab == 7 and torch.equal(again, tokens)


@pytest.mark.parametrize("values, type_, message", [
    ([[0, 1], [2]], pa.list_(pa.int64()), r"row 1, column 'tokens': ragged row of length 1"),
    ([[0, 1], [2, 5]], pa.list_(pa.int64()), r"row 1, column 'tokens': token outside \[0, vocab_size\) 5"),
    ([[0, 1], [-1, 2]], pa.list_(pa.int64()), r"row 1, column 'tokens': negative token -1"),
    ([[0.0, 1.0]], pa.list_(pa.float64()), r"column 'tokens' has type list<.*double>; expected a list of integers"),
    ([[0, 1], None], pa.list_(pa.int64()), r"row 1, column 'tokens': null row"),
    ([], pa.list_(pa.int64()), r"column 'tokens': the table is empty"),
])
def test_bad_tables_are_named(tmp_path, values, type_, message):
    path = write_raw(tmp_path / "bad.parquet", values, type_)
    with pytest.raises(DataError, match=message) as info:
        read_token_table(path)
    assert str(path) in str(info.value)


def test_missing_column_vocab_and_file(tmp_path):
    path = write_raw(tmp_path / "t.parquet", [[0, 1]], pa.list_(pa.int32()), column="ids")
    with pytest.raises(DataError, match=r"column 'tokens' is missing \(columns: \['ids'\]\)"):
        read_token_table(path)
    assert read_token_table(path, column="ids")[0].tolist() == [[0, 1]]
    nometa = write_raw(tmp_path / "n.parquet", [[0, 1], [4, 2]], pa.list_(pa.int64()), metadata={})
    assert read_token_table(nometa)[1] == 5  # no metadata: the largest token + 1
    assert read_token_table(nometa, vocab_size=7)[1] == 7  # or data.vocab_size
    with pytest.raises(DataError, match=r"token outside \[0, vocab_size\) 4 \(vocab_size=3\)"):
        read_token_table(nometa, vocab_size=3)
    with pytest.raises(DataError, match="data.vocab_size=7, but .* says vocab_size=5 in its metadata"):
        read_token_table(write_raw(tmp_path / "m.parquet", [[0, 1]], pa.list_(pa.int64())), vocab_size=7)
    with pytest.raises(DataError, match="no such file"):
        read_token_table(tmp_path / "missing.parquet")


def test_load_splits_from_a_user_table(tmp_path):
    tokens = torch.randint(0, 5, (100, 3))
    write_token_table(tmp_path / "all.parquet", tokens, vocab_size=5)
    cfg = FLDDConfig(seq_len=3, vocab_size=5).with_overrides({"data.path": str(tmp_path / "all.parquet")})
    train, valid = load_splits(cfg)
    assert len(train) == 90 and len(valid) == 10
    assert sorted(map(tuple, torch.cat([train, valid]).tolist())) == sorted(map(tuple, tokens.tolist()))
    with pytest.raises(DataError, match="seq_len=4"):
        load_splits(FLDDConfig(seq_len=4, vocab_size=5).with_overrides({"data.path": str(tmp_path / "all.parquet")}))
    with pytest.raises(DataError, match="vocab_size=6"):
        load_splits(FLDDConfig(seq_len=3, vocab_size=6).with_overrides({"data.path": str(tmp_path / "all.parquet")}))
    split_dir = tmp_path / "split"
    write_token_table(split_dir / "train.parquet", tokens[:80], 5)
    write_token_table(split_dir / "valid.parquet", tokens[80:], 5)
    train, valid = load_splits(cfg.with_overrides({"data.path": str(split_dir)}))
    assert torch.equal(train, tokens[:80]) and torch.equal(valid, tokens[80:])


@pytest.mark.parametrize("name, shape, vocab, sizes", [
    ("toy2d", 2, 50, (20000, 2000, 2000)),
    ("digits", 64, 17, (1350, 150, 297)),
    ("digits-binary", 64, 2, (1350, 144, 284)),  # 6 + 13 copies of earlier splits' images dropped
    ("text", 64, 27, (4754, 529, 588)),
])
def test_builtin_data_sets(name, shape, vocab, sizes):
    from fldd.data import load_test_split

    cfg = FLDDConfig(seq_len=shape, vocab_size=vocab).with_overrides({"data.name": name})
    train, valid = load_splits(cfg)
    test = load_test_split(cfg)
    assert (len(train), len(valid), len(test)) == sizes
    for split in (train, valid, test):
        assert split.shape[1] == shape and split.min() >= 0 and split.max() < vocab
    assert torch.equal(load_splits(cfg)[0], train)  # deterministic
    if name.startswith("digits"):  # a fixed partition of the 1797 images, less held-out copies
        assert sum(sizes) <= 1797
    # no held-out example is an exact copy of an example of an earlier split (toy2d is sampled
    # from a 2500-cell pmf: there copies are the distribution, not a leak)
    if name != "toy2d":
        seen = {tuple(row) for row in train.tolist()}
        assert not seen & {tuple(row) for row in valid.tolist()}
        seen |= {tuple(row) for row in valid.tolist()}
        assert not seen & {tuple(row) for row in test.tolist()}


def test_text_is_text8_style():
    from fldd.datasets import text_to_tokens, tokens_to_text

    assert tokens_to_text(text_to_tokens("Hello,  World!\n42 x")[None])[0] == "hello world x"
    cfg = FLDDConfig(seq_len=64, vocab_size=27).with_overrides({"data.name": "text"})
    text = "".join(tokens_to_text(load_splits(cfg)[0][:200]))
    assert "  " not in text and set(text) <= set("abcdefghijklmnopqrstuvwxyz ")


def test_the_text_corpus_is_pinned_and_checked(tmp_path, monkeypatch):
    import gzip

    from fldd import datasets

    # the packaged corpus, not the running interpreter's pydoc topics
    assert datasets.TEXT_ASSET.is_file()
    tampered = tmp_path / "text.txt.gz"
    tampered.write_bytes(gzip.compress(gzip.decompress(datasets.TEXT_ASSET.read_bytes())[:-1000]))
    monkeypatch.setattr(datasets, "TEXT_ASSET", tampered)
    datasets._text_chunks.cache_clear()
    try:
        with pytest.raises(DataError, match="checksum mismatch"):
            datasets._text_chunks()
    finally:
        datasets._text_chunks.cache_clear()


def test_a_split_table_describes_itself(tmp_path, monkeypatch):
    from fldd.codec import TokenCodec
    from fldd.data import describe_data, find_splits, load_test_split, load_valid_split, resolve_data_shape

    tokens = torch.randint(0, 9, (300, 5))
    codec = TokenCodec("chars", "abcdefghi")
    write_token_table(tmp_path / "t" / "train" / "a.parquet", tokens[:100], 9, codec=codec)
    write_token_table(tmp_path / "t" / "train" / "sub" / "b.parquet", tokens[100:200], 9, codec=codec)
    write_token_table(tmp_path / "t" / "valid.parquet", tokens[200:250], 9, codec=codec)
    write_token_table(tmp_path / "t" / "test.parquet", tokens[250:], 9, codec=codec)
    cfg = FLDDConfig().with_overrides({"data.path": str(tmp_path / "t")})
    resolved, described = resolve_data_shape(cfg)
    assert (resolved.seq_len, resolved.vocab_size, described.vocab_from) == (5, 9, "metadata")
    assert described.rows == {"train": 200, "valid": 50, "test": 50} and described.streams
    assert described.codec == codec and "decodes as chars" in described.summary()
    assert torch.equal(load_splits(cfg)[0], tokens[:200]) and torch.equal(load_valid_split(cfg), tokens[200:250])
    assert torch.equal(load_test_split(cfg), tokens[250:])
    # the same table through a URI (the pyarrow file-system path that s3:// takes)
    assert describe_data(cfg.with_overrides({"data.path": (tmp_path / "t").as_uri()})).rows == described.rows
    # stated values must agree with the table, naming both
    with pytest.raises(DataError, match=r"seq_len=4 in the config, but .*/t has rows of length 5"):
        resolve_data_shape(cfg.with_overrides({"seq_len": 4}))
    with pytest.raises(DataError, match=r"vocab_size=12 in the config, but .* has a vocabulary of 9"):
        resolve_data_shape(cfg.with_overrides({"vocab_size": 12}))
    # a split layout needs train and valid
    write_token_table(tmp_path / "half" / "train.parquet", tokens, 9)
    write_token_table(tmp_path / "half" / "test.parquet", tokens, 9)
    with pytest.raises(DataError, match="has a test and train split but no valid"):
        find_splits(tmp_path / "half")


def test_table_without_metadata_takes_the_largest_token_and_says_so(tmp_path):
    from fldd.data import resolve_data_shape

    path = write_raw(tmp_path / "n.parquet", [[0, 1, 2], [6, 2, 0]], pa.list_(pa.int16()), metadata={})
    resolved, described = resolve_data_shape(FLDDConfig().with_overrides({"data.path": str(path)}))
    assert (resolved.seq_len, resolved.vocab_size) == (3, 7)
    assert "vocab_size 7 (from largest token + 1)" in described.summary()


def test_streaming_validation_counts_rows_across_record_batches(tmp_path, monkeypatch):
    import fldd.data
    from fldd.data import check_token_file, find_splits

    monkeypatch.setattr(fldd.data, "SCAN_BATCH_ROWS", 100)  # the bad row sits in the third batch
    tokens = torch.randint(0, 5, (300, 3))
    tokens[250, 1] = 7
    path = write_token_table(tmp_path / "big.parquet", tokens, 5)
    files = find_splits(path)["all"]
    with pytest.raises(DataError, match=r"big.parquet: row 250, column 'tokens': token outside \[0, vocab_size\) 7"):
        check_token_file(files, files.paths[0], "tokens", 3, 5)
    assert check_token_file(files, files.paths[0], "tokens", 3, 8) == 300


def test_vocabulary_rules_for_tables_with_and_without_metadata(tmp_path):
    from fldd.data import resolve_data_shape

    write_token_table(tmp_path / "mixed" / "a.parquet", torch.zeros(4, 2, dtype=torch.long), 5)
    write_token_table(tmp_path / "mixed" / "b.parquet", torch.zeros(4, 2, dtype=torch.long), 9)
    with pytest.raises(DataError, match=r"b.parquet says vocab_size=9 in its metadata, but .*a.parquet says 5"):
        resolve_data_shape(FLDDConfig().with_overrides({"data.path": str(tmp_path / "mixed")}))
    bare = write_raw(tmp_path / "bare.parquet", [[0, 1], [3, 2]], pa.list_(pa.int64()), metadata={})
    cfg = FLDDConfig().with_overrides({"data.path": str(bare)})
    # without metadata a stated vocab_size is the vocabulary (every token is checked against it)
    resolved, described = resolve_data_shape(cfg.with_overrides({"vocab_size": 10}))
    assert (resolved.vocab_size, described.vocab_from) == (10, "the config's vocab_size")
    with pytest.raises(DataError, match=r"token outside \[0, vocab_size\) 3 \(vocab_size=3\)"):
        load_splits(cfg.with_overrides({"vocab_size": 3}))
    huge = write_raw(tmp_path / "huge.parquet", [[0, 2_000_000_000]], pa.list_(pa.int64()), metadata={})
    with pytest.raises(DataError, match="largest token is 2000000000.*set data.vocab_size"):
        resolve_data_shape(FLDDConfig().with_overrides({"data.path": str(huge)}))


def test_a_corrupt_file_is_named(tmp_path):
    from fldd.data import check_token_file, find_splits

    path = write_token_table(tmp_path / "c.parquet", torch.randint(0, 5, (5000, 8)), 5)
    data = bytearray(path.read_bytes())
    data[200:4000] = bytes(3800)  # zero the first data pages; the footer still opens
    path.write_bytes(bytes(data))
    files = find_splits(path)["all"]
    with pytest.raises(DataError, match=r"c.parquet: (unreadable after row 0|not a readable Parquet file)"):
        check_token_file(files, files.paths[0], "tokens", 8, 5)
