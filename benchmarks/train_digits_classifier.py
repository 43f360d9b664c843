"""Train the fixed reference classifiers behind digits-FD (run once; the weights are committed).

Small MLPs on the real digits train split (fldd.datasets, 1350 images), seed 0, one for the binary
(K=2) and one for the 17-level setting. Prints test accuracy. Writes fldd/assets/*.pt.

    python -m benchmarks.train_digits_classifier
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from fldd.config import FLDDConfig
from fldd.data import load_splits, load_test_split
from fldd.sample_metrics import DigitsClassifier, classifier_path


def labels_for(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Labels by matching rows back to load_digits (the token tables hold pixels only)."""
    data = load_digits()
    pixels = data.data.astype(np.int64)
    pixels = (pixels >= 8).astype(np.int64) if levels == 2 else pixels
    lookup: dict[tuple, list[int]] = {}
    for row, label in zip(pixels.tolist(), data.target.tolist()):
        lookup.setdefault(tuple(row), []).append(label)
    # a binarised image can occur with several labels; take the most common one
    return torch.tensor([max(set(lookup[tuple(r)]), key=lookup[tuple(r)].count) for r in images.tolist()])


def main() -> None:
    for name, levels in (("digits-binary", 2), ("digits", 17)):
        cfg = FLDDConfig(seq_len=64, vocab_size=levels).with_overrides({"data.name": name})
        train, _ = load_splits(cfg)
        test = load_test_split(cfg)
        y_train, y_test = labels_for(train, levels), labels_for(test, levels)
        torch.manual_seed(0)
        model = DigitsClassifier(levels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(0)
        for _ in range(200):
            for batch in torch.randperm(len(train), generator=generator).split(128):
                loss = torch.nn.functional.cross_entropy(model(train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(test).argmax(-1) == y_test).float().mean().item()
        torch.save(model.state_dict(), classifier_path(levels))
        print(f"{name}: test accuracy {accuracy:.3f} ({len(test)} images); wrote {classifier_path(levels)}")


if __name__ == "__main__":
    main()
