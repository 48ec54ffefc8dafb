"""How far the target is from the source, in a model's feature space.

proxy A-distance (Ben-David et al. 2007): train a linear domain classifier on half the features,
measure its error eps on the other half; PAD = 2 (1 - 2 eps). 0 = indistinguishable, 2 = separable.
MMD: squared maximum mean discrepancy with a Gaussian kernel, bandwidth by the median heuristic.
"""

from __future__ import annotations

import numpy as np
import torch


def _sample(x: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    return x if len(x) <= n else x[torch.from_numpy(rng.choice(len(x), n, replace=False))]


def proxy_a_distance(source: torch.Tensor, target: torch.Tensor, max_per_domain: int = 2000, seed: int = 0) -> float:
    """source (Ns, D), target (Nt, D) features -> PAD in [0, 2] (clipped at 0 below)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    s, t = _sample(source, max_per_domain, rng).numpy(), _sample(target, max_per_domain, rng).numpy()
    x = np.concatenate([s, t])
    y = np.concatenate([np.zeros(len(s)), np.ones(len(t))])
    order = rng.permutation(len(x))
    half = len(x) // 2
    train, test = order[:half], order[half:]
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(max_iter=500, C=1.0).fit(scaler.transform(x[train]), y[train])
    error = 1.0 - clf.score(scaler.transform(x[test]), y[test])
    return float(max(0.0, 2.0 * (1.0 - 2.0 * error)))


def mmd(source: torch.Tensor, target: torch.Tensor, max_per_domain: int = 1000, seed: int = 0) -> float:
    """Biased estimate of MMD^2 between (Ns, D) and (Nt, D) features, Gaussian kernel."""
    rng = np.random.default_rng(seed)
    s, t = _sample(source, max_per_domain, rng).double(), _sample(target, max_per_domain, rng).double()
    z = torch.cat([s, t])
    d2 = torch.cdist(z, z).pow(2)  # (Ns+Nt, Ns+Nt)
    bandwidth = d2[d2 > 0].median()
    k = torch.exp(-d2 / bandwidth)
    ns = len(s)
    return float(k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean())
