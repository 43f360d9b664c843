"""What real molecules score on the MOSES table's metrics, at the table's sizes: the floor the
generated samples are read against (a Frechet distance between finite sets is above 0 even for
two samples of one distribution).

2,000 real molecules (the last 2,000 of the `moses` preset's train split) are scored as if they
were generated, with the evaluation's own function (fldd.molecules.score_token_samples): novelty
and copies against the rest of the train split, FCD against the preset's 1,000 test molecules,
the sizes of the table's report runs.

    python benchmarks/moses_reference.py        # about a minute on 2 cores; docs/results/moses_reference.json
"""

from __future__ import annotations

import json
from pathlib import Path

from fldd.config import CONFIG_DIR, FLDDConfig
from fldd.data import load_splits, load_test_split, resolve_data_shape
from fldd.datasets import MOSES_SYMBOLS
from fldd.molecules import score_token_samples

ROOT = Path(__file__).resolve().parent.parent
NUM_REAL = 2000


def main() -> None:
    cfg, _ = resolve_data_shape(FLDDConfig.from_yaml(CONFIG_DIR / "moses.yaml"))
    train, _ = load_splits(cfg)
    test = load_test_split(cfg)
    real, rest = train[-NUM_REAL:], train[:-NUM_REAL]
    scores = score_token_samples(real.numpy(), rest.numpy(), test.numpy(), MOSES_SYMBOLS)
    record = {"what": f"{NUM_REAL} real MOSES train molecules scored as samples; FCD against the {len(test)} "
                      "test molecules of the moses preset", "values": scores}
    out = ROOT / "docs" / "results" / "moses_reference.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(scores, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
