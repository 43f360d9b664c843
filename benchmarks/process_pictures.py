"""What the learned forward does that the fixed one does not, as pictures: the expected sampling
step at which each token is revealed (FLDDModel.reveal_steps; pipelines.reports.save_reveal_order).
For toy2d, a map over x of when each coordinate is revealed; for digits, per pixel of test images;
for text, per character over the test split. A fixed forward reveals every token at the same
expected step, whatever x is; a learned one may choose an order, per position or per example.

Models are any reference `fldd sample` takes (a run id, runs:/RUN/model, models:/NAME@ALIAS, or a
model.pt path), all of one data set; the store is FLDD_HOME's.

    FLDD_HOME=.fldd/playground python -m benchmarks.process_pictures \
        --model models:/playground-digits@champion-t4 --model models:/playground-digits-masked-x0@champion-t4 \
        --out docs/plots/reveal_order_digits.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fldd.data import load_test_split
from fldd.model import FLDDModel
from pipelines.reports import save_reveal_order
from pipelines.tracking import download_model_file, tracking_uri


def load(reference: str) -> FLDDModel:
    if Path(reference).is_file():
        return FLDDModel.load(reference)
    return FLDDModel.load(download_model_file(tracking_uri(), reference)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a model reference (repeat: one row each)")
    parser.add_argument("--out", type=Path, required=True, help="the picture (.png); its numbers go beside it as .json")
    parser.add_argument("--test-rows", type=int, default=2000, help="test rows averaged over (text, toy2d support)")
    args = parser.parse_args(argv)
    models = {}
    for reference in args.model:
        model = load(reference).eval()
        label = f"{model.config.parameterization}, T={model.num_steps}"
        models[label if label not in models else f"{label} ({reference})"] = model
    datasets = {m.config.data.path or m.config.data.name for m in models.values()}
    if len(datasets) != 1:
        parser.error(f"the models are of different data sets: {sorted(datasets)}")
    data = load_test_split(next(iter(models.values())).config)[:args.test_rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    numbers = save_reveal_order(models, data, args.out)
    record = {"models": args.model, "data": datasets.pop(), "test_rows": len(data), "numbers": numbers}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(numbers, indent=2)[:2000])
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
