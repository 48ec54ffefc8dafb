"""Figures for a run: confusion matrix, source/target feature maps before and after, loss curves.

Each function writes one PNG and returns its path; matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: tuple[str, ...]) -> np.ndarray:
    """(K, K) counts: rows are true classes, columns predicted."""
    k = len(classes)
    return torch.bincount(labels * k + predictions, minlength=k * k).reshape(k, k).numpy()


def plot_confusion(matrix: np.ndarray, classes: tuple[str, ...], title: str, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def embed_2d(source: torch.Tensor, target: torch.Tensor, max_per_domain: int = 300, seed: int = 0) -> tuple[np.ndarray, int]:
    """t-SNE of a seeded sample of source and target features -> (n, 2) points, source count.

    A few hundred points per domain and 300 iterations: a picture of the alignment in seconds on
    two cores, not a publication figure.
    """
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    s = source[rng.choice(len(source), min(len(source), max_per_domain), replace=False)]
    t = target[rng.choice(len(target), min(len(target), max_per_domain), replace=False)]
    x = torch.cat([s, t]).numpy()
    # t-SNE needs fewer neighbours than points: a small user domain (30 points or fewer) failed the run at evaluation
    perplexity = min(30.0, max(1.0, (len(x) - 1) / 3))
    points = TSNE(n_components=2, init="pca", perplexity=perplexity, max_iter=300, random_state=seed).fit_transform(x)
    return points, len(s)


def plot_feature_maps(maps: dict[str, tuple[np.ndarray, int]], out: Path) -> Path:
    """Side-by-side source (blue) / target (orange) maps, e.g. {'before': ..., 'after': ...}."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.5 * len(maps), 4.2))
    for ax, (name, (points, n_source)) in zip(np.atleast_1d(axes), maps.items()):
        ax.scatter(points[:n_source, 0], points[:n_source, 1], s=3, alpha=0.6, label="source")
        ax.scatter(points[n_source:, 0], points[n_source:, 1], s=3, alpha=0.6, label="target")
        ax.set_title(f"features {name} adaptation (t-SNE)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_losses(history: list[dict[str, float]], title: str, out: Path) -> Path:
    """history: one row per interval, {'step': s, '<loss name>': mean value, ...}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = sorted({k for row in history for k in row if k != "step"})
    for name in names:
        points = [(row["step"], row[name]) for row in history if name in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
