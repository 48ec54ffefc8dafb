"""Label-free model-selection scores, computed on unlabelled target predictions.

Every score is "higher is better", so a selector keeps the checkpoint with the largest value.
Inputs: target logits (N, K) and, for SND, features are not needed (it works on predictions).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_EPS = 1e-8


def entropy_score(logits: torch.Tensor) -> float:
    """-(mean prediction entropy): confident predictions score higher."""
    p = F.softmax(logits.float(), dim=1)
    return float((p * torch.log(p + _EPS)).sum(1).mean())


def information_maximization(logits: torch.Tensor) -> float:
    """IM = H(mean prediction) - mean H(prediction): confident AND diverse (Gomes et al. 2010; SHOT)."""
    p = F.softmax(logits.float(), dim=1)
    marginal = p.mean(0)
    h_marginal = -(marginal * torch.log(marginal + _EPS)).sum()
    h_cond = -(p * torch.log(p + _EPS)).sum(1).mean()
    return float(h_marginal - h_cond)


def soft_neighborhood_density(logits: torch.Tensor, temperature: float = 0.05, max_n: int = 4096) -> float:
    """SND (Saito et al. 2021): entropy of each sample's softmax similarity to the others.

    sim = normalised probabilities' cosine similarity (N, N) with self excluded; higher entropy
    = denser neighbourhoods = better clustered target predictions.
    """
    p = F.normalize(F.softmax(logits.float()[:max_n], dim=1), dim=1)
    sim = p @ p.t()  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    q = F.softmax(sim / temperature, dim=1)
    return float(-(q * torch.log(q + _EPS)).sum(1).mean())


def batch_nuclear_norm(logits: torch.Tensor) -> float:
    """BNM (Cui et al. 2020): nuclear norm of the (N, K) prediction matrix / N."""
    p = F.softmax(logits.float(), dim=1)
    return float(torch.linalg.matrix_norm(p, ord="nuc") / p.shape[0])


VALIDATORS: dict[str, Callable[[torch.Tensor], float]] = {
    "entropy": entropy_score,
    "im": information_maximization,
    "snd": soft_neighborhood_density,
    "bnm": batch_nuclear_norm,
}


def get_validator(name: str) -> Callable[[torch.Tensor], float]:
    if name not in VALIDATORS:
        raise ValueError(f"unknown validator '{name}' (known: {', '.join(VALIDATORS)})")
    return VALIDATORS[name]


def score_all(logits: torch.Tensor) -> dict[str, float]:
    return {name: fn(logits) for name, fn in VALIDATORS.items()}
