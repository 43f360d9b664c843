"""Your own data through Ray Train: a split table describes itself (shape, vocabulary, codec),
streams to the workers from its files (the driver never reads the training files), is validated
file by file on the cluster naming the file and row of a bad token, and a prepared text corpus
trains with nothing but `data.path` and decodes back to text."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from commands.cli import main
import pipelines.train
from fldd.codec import TokenCodec
from fldd.data import DataError, write_token_table
from fldd.model import FLDDModel
from pipelines.tracking import tracking_uri
from pipelines.train import LaunchOptions, launch
from tests.pipelines.conftest import toy_config

ALPHABET = "abcdefghij"


def split_table(root, rows=(1200, 1200), bad=None, column="tokens"):
    """train/part-*.parquet + valid.parquet + test.parquet, seq_len 6, vocab 10, a chars codec.
    `bad=(file_index, row)` puts token 12 (outside the vocabulary) there."""
    rng = np.random.default_rng(0)
    codec = TokenCodec("chars", ALPHABET)
    for index, count in enumerate(rows):
        tokens = rng.integers(0, 10, (count, 6))
        if bad is not None and bad[0] == index:
            tokens[bad[1], 3] = 12
        write_token_table(root / "train" / f"part-{index:04d}.parquet", tokens, 10, column, codec)
    write_token_table(root / "valid.parquet", rng.integers(0, 10, (200, 6)), 10, column, codec)
    write_token_table(root / "test.parquet", rng.integers(0, 10, (200, 6)), 10, column, codec)
    return root


class WatchedParquet:
    """A ParquetFile that records which files this process reads rows from (footers are free)."""

    def __init__(self, parquet, name, scanned):
        self.parquet, self.name, self.scanned = parquet, name, scanned

    def __getattr__(self, attr):
        return getattr(self.parquet, attr)

    def iter_batches(self, *args, **kwargs):
        self.scanned.append(self.name)
        return self.parquet.iter_batches(*args, **kwargs)

    def read(self, *args, **kwargs):
        self.scanned.append(self.name)
        return self.parquet.read(*args, **kwargs)


def test_a_split_table_streams_to_two_workers_and_describes_itself(ray_cluster, home, tmp_path, monkeypatch):
    import fldd.data

    # two workers on the 2-CPU test cluster hold every CPU: Ray Data's reads must still run (no hang)
    table = split_table(tmp_path / "table", column="ids")
    scanned = []
    real_open = fldd.data._open
    monkeypatch.setattr(fldd.data, "_open",
                        lambda files, path: WatchedParquet(real_open(files, path), files.name(path), scanned))
    cfg = toy_config(**{"data.path": str(table), "data.column": "ids", "process.method": "masked",
                        "train.steps": 40})
    assert (cfg.seq_len, cfg.vocab_size) == (0, 0)  # nothing stated: the table says
    outcome = launch(cfg, LaunchOptions(workers=2, name="streamed", quiet=True))

    # the driver read rows of the validation split only; the training files went to the workers
    assert scanned and set(scanned) == {str((table / "valid.parquet").resolve())}
    params = MlflowClient(tracking_uri()).get_run(outcome.run_id).data.params
    assert (params["seq_len"], params["vocab_size"]) == ("6", "10")
    model = FLDDModel.load(outcome.model_path)
    assert model.codec == TokenCodec("chars", ALPHABET)  # the table's codec travels with the model
    assert np.isfinite(outcome.metrics["valid_nelbo_bits"])


def test_a_bad_token_in_a_streamed_file_is_named_before_training(ray_cluster, home, tmp_path):
    table = split_table(tmp_path / "bad", bad=(1, 737))
    cfg = toy_config(**{"data.path": str(table), "process.method": "masked"})
    with pytest.raises(DataError, match=r"part-0001\.parquet: row 737, column 'tokens': token outside "
                                        r"\[0, vocab_size\) 12 \(vocab_size=10\)"):
        launch(cfg, LaunchOptions(workers=1, name="bad-stream", quiet=True))
    experiment = MlflowClient(tracking_uri()).get_experiment_by_name("fldd")
    assert experiment is None or not MlflowClient(tracking_uri()).search_runs([experiment.experiment_id])
    # the refused run left nothing behind: the same name with the fixed table is a new run, not a
    # "different settings" refusal
    fixed = split_table(tmp_path / "fixed")
    outcome = launch(cfg.with_overrides({"data.path": str(fixed), "train.steps": 20}),
                     LaunchOptions(workers=0, name="bad-stream", quiet=True))
    assert not outcome.resumed


def test_a_prepared_text_corpus_trains_with_only_its_path_and_samples_decode(home, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 400)  # no newline: one sample per line
    assert main(["data", "prepare", "--text", str(corpus), "--out", str(tmp_path / "prepared"),
                 "--seq-len", "16"]) == 0
    small = ["--set", "reverse_network.width=32", "--set", "forward_network.width=32", "--set",
             "reverse_network.depth=1", "--set", "forward_network.depth=1", "--set", "train.batch_size=32"]
    assert main(["train", "--config", "text", "--set", f"data.path={tmp_path / 'prepared'}", "--train-steps", "6",
                 "--workers", "0", "--name", "prepared-text", *small]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(home / "runs" / "prepared-text" / "model.pt"), "-n", "4"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert len(lines) == 4 and all(len(line) == 16 and set(line) <= set(" abcdefghijklmnopqrstuvwxyz")
                                   for line in lines)
    # a stated value that disagrees with the table is bad input naming both
    assert main(["train", "--config", "text", "--set", f"data.path={tmp_path / 'prepared'}", "--set", "seq_len=64",
                 "--workers", "0", *small]) == 2
    error = capsys.readouterr().err
    assert "seq_len=64 in the config, but" in error and "rows of length 16" in error
