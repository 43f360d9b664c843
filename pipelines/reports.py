"""Held-out evaluation of a trained model, and the files a run leaves behind (metrics, pictures)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fldd.codec import TokenCodec  # noqa: E402
from fldd.data import load_splits  # noqa: E402
from fldd.datasets import data_pmf  # noqa: E402
from fldd.metrics import exact_distribution_metrics  # noqa: E402
from fldd.model import FLDDModel  # noqa: E402
from fldd.molecules import score_token_samples  # noqa: E402
from fldd.objective import evaluate_nelbo  # noqa: E402
from fldd.sample_metrics import CharNGram, digits_metrics, text_metrics  # noqa: E402
from fldd.sampler import sample  # noqa: E402
from fldd.service import model_codec  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipelines.vocabulary import (COLLAPSED_METRIC, SATURATED_METRIC, VALID_NELBO_METRIC,  # noqa: E402
                                  VALID_STDERR_METRIC)


def nelbo_with_progress(model: FLDDModel, data: torch.Tensor, passes: int, seed: int, label: str):
    """evaluate_nelbo with a progress bar over the rows (on a terminal only)."""
    with tqdm(total=len(data), desc=f"{label} ({passes} passes)", unit="row", leave=False, disable=None) as bar:
        return evaluate_nelbo(model, data, num_passes=passes, generator=torch.Generator().manual_seed(seed),
                              on_batch=bar.update)


def evaluate_model(model: FLDDModel, valid: torch.Tensor, *, passes: int = 10, seed: int = 0,
                   num_samples: int = 2000, samples: torch.Tensor | None = None) -> dict[str, Any]:
    """Held-out metrics (EVALUATION.md) on `valid` (any held-out split): NELBO (bits/token, sum over
    t), exact KL/TV on the 2-D toys, digits-FD / confidence / copy rate on digits, gen-BPC with
    unigram entropy and distinct-4-grams on text, validity / uniqueness / novelty / copy rate /
    FCD to `valid` on molecules (any data with a smiles codec), and the collapse flag.

    The sample metrics score `num_samples` samples drawn with seed 1000 + `seed`, or `samples` where
    the caller has drawn them already (a benchmark that times the sampling and pictures them).
    The NELBO keys say `valid_` whatever the split; split_metrics renames them for another."""
    estimate = nelbo_with_progress(model, valid, passes, seed, "evaluating")
    metrics: dict[str, Any] = {VALID_NELBO_METRIC: estimate.bits_per_token,
                               VALID_STDERR_METRIC: estimate.stderr_bits_per_token}
    for t, bits in enumerate(estimate.kl_per_step_bits_per_token, start=1):
        metrics[f"valid_kl_t{t}_bits"] = bits
    cfg = model.config
    pmf = None if cfg.data.path else data_pmf(cfg.data.name)
    if pmf is not None:
        metrics.update(exact_distribution_metrics(model, pmf))
    builtin_scored = not cfg.data.path and cfg.data.name in ("digits", "digits-binary", "text")
    codec = model_codec(cfg, model.codec)
    is_molecules = codec is not None and codec.kind == "smiles"
    if samples is None and (builtin_scored or is_molecules):
        samples = sample(model, num_samples, generator=torch.Generator().manual_seed(1000 + seed))
    if builtin_scored:
        train, _ = load_splits(cfg)
        if cfg.data.name == "text":
            metrics.update(text_metrics(samples, CharNGram(train, cfg.vocab_size)))
        else:
            metrics.update(digits_metrics(samples, valid, train, cfg.vocab_size))
    if is_molecules:
        metrics.update(molecule_scores(model, valid, codec, samples=samples))
    if cfg.learns_forward:
        report = model.check_collapse(valid[:1024])
        metrics[COLLAPSED_METRIC] = report.collapsed
        metrics["information_retained_max"] = max(report.retained_fraction[1:model.num_steps], default=0.0)
        metrics[SATURATED_METRIC] = report.saturated
        metrics["forward_entropy_min"] = min(report.entropy_bits[1:model.num_steps], default=0.0)
    return metrics


def molecule_scores(model: FLDDModel, held_out: torch.Tensor, codec: TokenCodec, *, num_samples: int = 2000,
                    seed: int = 0, samples: torch.Tensor | None = None) -> dict[str, float]:
    """fldd.molecules.score_token_samples of `num_samples` samples (seed 1000 + seed), or of
    `samples` drawn already: novelty and copies against the model's train split, FCD against
    `held_out`."""
    train, _ = load_splits(model.config)
    if samples is None:
        samples = sample(model, num_samples, generator=torch.Generator().manual_seed(1000 + seed))
    return score_token_samples(samples.numpy(), train.numpy(), held_out.numpy(), codec.symbols)


def split_metrics(metrics: dict[str, Any], split: str | None) -> dict[str, Any]:
    """evaluate_model's keys named for the split they were measured on: each starts with `<split>_`
    in place of evaluate_model's `valid_` (`fldd evaluate --split test`: test_nelbo_bits, test_kl),
    or, where the split is recorded beside the numbers, without it (`split` None: nelbo_bits, kl,
    as the benchmarks record them)."""
    prefix = f"{split}_" if split else ""
    return {prefix + key.removeprefix("valid_"): value for key, value in metrics.items()}


def final_report(model: FLDDModel, valid: torch.Tensor, run_dir: Path, **extra: Any) -> dict[str, Any]:
    """Evaluate and write config.yaml, metrics.json, samples.png and forward_schedule.png."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**evaluate_model(model, valid), **extra}
    model.config.to_yaml(run_dir / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    model.save(run_dir / "model.pt")  # carries the collapse flag set by the evaluation
    save_sample_picture(model, run_dir / "samples.png")
    save_forward_schedule(model, valid[:512], run_dir / "forward_schedule.png")
    return metrics


def save_sample_picture(model: FLDDModel, path: Path, num_samples: int = 4000, seed: int = 0) -> Path:
    tokens = sample(model, num_samples, generator=torch.Generator().manual_seed(seed))
    return save_tokens_picture(tokens, model.config.vocab_size, path,
                               title=f"{model.config.process.method}, T={model.num_steps}")


def _draw_tokens(ax, tokens: torch.Tensor, vocab_size: int, rows: int, images: bool = False) -> None:
    """2-position data: a heat map of the samples over the K x K grid; square images (`images`, e.g.
    digits): the first `rows` samples side by side as a square of pictures; other sequences: the
    first `rows` samples as a token grid."""
    if tokens.shape[1] == 2:
        counts = torch.zeros(vocab_size, vocab_size)
        counts.index_put_((tokens[:, 0], tokens[:, 1]), torch.ones(len(tokens)), accumulate=True)
        ax.imshow(counts.numpy(), origin="lower", cmap="magma")
    elif images:
        side, across = math.isqrt(tokens.shape[1]), math.isqrt(min(rows, len(tokens)))
        square = tokens[:across * across].view(across, across, side, side).permute(0, 2, 1, 3)
        ax.imshow(square.reshape(across * side, across * side).numpy(), cmap="gray_r", vmin=0, vmax=vocab_size - 1)
    else:
        ax.imshow(tokens[:rows].numpy(), aspect="auto", cmap="viridis", interpolation="nearest")


def save_tokens_picture(tokens: torch.Tensor, vocab_size: int, path: Path, title: str = "",
                        images: bool = False) -> Path:
    """2-position data: a heat map of samples over the K x K grid; square images (`images`): 64 of
    them as an 8 x 8 square of pictures; other sequences: a token grid."""
    if images and math.isqrt(tokens.shape[1]) ** 2 != tokens.shape[1]:
        raise ValueError(f"images: a sample of {tokens.shape[1]} tokens is not a square picture")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    _draw_tokens(ax, tokens, vocab_size, rows=64, images=images)
    if tokens.shape[1] == 2:
        ax.set_xlabel("x[1]")
        ax.set_ylabel("x[0]")
    elif images:
        ax.axis("off")
    else:
        ax.set_xlabel("position")
        ax.set_ylabel("sample")
    ax.set_title(f"{len(tokens)} samples, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def save_forward_schedule(model: FLDDModel, x: torch.Tensor, path: Path) -> Path:
    """The (learned) forward process per step: P(z_t^i = x^i), P(z_t^i = MASK), information kept."""
    T = model.num_steps
    t = torch.arange(T + 1).expand(x.shape[0], -1)
    u = model.forward_process.log_marginals(x, t).exp()  # (B, T+1, D, S)
    keep = u.gather(-1, x[:, None, :, None].expand(-1, T + 1, -1, 1)).squeeze(-1).mean(dim=(0, 2))
    bits = model.information_per_step(x)
    retained = bits / bits[0].clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = list(range(T + 1))
    ax.plot(steps, keep.tolist(), "o-", label="P(z_t = x), mean")
    if model.mask_id is not None:
        ax.plot(steps, u[..., model.mask_id].mean(dim=(0, 2)).tolist(), "s-", label="P(z_t = MASK), mean")
    ax.plot(steps, retained.tolist(), "^-", label="information about x kept")
    ax.set_xlabel("step t")
    if T <= 16:
        ax.set_xticks(steps)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"forward process: {model.config.process.method}, T={T}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_samples_by_forward(samples: dict[str, dict[int, torch.Tensor]], vocab_size: int, path: Path,
                            data: torch.Tensor | None = None, notes: dict[tuple[str, int], str] | None = None) -> Path:
    """One row per forward process, one column per step budget, the data first in every row: the
    comparison at equal T. For 2-position data each panel is a heat map over the K x K grid,
    otherwise the first 32 samples as a token grid. `notes` adds a line to a panel's title (where
    its samples came from)."""
    budgets = sorted({T for by_budget in samples.values() for T in by_budget})
    columns = ([None] if data is not None else []) + budgets
    fig, axes = plt.subplots(len(samples), len(columns), figsize=(3.2 * len(columns), 3.5 * len(samples)),
                             squeeze=False)
    for row, (forward, by_budget) in enumerate(samples.items()):
        for ax, T in zip(axes[row], columns):
            ax.set_xticks([])
            ax.set_yticks([])
            tokens = data if T is None else by_budget.get(T)
            if tokens is None:
                ax.axis("off")
                continue
            _draw_tokens(ax, tokens, vocab_size, rows=32)
            title = f"test split ({len(tokens)})" if T is None else f"{forward}, T={T} ({len(tokens)})"
            note = (notes or {}).get((forward, T)) if T is not None else None
            ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@torch.no_grad()
def save_reveal_order(models: dict[str, FLDDModel], data: torch.Tensor, path: Path, examples: int = 8) -> dict:
    """What a learned forward does that a fixed one does not, drawn per data type from
    FLDDModel.reveal_steps (the expected sampling step at which each x^i is revealed; 1 = first):
    - 2 positions (toy2d): over the K x K grid of x, when x[0] and when x[1] is revealed (cells
      with no test example left blank);
    - square images (digits): per pixel of `examples` test images;
    - text (a chars codec): the mean step per character over the test split.
    One row per model, one colour scale [1, T] per figure. Returns the numbers drawn (JSON-able)."""
    first = next(iter(models.values()))
    cfg = first.config
    codec = model_codec(cfg, first.codec)  # the built-in text's alphabet for its models
    T = max(model.num_steps for model in models.values())
    side = math.isqrt(cfg.seq_len)
    numbers: dict[str, Any] = {}
    for label, model in models.items():  # how much the order depends on the example, and on the position
        steps = model.reveal_steps(data).float()
        numbers[label] = {"mean_step": float(steps.mean()),
                          "spread_across_examples": float(steps.std(dim=0).mean()) if len(data) > 1 else 0.0,
                          "spread_across_positions": float(steps.mean(dim=0).std()) if cfg.seq_len > 1 else 0.0}
    if cfg.seq_len == 2:
        K = cfg.vocab_size
        grid = torch.cartesian_prod(torch.arange(K), torch.arange(K))  # row-major: x[0], then x[1]
        seen = torch.zeros(K * K, dtype=torch.bool)
        seen[data[:, 0] * K + data[:, 1]] = True
        fig, axes = plt.subplots(len(models), 2, figsize=(7.5, 3.6 * len(models)), squeeze=False)
        for row, (label, model) in enumerate(models.items()):
            steps = model.reveal_steps(grid).float()
            steps[~seen] = float("nan")
            numbers[label].update(mean_x0=float(steps[seen, 0].mean()), mean_x1=float(steps[seen, 1].mean()))
            for col in range(2):
                image = axes[row][col].imshow(steps[:, col].view(K, K).numpy(), origin="lower", cmap="viridis",
                                              vmin=1, vmax=T)
                axes[row][col].set_title(f"{label}\nstep revealing x[{col}]", fontsize=9)
                axes[row][col].set_xlabel("x[1]")
                axes[row][col].set_ylabel("x[0]")
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="expected sampling step (1 = first)")
    elif side * side == cfg.seq_len and codec is None:
        shown = data[:examples]
        fig, axes = plt.subplots(1 + len(models), len(shown), figsize=(1.3 * len(shown), 1.4 * (1 + len(models))),
                                 squeeze=False)
        for col, x in enumerate(shown):
            axes[0][col].imshow(x.view(side, side).numpy(), cmap="gray_r")
        axes[0][0].set_ylabel("test image", fontsize=8)
        for row, (label, model) in enumerate(models.items(), start=1):
            steps = model.reveal_steps(shown).float()
            for col in range(len(shown)):
                image = axes[row][col].imshow(steps[col].view(side, side).numpy(), cmap="viridis", vmin=1, vmax=T)
            axes[row][0].set_ylabel(label, fontsize=8)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="sampling step revealing the pixel")
    elif codec is not None and codec.kind == "chars":
        fig, axes = plt.subplots(len(models), 1, figsize=(9, 2.6 * len(models)), squeeze=False)
        order = None
        for row, (label, model) in enumerate(models.items()):
            steps = model.reveal_steps(data).float()
            by_char = {codec.alphabet[k]: float(steps[data == k].mean()) for k in range(codec.vocab_size)
                       if bool((data == k).any())}
            order = order or sorted(by_char, key=by_char.get)  # the first model's order, kept for the others
            numbers[label].update(mean_step_by_char=by_char, first="".join(sorted(by_char, key=by_char.get)))
            ax = axes[row][0]
            ax.bar(range(len(order)), [by_char[c] for c in order], color="tab:blue")
            ax.set_xticks(range(len(order)), [repr(c)[1:-1] if c != " " else "␣" for c in order])
            ax.set_ylim(1, T)
            ax.set_ylabel("mean step")
            ax.set_title(f"{label}: mean sampling step revealing each character (test split)", fontsize=9)
    else:
        raise ValueError(f"no reveal-order picture for this data (seq_len={cfg.seq_len}, "
                         f"codec={codec.kind if codec else None}): 2 positions, square images or a chars codec")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return numbers
