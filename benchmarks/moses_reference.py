"""What real molecules score on the MOSES table's metrics, at the table's sizes: the floor the
generated samples are read against (a Frechet distance between finite sets is above 0 even for
two samples of one distribution).

2,000 real molecules (the last 2,000 of the `moses` preset's train split) are scored as if they
were generated, with the evaluation's own function (fldd.molecules.score_token_samples): novelty
and copies against the rest of the train split, FCD against the preset's 1,000 test molecules,
the sizes of the table's report runs. The FCD is computed on the valid samples only, so a model
with few valid samples gets the FCD of a small set: the real molecules' FCD at small counts (the
table's 9 and 22 valid molecules, three random draws each) says what such a number is worth.

    python -m benchmarks.moses_reference        # about a minute on 2 cores; docs/results/moses_reference.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fldd.config import CONFIG_DIR, FLDDConfig
from fldd.data import load_splits, load_test_split, resolve_data_shape
from fldd.datasets import MOSES_SYMBOLS
from fldd.molecules import frechet_chemnet_distance, reference_statistics, score_token_samples

ROOT = Path(__file__).resolve().parent.parent
NUM_REAL = 2000
SMALL_COUNTS = (9, 22)  # the valid molecules behind the MOSES table's two FCDs
DRAWS = 3


def main() -> None:
    cfg, _ = resolve_data_shape(FLDDConfig.from_yaml(CONFIG_DIR / "moses.yaml"))
    train, _ = load_splits(cfg)
    test = load_test_split(cfg)
    real, rest = train[-NUM_REAL:], train[:-NUM_REAL]
    scores = score_token_samples(real.numpy(), rest.numpy(), test.numpy(), MOSES_SYMBOLS)
    join = lambda rows: ["".join(MOSES_SYMBOLS[t] for t in row) for row in rows.tolist()]  # noqa: E731
    reference, molecules = reference_statistics(join(test)), join(real)
    rng = np.random.default_rng(0)
    small = {str(n): [frechet_chemnet_distance([molecules[i] for i in rng.choice(len(molecules), n, replace=False)],
                                               reference) for _ in range(DRAWS)] for n in SMALL_COUNTS}
    record = {"what": f"{NUM_REAL} real MOSES train molecules scored as samples; FCD against the {len(test)} "
                      "test molecules of the moses preset", "values": scores,
              "fcd_of_real_molecules_by_count": {**small, str(NUM_REAL): [scores["fcd"]]},
              "small_counts_seed": 0}
    out = ROOT / "docs" / "results" / "moses_reference.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({**scores, "fcd_of_real_molecules_by_count": record["fcd_of_real_molecules_by_count"]},
                     indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
