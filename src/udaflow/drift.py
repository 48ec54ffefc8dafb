"""Is newly ingested target data shifted from the data the champion was adapted on?

Three label-free figures, all on the champion model (features and predictions):

- proxy A-distance (PAD, udaflow.shift): how well a linear classifier tells the two samples apart;
  0 = indistinguishable, 2 = separable. An effect size; its held-out accuracy against chance is also a
  test (a classifier two-sample test, binomial p-value).
- MMD^2 and its permutation p-value (udaflow.shift.mmd_test, multi-scale Gaussian kernel): a kernel
  two-sample test. With many images a tiny shift is significant, hence the PAD floor as well.
- the champion's label-free validator (promotion.validator, e.g. IM) on both samples: a drop says
  the champion got less sure of the new data even where the features barely moved. A set score such
  as IM moves by chance on a few hundred images (its marginal entropy alone by about (K - 1) / 2n
  nats), so the drop is tested too: the same score on random halves of the pooled predictions,
  `permutations` times.

A retrain is worth it when the shift is significant (PAD >= min_pad and either test's p < alpha / 2)
or the validator dropped by more than `validator_drop` with its permutation p < alpha / 2.
Thresholds are params.yaml `drift:`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from udaflow.shift import mmd_test, proxy_a_distance_test

MIN_IMAGES = 10  # per side: below, a held-out half of a few images says nothing


@dataclass(frozen=True)
class DriftReport:
    reference: str  # what the new data is compared with (the champion's data), in words
    n_reference: int
    n_new: int
    pad: float
    pad_p_value: float  # the domain classifier's held-out accuracy against chance (binomial)
    mmd: float
    mmd_p_value: float
    validator: str
    validator_reference: float
    validator_new: float
    significant: bool  # PAD >= min_pad and a p-value (PAD's or MMD's) < alpha / 2
    validator_dropped: bool  # fell by more than validator_drop, and by more than chance (validator_p_value < alpha / 2)
    retrain: bool
    reason: str
    validator_p_value: float = 1.0  # one-sided: the share of random splits of the pooled predictions that fall as far

    @property
    def validator_drop(self) -> float:
        return self.validator_reference - self.validator_new

    def figures(self) -> dict[str, float]:
        """The numbers, under the names MLflow metrics and the Prefect event carry."""
        return {
            "drift.pad": self.pad, "drift.pad_p_value": self.pad_p_value, "drift.mmd": self.mmd, "drift.mmd_p_value": self.mmd_p_value,
            "drift.validator_reference": self.validator_reference, "drift.validator_new": self.validator_new,
            "drift.validator_drop": self.validator_drop, "drift.validator_p_value": self.validator_p_value,
            "drift.n_reference": float(self.n_reference),
            "drift.n_new": float(self.n_new), "drift.retrain": float(self.retrain),
        }

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "validator_drop": self.validator_drop}


def measure(
    reference: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor], score: Callable[[torch.Tensor], float],
    validator: str, *, alpha: float, min_pad: float, validator_drop: float, permutations: int, seed: int = 0,
    reference_name: str = "the champion's data",
) -> DriftReport:
    """reference, new: (features (N, D), logits (N, K)) of the champion on each sample -> a DriftReport."""
    (ref_f, ref_l), (new_f, new_l) = reference, new
    n = min(len(ref_f), len(new_f))
    if n < MIN_IMAGES:
        raise ValueError(f"drift needs at least {MIN_IMAGES} images per side (got {len(ref_f)} reference, {len(new_f)} new)")
    # equal sizes: the domain classifier's chance level is then 1/2 (the larger side would beat it by size alone)
    generator = torch.Generator().manual_seed(seed)
    ref_pick, new_pick = (torch.randperm(len(f), generator=generator)[:n].sort().values for f in (ref_f, new_f))
    ref_f, ref_l, new_f, new_l = ref_f[ref_pick], ref_l[ref_pick], new_f[new_pick], new_l[new_pick]
    pad, pad_p = proxy_a_distance_test(ref_f, new_f, max_per_domain=n, seed=seed, stratified=True)
    mmd2, p_value = mmd_test(ref_f, new_f, permutations=permutations, max_per_domain=len(ref_f) + len(new_f), seed=seed)
    v_ref, v_new = score(ref_l), score(new_l)
    level = alpha / 2  # two tests of one question: Bonferroni
    p_min, test = min((pad_p, "PAD"), (p_value, "MMD"))
    significant = p_min < level and pad >= min_pad
    drop = v_ref - v_new
    # the permutations only where they can decide: a drop under the threshold retrains on no p-value
    drop_p = validator_drop_test(ref_l, new_l, score, permutations=permutations, seed=seed) if drop > validator_drop else 1.0
    dropped = drop > validator_drop and drop_p < level
    if significant:
        reason = f"shift: PAD {pad:.3f} >= {min_pad:g} and {test} p = {p_min:.3g} < {level:g}"
    elif dropped:
        reason = (f"the champion's {validator} fell {drop:.3f} (> {validator_drop:g}, p = {drop_p:.3g} < {level:g}): "
                  f"{v_ref:.3f} -> {v_new:.3f}")
    else:
        why = f"PAD {pad:.3f}" + (f" < {min_pad:g}" if pad < min_pad else "") + f", p = {pad_p:.3g} (PAD), {p_value:.3g} (MMD)"
        why += "" if p_min < level else f" >= {level:g}"
        fell = (f"drop {drop:.3f} > {validator_drop:g}, but within chance: p = {drop_p:.3g} >= {level:g}" if drop > validator_drop
                else f"drop <= {validator_drop:g}")
        reason = f"no shift: {why}; {validator} {v_ref:.3f} -> {v_new:.3f} ({fell})"
    return DriftReport(
        reference_name, len(ref_f), len(new_f), pad, pad_p, mmd2, p_value, validator, v_ref, v_new, significant, dropped,
        significant or dropped, reason, drop_p,
    )


def validator_drop_test(
    reference: torch.Tensor, new: torch.Tensor, score: Callable[[torch.Tensor], float], *, permutations: int, seed: int = 0,
) -> float:
    """One-sided permutation p-value of score(reference) - score(new): the pooled logits (2n, K) are split
    at random into two samples of the same sizes `permutations` times; p = (1 + #{split's drop >= observed})
    / (1 + permutations). The validators are set scores (IM's marginal entropy is a property of the whole
    sample), so the split is re-scored whole, not per image."""
    observed = score(reference) - score(new)
    pooled, n = torch.cat([reference, new]), len(reference)
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for _ in range(permutations):
        order = torch.randperm(len(pooled), generator=generator)
        count += int(score(pooled[order[:n]]) - score(pooled[order[n:]]) >= observed - 1e-12)
    return (1 + count) / (1 + permutations)
