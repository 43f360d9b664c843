"""The reference values the docs compare models with, computed from the data alone (no model):

- toy2d: the data entropy in bits/token (the floor of any NELBO), and the product of the two
  marginals (what any T=1 or collapsed model reaches, the reverse step being factorized): its
  cross-entropy in bits/token and its exact KL from the data.
- text: the reference character n-gram model (trained on the train split, as in every text cell of
  `quality_vs_steps.py`) on held-out *real* test text (bits/char), and the real test text's unigram
  entropy and distinct-4-gram ratio (the same functions that score generated samples).

    python -m benchmarks.reference_values        # ~1 minute; writes docs/results/reference_values.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.quality_vs_steps import ROOT, config_for
from fldd.data import load_splits, load_test_split
from fldd.datasets import data_pmf
from fldd.sample_metrics import CharNGram, text_metrics


def toy2d_values() -> dict[str, float]:
    pmf = data_pmf("toy2d").double()  # (K*K,), the exact data distribution of the pair (a, b)
    K = int(round(pmf.numel() ** 0.5))
    pmf = pmf.view(K, K)
    nonzero = pmf[pmf > 0]
    entropy_bits = float(-(nonzero * nonzero.log2()).sum())
    product = pmf.sum(1, keepdim=True) * pmf.sum(0, keepdim=True)
    mask = pmf > 0
    kl_product_nats = float((pmf[mask] * (pmf[mask] / product[mask]).log()).sum())
    marginals = [pmf.sum(1), pmf.sum(0)]
    product_bits = sum(float(-(m[m > 0] * m[m > 0].log2()).sum()) for m in marginals)
    return {"data_entropy_bits_per_token": entropy_bits / 2,
            "product_of_marginals_bits_per_token": product_bits / 2,  # a collapsed or T=1 model's NELBO floor
            "kl_product_of_marginals_nats": kl_product_nats}


def text_values() -> dict[str, float]:
    cfg = config_for({"dataset": "text", "method": "masked", "steps": 8, "seed": 0}, None)
    train, _ = load_splits(cfg)
    test = load_test_split(cfg)
    reference = CharNGram(train, cfg.vocab_size)
    metrics = text_metrics(test, reference)
    return {"real_test_bits_per_char": metrics["gen_bpc"], "real_test_unigram_entropy_bits": metrics["entropy"],
            "real_test_distinct4": metrics["distinct4"], "test_rows": int(test.shape[0])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "reference_values.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    values = {"toy2d": toy2d_values(), "text": text_values()}
    print(json.dumps(values, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python -m benchmarks.reference_values", **values}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
