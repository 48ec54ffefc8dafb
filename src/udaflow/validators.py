"""Label-free model-selection scores.

Every score is "higher is better", so a selector keeps the checkpoint with the largest value.
entropy, im, snd, bnm read only target logits (N, K). dev also reads the labelled *source*
validation set and both domains' features: it never needs target labels either.
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


def soft_neighborhood_density(logits: torch.Tensor, temperature: float = 0.05, max_n: int = 4096, seed: int = 0) -> float:
    """SND (Saito et al. 2021): entropy of each sample's softmax similarity to the others.

    sim = normalised probabilities' cosine similarity (N, N) with self excluded; higher entropy
    = denser neighbourhoods = better clustered target predictions. Pools above `max_n` images are
    scored on a seeded random subset (the same rows for every checkpoint of a pool), never on the
    first rows, which follow the class folders' order.
    """
    logits = logits.float()
    if len(logits) > max_n:
        logits = logits[torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))[:max_n]]
    p = F.normalize(F.softmax(logits, dim=1), dim=1)
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


def dev_risk(losses: torch.Tensor, weights: torch.Tensor) -> float:
    """DEV's estimate of the target risk (You et al., ICML 2019), with its control variate.

    losses (N,): per-sample loss on labelled source validation; weights (N,): density ratios
    p_target(x) / p_source(x). With L = w * l and eta = -Cov(L, w) / Var(w) (unbiased),
    DEV = mean(L) + eta * mean(w) - eta. Lower is better.
    """
    weights, losses = weights.double(), losses.double()
    weighted = weights * losses
    var_w = weights.var(unbiased=True)
    if not torch.isfinite(var_w) or var_w <= 0:
        return float(weighted.mean())
    cov = ((weighted - weighted.mean()) * (weights - weights.mean())).sum() / (len(weights) - 1)
    eta = -cov / var_w
    return float(weighted.mean() + eta * weights.mean() - eta)


def density_ratios(source_features: torch.Tensor, target_features: torch.Tensor, max_per_domain: int = 2000, seed: int = 0) -> torch.Tensor:
    """p_target / p_source at each source sample, from a 2-fold cross-fitted logistic domain classifier."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    t = target_features.numpy()
    if len(t) > max_per_domain:
        t = t[rng.choice(len(t), max_per_domain, replace=False)]
    s = source_features.numpy()
    fold_s, fold_t = rng.permutation(len(s)) % 2, rng.permutation(len(t)) % 2
    ratios = np.zeros(len(s))
    for k in (0, 1):
        train_x = np.concatenate([s[fold_s != k], t[fold_t != k]])
        train_y = np.concatenate([np.zeros((fold_s != k).sum()), np.ones((fold_t != k).sum())])
        scaler = StandardScaler().fit(train_x)
        clf = LogisticRegression(max_iter=300).fit(scaler.transform(train_x), train_y)
        p = clf.predict_proba(scaler.transform(s[fold_s == k]))[:, 1].clip(1e-4, 1 - 1e-4)
        ratios[fold_s == k] = p / (1 - p) * ((fold_s != k).sum() / max((fold_t != k).sum(), 1))
    return torch.from_numpy(ratios)


def dev_score(source_features: torch.Tensor, source_logits: torch.Tensor, source_labels: torch.Tensor, target_features: torch.Tensor) -> float:
    """-DEV: importance-weighted source validation loss, negated so that higher is better."""
    losses = F.cross_entropy(source_logits.float(), source_labels, reduction="none")
    return -dev_risk(losses, density_ratios(source_features, target_features))


# validators that need the labelled source validation set as well as the target pool
SOURCE_AWARE = ("dev",)


def get_validator(name: str) -> Callable[[torch.Tensor], float] | None:
    """The target-only scoring function, or None for a source-aware one (the caller computes it)."""
    if name in SOURCE_AWARE:
        return None
    if name not in VALIDATORS:
        raise ValueError(f"unknown validator '{name}' (known: {', '.join([*VALIDATORS, *SOURCE_AWARE])})")
    return VALIDATORS[name]


def score_all(logits: torch.Tensor) -> dict[str, float]:
    return {name: fn(logits) for name, fn in VALIDATORS.items()}


def ensemble_agreement(candidate_logits: list[torch.Tensor]) -> list[float]:
    """EnsV (Hu et al., "Towards Reliable Model Selection for Unsupervised Domain Adaptation",
    NeurIPS 2023): agreement (%) of each candidate's predictions with the ensemble of all candidates.

        p_ens = mean_m softmax(z_m)           (N, K) over the M candidates' target-pool logits
        EnsV_m = 100 * mean_n [argmax z_m[n] = argmax p_ens[n]]

    A set-level score (each candidate is scored against the others), so it sits beside the
    per-checkpoint VALIDATORS: the benchmark scores every kept checkpoint of a run with it.
    """
    if not candidate_logits:
        return []
    ensemble = torch.stack([F.softmax(z.float(), dim=1) for z in candidate_logits]).mean(0)  # (N, K)
    consensus = ensemble.argmax(1)  # (N,)
    return [float((z.argmax(1) == consensus).float().mean() * 100.0) for z in candidate_logits]
