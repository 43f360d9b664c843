"""Quality of generated samples where the data pmf is unknown (EVALUATION.md).

- digits: a fixed reference classifier (small MLP, seed 0, trained once on the real train split by
  benchmarks/train_digits_classifier.py; weights shipped in fldd/assets/) gives 64-d features:
  digits-FD is the Frechet distance between the features of generated and real images; also the
  classifier's mean confidence and the fraction of samples that copy a training image exactly.
- text: gen-BPC is the bits per character of generated samples under a fixed character n-gram
  model fitted on the train split (interpolated absolute discounting), always reported next to the
  samples' unigram entropy and distinct-4-gram ratio: a model can lower gen-BPC by collapsing
  diversity, and those two numbers show it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ASSETS = Path(__file__).resolve().parent / "assets"


# ---- digits ---------------------------------------------------------------------------------

class DigitsClassifier(nn.Module):
    """64 pixels -> 10 classes; `features` is the 64-d penultimate layer used for digits-FD."""

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels  # 2 (binary) or 17
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images.float() / (self.levels - 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def classifier_path(levels: int) -> Path:
    return ASSETS / f"digits_classifier_{'binary' if levels == 2 else 'levels17'}.pt"


def load_digits_classifier(levels: int) -> DigitsClassifier:
    path = classifier_path(levels)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m benchmarks.train_digits_classifier` in a "
                                "checkout of the repository (the wheel ships the file)")
    model = DigitsClassifier(levels)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), features as rows (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


@torch.no_grad()
def digits_metrics(samples: Tensor, real: Tensor, train: Tensor, levels: int) -> dict[str, float]:
    classifier = load_digits_classifier(levels)
    fake_features = classifier.features(samples).numpy()
    real_features = classifier.features(real).numpy()
    confidence = torch.softmax(classifier(samples), dim=-1).max(dim=-1).values.mean().item()
    train_rows = {tuple(row) for row in train.tolist()}
    copies = sum(tuple(row) in train_rows for row in samples.tolist()) / len(samples)
    return {"digits_fd": frechet_distance(fake_features, real_features), "classifier_confidence": confidence,
            "copy_rate": copies}


# ---- text -----------------------------------------------------------------------------------

class CharNGram:
    """Character n-gram model with interpolated absolute discounting (a Kneser-Ney relative)."""

    def __init__(self, sequences: Tensor, vocab_size: int, order: int = 5, discount: float = 0.75):
        self.vocab_size, self.order, self.discount = vocab_size, order, discount
        self.counts: list[dict[tuple, Counter]] = [defaultdict(Counter) for _ in range(order)]
        for row in sequences.tolist():
            for i, token in enumerate(row):
                for n in range(order):  # context length n
                    if i - n < 0:
                        break
                    self.counts[n][tuple(row[i - n:i])][token] += 1

    def probability(self, context: tuple, token: int) -> float:
        p = 1.0 / self.vocab_size
        for n in range(min(len(context), self.order - 1) + 1):  # from unigram up to the longest context
            table = self.counts[n].get(context[len(context) - n:] if n else ())
            if not table:
                break
            total = sum(table.values())
            p = (max(table[token] - self.discount, 0.0) + self.discount * len(table) * p) / total
        return p

    def bits_per_char(self, sequences: Tensor) -> float:
        bits, count = 0.0, 0
        for row in sequences.tolist():
            for i, token in enumerate(row):
                bits -= math.log2(self.probability(tuple(row[max(0, i - self.order + 1):i]), token))
                count += 1
        return bits / count


def text_metrics(samples: Tensor, reference: CharNGram) -> dict[str, float]:
    counts = torch.bincount(samples.flatten(), minlength=reference.vocab_size).double()
    p = counts / counts.sum()
    grams = [tuple(row[i:i + 4]) for row in samples.tolist() for i in range(len(row) - 3)]
    return {"gen_bpc": reference.bits_per_char(samples),
            "entropy": float(-(p[p > 0] * p[p > 0].log2()).sum()),
            "distinct4": len(set(grams)) / max(len(grams), 1)}
