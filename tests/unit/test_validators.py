"""Label-free validators on hand-computed predictions."""

from __future__ import annotations

import math

import pytest
import torch

from udaflow.validators import (
    VALIDATORS,
    batch_nuclear_norm,
    entropy_score,
    get_validator,
    information_maximization,
    score_all,
    soft_neighborhood_density,
)

K = 4
UNIFORM = torch.zeros(8, K)  # every prediction is uniform
ONE_HOT_DIVERSE = torch.eye(K).repeat(2, 1) * 100.0  # confident, each class twice
ONE_HOT_COLLAPSED = torch.zeros(8, K).index_fill_(1, torch.tensor([2]), 100.0)  # confident, all class 2


def test_entropy_score():
    assert entropy_score(UNIFORM) == pytest.approx(-math.log(K), abs=1e-6)
    assert entropy_score(ONE_HOT_DIVERSE) == pytest.approx(0.0, abs=1e-6)
    # two classes at 50/50 for every sample: -log 2
    assert entropy_score(torch.tensor([[0.0, 0.0, -100.0, -100.0]] * 3)) == pytest.approx(-math.log(2), abs=1e-6)


def test_information_maximization():
    assert information_maximization(UNIFORM) == pytest.approx(0.0, abs=1e-6)
    assert information_maximization(ONE_HOT_DIVERSE) == pytest.approx(math.log(K), abs=1e-6)
    assert information_maximization(ONE_HOT_COLLAPSED) == pytest.approx(0.0, abs=1e-6)  # confident, not diverse
    # half the samples sure of class 0, half sure of class 1: H(marginal) = log 2, H(cond) = 0
    mixed = torch.tensor([[100.0, 0, 0, 0], [0, 100.0, 0, 0]]).repeat(3, 1)
    assert information_maximization(mixed) == pytest.approx(math.log(2), abs=1e-6)


def test_soft_neighborhood_density():
    # two samples: each one's only neighbour gets all the mass -> entropy 0
    assert soft_neighborhood_density(torch.randn(2, K)) == pytest.approx(0.0, abs=1e-6)
    # n identical predictions: each sample's n - 1 neighbours are equally similar -> log(n - 1)
    assert soft_neighborhood_density(torch.zeros(5, K)) == pytest.approx(math.log(4), abs=1e-5)
    # two tight clusters of 3 one-hot predictions: neighbours = the 2 others of the same cluster
    two_clusters = torch.tensor([[100.0, 0, 0, 0]] * 3 + [[0, 100.0, 0, 0]] * 3)
    assert soft_neighborhood_density(two_clusters) == pytest.approx(math.log(2), abs=1e-5)


def test_snd_by_formula_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    p = torch.softmax(logits, 1)
    p = p / p.norm(dim=1, keepdim=True)
    sim = p @ p.t() / 0.05
    total = 0.0
    for i in range(6):
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        q = torch.softmax(others, 0)
        total += float(-(q * q.log()).sum())
    assert soft_neighborhood_density(logits) == pytest.approx(total / 6, abs=1e-5)


def test_batch_nuclear_norm():
    assert batch_nuclear_norm(torch.eye(K) * 100.0) == pytest.approx(1.0, abs=1e-6)
    # identity stacked twice: K singular values sqrt(2) over 2K rows
    assert batch_nuclear_norm(ONE_HOT_DIVERSE) == pytest.approx(K * math.sqrt(2) / (2 * K), abs=1e-6)
    # all-uniform (N, K) matrix has rank 1: nuclear = Frobenius = sqrt(N K / K^2); / N
    n = UNIFORM.shape[0]
    assert batch_nuclear_norm(UNIFORM) == pytest.approx(math.sqrt(n / K) / n, abs=1e-6)
    # collapsed one-hot: rank 1, nuclear norm sqrt(N)
    assert batch_nuclear_norm(ONE_HOT_COLLAPSED) == pytest.approx(math.sqrt(n) / n, abs=1e-6)


def test_higher_is_better_for_confident_diverse_predictions():
    for name, fn in VALIDATORS.items():
        if name == "snd":
            continue  # SND rewards dense neighbourhoods, not a fixed ordering of these two
        assert fn(ONE_HOT_DIVERSE) > fn(UNIFORM), name


def test_registry():
    assert set(VALIDATORS) == {"entropy", "im", "snd", "bnm"}
    assert get_validator("im") is information_maximization
    with pytest.raises(ValueError, match="known: entropy, im, snd, bnm"):
        get_validator("accuracy")
    scores = score_all(ONE_HOT_DIVERSE)
    assert set(scores) == set(VALIDATORS) and all(isinstance(v, float) for v in scores.values())


# ------------------------------------------------------------------------------------------- DEV
def test_dev_risk_matches_the_hand_computed_control_variate():
    # L = w*l = [2, 1, 2, 8], mean 3.25; mean w = 1.5; Cov(L, w) = 3.5/3; Var(w) = 1/3 -> eta = -3.5
    # DEV = 3.25 + (-3.5)(1.5) - (-3.5) = 1.5
    from udaflow.validators import dev_risk

    assert dev_risk(torch.tensor([2.0, 1.0, 1.0, 4.0]), torch.tensor([1.0, 1.0, 2.0, 2.0])) == pytest.approx(1.5)
    # equal weights: no variance, DEV is the plain mean loss
    assert dev_risk(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4)) == pytest.approx(2.5)


def test_density_ratios_are_near_one_for_one_distribution_and_large_where_target_lives():
    from udaflow.validators import density_ratios

    g = torch.Generator().manual_seed(0)
    source = torch.randn(400, 4, generator=g)
    same = density_ratios(source, torch.randn(400, 4, generator=g))
    assert same.mean().item() == pytest.approx(1.0, abs=0.2)
    shifted = density_ratios(source, torch.randn(400, 4, generator=g) + torch.tensor([2.0, 0, 0, 0]))
    assert shifted[source[:, 0] > 1].mean() > 3 * shifted[source[:, 0] < -1].mean()


def test_dev_score_prefers_the_model_that_is_right_where_the_target_is():
    """Two models with the same plain source loss; the one right on the target-like half wins."""
    from udaflow.validators import dev_score

    g = torch.Generator().manual_seed(1)
    source = torch.randn(400, 2, generator=g)
    target = torch.randn(400, 2, generator=g) + torch.tensor([2.5, 0.0])
    labels = torch.zeros(400, dtype=torch.long)
    near_target = source[:, 0] > 0
    good_on_target = torch.where(near_target[:, None], torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0]))
    bad_on_target = torch.where(near_target[:, None], torch.tensor([0.0, 5.0]), torch.tensor([5.0, 0.0]))
    assert dev_score(source, good_on_target, labels, target) > dev_score(source, bad_on_target, labels, target)


def test_dev_is_a_known_validator_that_needs_source_val():
    assert get_validator("dev") is None
    with pytest.raises(ValueError, match="unknown validator 'nope'.*dev"):
        get_validator("nope")


def test_ensemble_agreement_on_known_inputs():
    from udaflow.validators import ensemble_agreement

    # three candidates on four samples, two classes; the ensemble follows the majority per sample
    a = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])  # predicts 0 0 1 1
    b = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])  # predicts 0 0 1 0
    c = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [0.0, 5.0]])  # predicts 0 1 1 1
    # mean softmax: sample 1 -> 0 (two of three), sample 3 -> 1 (two of three)
    assert ensemble_agreement([a, b, c]) == pytest.approx([100.0, 75.0, 75.0])
    assert ensemble_agreement([a]) == [100.0] and ensemble_agreement([]) == []


def test_snd_scores_a_seeded_random_subset_not_the_first_rows():
    from udaflow.validators import soft_neighborhood_density

    # a pool sorted by class: the first 100 rows are all class 0
    logits = torch.cat([torch.tensor([[5.0, 0.0]]).repeat(100, 1), torch.tensor([[0.0, 5.0]]).repeat(100, 1)])
    first_rows = soft_neighborhood_density(logits[:50])
    sub = soft_neighborhood_density(logits, max_n=50)
    assert sub == soft_neighborhood_density(logits, max_n=50)  # same rows every time
    assert sub != first_rows  # both classes are in the subset
    assert soft_neighborhood_density(logits, max_n=500) == soft_neighborhood_density(logits)
