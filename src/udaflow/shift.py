"""How far the target is from the source, in a model's feature space.

proxy A-distance (Ben-David et al. 2007): train a linear domain classifier on half the features,
measure its error eps on the other half; PAD = 2 (1 - 2 eps). 0 = indistinguishable, 2 = separable.
MMD: squared maximum mean discrepancy with a Gaussian kernel, bandwidth by the median heuristic,
and its permutation test (is the difference more than sampling noise?).
Class swaps: pairs of classes an adapted model looks to have exchanged on the target, read in the source
model's feature space (`class_swaps`).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _sample(x: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    return x if len(x) <= n else x[torch.from_numpy(rng.choice(len(x), n, replace=False))]


def _domain_classifier(source: torch.Tensor, target: torch.Tensor, max_per_domain: int, seed: int,
                       stratified: bool = False) -> tuple[float, int]:
    """A linear domain classifier trained on half the (sampled) features: (held-out accuracy, held-out count).
    `stratified`: each domain split in half on its own, so both halves hold both domains equally."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    s, t = _sample(source, max_per_domain, rng).numpy(), _sample(target, max_per_domain, rng).numpy()
    x = np.concatenate([s, t])
    y = np.concatenate([np.zeros(len(s)), np.ones(len(t))])
    if stratified:
        halves = [rng.permutation(idx) for idx in (np.arange(len(s)), len(s) + np.arange(len(t)))]
        train = np.concatenate([h[: len(h) // 2] for h in halves])
        test = np.concatenate([h[len(h) // 2 :] for h in halves])
    else:
        order = rng.permutation(len(x))
        half = len(x) // 2
        train, test = order[:half], order[half:]
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(max_iter=500, C=1.0).fit(scaler.transform(x[train]), y[train])
    return float(clf.score(scaler.transform(x[test]), y[test])), len(test)


def proxy_a_distance(source: torch.Tensor, target: torch.Tensor, max_per_domain: int = 2000, seed: int = 0) -> float:
    """source (Ns, D), target (Nt, D) features -> PAD in [0, 2] (clipped at 0 below)."""
    return proxy_a_distance_test(source, target, max_per_domain, seed)[0]  # the evaluation's PAD, as recorded


def proxy_a_distance_test(source: torch.Tensor, target: torch.Tensor, max_per_domain: int = 2000, seed: int = 0,
                          stratified: bool = False) -> tuple[float, float]:
    """(PAD, p-value): the domain classifier's held-out accuracy against chance, a classifier two-sample
    test (Lopez-Paz and Oquab, ICLR 2017): p = P(Binomial(n, 1/2) >= correct). Chance is 1/2 only for
    samples of equal size split evenly: give equal sizes and `stratified=True` for the p-value."""
    from scipy.stats import binom

    accuracy, n = _domain_classifier(source, target, max_per_domain, seed, stratified)
    error = 1.0 - accuracy
    correct = int(round(accuracy * n))
    return float(max(0.0, 2.0 * (1.0 - 2.0 * error))), float(binom.sf(correct - 1, n, 0.5))


def _kernel(s: torch.Tensor, t: torch.Tensor, scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """Gaussian kernel over the pooled (Ns+Nt, D) features, bandwidth = median squared distance (times
    each of `scales`, averaged: a multi-scale kernel, as in DAN's MK-MMD)."""
    z = torch.cat([s, t]).double()
    d2 = torch.cdist(z, z).pow(2)  # (Ns+Nt, Ns+Nt)
    positive = d2[d2 > 0]
    bandwidth = positive.median() if len(positive) else torch.tensor(1.0, dtype=torch.float64)
    return sum(torch.exp(-d2 / (bandwidth * c)) for c in scales) / len(scales)


# the drift test's bandwidths, relative to the median: the median alone is set by the distances between
# classes, and misses a shift of every class that keeps them apart (darker images of each class)
TEST_SCALES = (1 / 16, 1 / 4, 1.0, 4.0)


def _mmd2(k: torch.Tensor, ns: int) -> float:
    return float(k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean())


def mmd(source: torch.Tensor, target: torch.Tensor, max_per_domain: int = 1000, seed: int = 0) -> float:
    """Biased estimate of MMD^2 between (Ns, D) and (Nt, D) features, Gaussian kernel."""
    rng = np.random.default_rng(seed)
    s, t = _sample(source, max_per_domain, rng), _sample(target, max_per_domain, rng)
    return _mmd2(_kernel(s, t), len(s))


def mmd_test(source: torch.Tensor, target: torch.Tensor, permutations: int = 500, max_per_domain: int = 500, seed: int = 0,
             scales: tuple[float, ...] = TEST_SCALES) -> tuple[float, float]:
    """Permutation two-sample test (Gretton et al., JMLR 2012) with a multi-scale Gaussian kernel: (MMD^2, p-value).

    The domain labels of the pooled features are shuffled `permutations` times; p = (1 + #{MMD^2 of a
    shuffle >= the observed}) / (1 + permutations). All shuffles reuse one kernel matrix K (N, N):
    with a the (P, N) 0/1 membership of the first sample, MMD^2 = aKa'/ns^2 + bKb'/nt^2 - 2aKb'/(ns nt).
    """
    rng = np.random.default_rng(seed)
    s, t = _sample(source, max_per_domain, rng), _sample(target, max_per_domain, rng)
    k = _kernel(s, t, scales)
    ns, n = len(s), len(s) + len(t)
    observed = _mmd2(k, ns)
    order = np.argsort(rng.random((permutations, n)), axis=1)  # a shuffle per row
    a = torch.zeros(permutations, n, dtype=torch.float64)
    a.scatter_(1, torch.from_numpy(order[:, :ns]), 1.0)
    b = 1.0 - a
    ka, kb = a @ k, b @ k  # (P, N)
    shuffled = (ka * a).sum(1) / ns**2 + (kb * b).sum(1) / (n - ns) ** 2 - 2 * (ka * b).sum(1) / (ns * (n - ns))
    p_value = (1 + int((shuffled >= observed - 1e-12).sum())) / (1 + permutations)
    return observed, float(p_value)


def class_swaps(source_features: torch.Tensor, source_labels, target_features: torch.Tensor, predicted,
                num_classes: int) -> list[tuple[int, int]]:
    """Pairs of classes (a, b) whose names the adapted model looks to have exchanged on the target pool.

    Self-training can lock in a swap that no label-free score sees: the pseudo-labels of two classes
    trade places early, class-balanced alignment keeps the pair exactly as balanced as a right one,
    and the adapted extractor then moves each swapped cluster next to the source class it is named
    after (docs/measurements.md, "A fourth shift"). The source model has not moved: its features still
    place the target images of each class nearer the source images of that class, weakly.

    All features are the *source* model's: `source_features` (N, D) of the labelled source val images
    (`source_labels`, N), `target_features` (M, D) of the target pool, which the adapted model labels
    `predicted` (M). Each domain's features are centred on that domain's own mean (the shift moves every
    target feature the same way: uncentred, that common offset outweighs the weak class signal) and each
    row L2-normalised; m_s[c] is the normalised mean of source class c, m_t[c] of the pool images
    predicted c; sim[a, b] = m_t[a] . m_s[b] (a cosine). A pair is flagged when both sides say so:

        sim[a, b] > sim[a, a]  and  sim[b, a] > sim[b, b],

    i.e. the images named a sit nearer source b than source a, and the images named b nearer source a.
    Weak features make one-sided confusions common; a mutual one is what a swap leaves.

    Only classes the pool shows take part: a class needs source val images and at least
    max(5, M / (2 K)) pool images named after it, K = exp(entropy of the predicted-class histogram), the
    effective number of classes predicted (half an even share). A target holding 3 of 10 classes has
    stray predictions in the other 7, each a few images of *other* classes, and two strays read mutual
    by chance (18 of 20 hand-made such pools raised a flag without this floor, none with it). A swap
    between two classes rarer than half an even share is not looked for. Returns sorted pairs, a < b.
    """
    import torch.nn.functional as F

    ys, pt = torch.as_tensor(source_labels).long(), torch.as_tensor(predicted).long()
    fs, ft = source_features.float(), target_features.float()
    fs, ft = F.normalize(fs - fs.mean(0), dim=1), F.normalize(ft - ft.mean(0), dim=1)
    counts = torch.bincount(pt, minlength=num_classes)[:num_classes].double()
    share = counts[counts > 0] / counts.sum()
    floor = max(5.0, len(pt) / (2.0 * math.exp(float(-(share * share.log()).sum())))) if len(pt) else 1.0
    present = [c for c in range(num_classes) if bool((ys == c).any()) and counts[c] >= floor]
    if len(present) < 2:
        return []
    ms = F.normalize(torch.stack([fs[ys == c].mean(0) for c in present]), dim=1)
    mt = F.normalize(torch.stack([ft[pt == c].mean(0) for c in present]), dim=1)
    sim = mt @ ms.T
    k = len(present)
    return [(present[i], present[j]) for i in range(k) for j in range(i + 1, k)
            if sim[i, j] > sim[i, i] and sim[j, i] > sim[j, j]]
