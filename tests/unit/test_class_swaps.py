"""shift.class_swaps: an adapted model's labels on the target pool, read in the source model's features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from udaflow.shift import class_swaps


def domains(seed=0, classes=5, per_class=60, dim=16, signal=0.35):
    """Source features: class c along axis c. Target features of class c: weakly along axis c, plus an offset
    common to the domain and noise (a source model on a shifted domain: nearest-mean labels often wrong)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    axes = torch.eye(classes, dim)
    source = axes[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
    offset = torch.randn(dim, generator=g)
    target = signal * axes[labels] + offset + 0.8 * torch.randn(len(labels), dim, generator=g)
    return source, labels, target, labels.clone()


def plain(source, ys, target, predicted, num_classes, floor=True):
    """The same test written out: class means of centred, normalised rows, cosines, both sides of every pair
    (`floor=False`: every class with a source image and a prediction takes part, however few)."""
    def mean_dir(x, keep):
        m = F.normalize(x - x.mean(0), dim=1)[keep].mean(0)
        return m / m.norm()
    counts = [int((predicted == c).sum()) for c in range(num_classes)]
    k = math.exp(-sum(n / len(predicted) * math.log(n / len(predicted)) for n in counts if n))
    least = max(5, len(predicted) / (2 * k)) if floor else 1
    shown = [c for c in range(num_classes) if counts[c] >= least and bool((ys == c).any())]
    out = []
    for a in shown:
        for b in (b for b in shown if b > a):
            s = {(i, j): float(mean_dir(target, predicted == i) @ mean_dir(source, ys == j)) for i in (a, b) for j in (a, b)}
            if s[a, b] > s[a, a] and s[b, a] > s[b, b]:
                out.append((a, b))
    return out


def test_a_swapped_pair_is_flagged_and_right_labels_are_not():
    source, ys, target, truth = domains()
    nearest = (F.normalize(target, dim=1) @ F.normalize(torch.stack([source[ys == c].mean(0) for c in range(5)]), dim=1).T).argmax(1)
    assert (nearest == truth).float().mean() < 0.8  # weak features: nearest source mean is often wrong
    assert class_swaps(source, ys, target, truth, 5) == []
    swapped = truth.clone()
    swapped[truth == 1], swapped[truth == 3] = 3, 1
    assert class_swaps(source, ys, target, swapped, 5) == [(1, 3)]
    two = swapped.clone()
    two[truth == 0], two[truth == 2] = 2, 0
    assert class_swaps(source, ys, target, two, 5) == [(0, 2), (1, 3)]


def test_centring_each_domain_is_what_finds_the_swap():
    """The domain's common offset outweighs the weak class signal: the same cosines on uncentred rows miss the swap.
    Centred, a constant added to all of one domain's features changes nothing."""
    source, ys, target, truth = domains()
    swapped = truth.clone()
    swapped[truth == 1], swapped[truth == 3] = 3, 1
    ms = F.normalize(torch.stack([F.normalize(source, dim=1)[ys == c].mean(0) for c in range(5)]), dim=1)
    mt = F.normalize(torch.stack([F.normalize(target, dim=1)[swapped == c].mean(0) for c in range(5)]), dim=1)
    sim = mt @ ms.T
    assert not (sim[1, 3] > sim[1, 1] and sim[3, 1] > sim[3, 3])  # uncentred: not flagged
    assert class_swaps(source + 3.0, ys, target - 2.0, swapped, 5) == class_swaps(source, ys, target, swapped, 5) == [(1, 3)]


def test_a_one_sided_confusion_is_not_a_swap():
    """Half of class 4's images named 0: pseudo-class 0 drifts toward source 4, but 4 keeps its own side."""
    source, ys, target, truth = domains(seed=1)
    merged = truth.clone()
    merged[(truth == 4).nonzero().squeeze(1)[::2]] = 0
    assert (0, 4) not in class_swaps(source, ys, target, merged, 5)


def test_matches_the_plain_re_computation_on_random_inputs():
    for seed in range(6):
        source, ys, target, truth = domains(seed=seed, signal=0.1)
        g = torch.Generator().manual_seed(100 + seed)
        predicted = torch.where(torch.rand(len(truth), generator=g) < 0.3, torch.randint(0, 5, (len(truth),), generator=g), truth)
        assert class_swaps(source, ys, target, predicted, 5) == plain(source, ys, target, predicted, 5)


def test_classes_missing_on_either_side_are_left_out():
    source, ys, target, truth = domains()
    swapped = truth.clone()
    swapped[truth == 1], swapped[truth == 3] = 3, 1
    none_named_2 = swapped.clone()
    none_named_2[truth == 2] = 0
    assert class_swaps(source, ys, target, none_named_2, 7) == [(1, 3)]  # classes 5, 6: no images at all; 2: never predicted
    assert class_swaps(source, ys, target, torch.zeros_like(truth), 5) == []  # one class predicted: nothing to pair


def test_stray_predictions_of_classes_the_target_lacks_raise_no_flag():
    """A target holding 3 of 10 classes, 15% of its images named after the 7 it lacks (a few each): two strays read
    mutual by chance, so classes under half an even share of the pool (over the effective number predicted) sit out.
    A swap between the target's own classes is still found."""
    chance, found = 0, 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        ys = torch.arange(10).repeat_interleave(50)
        source = torch.eye(10, 16)[ys] + 0.3 * torch.randn(len(ys), 16, generator=g)
        truth = torch.arange(3).repeat_interleave(100)
        target = 0.35 * torch.eye(10, 16)[truth] + 0.5 * torch.randn(16, generator=g) + 0.5 * torch.randn(len(truth), 16, generator=g)
        named = truth.clone()
        stray = torch.rand(len(truth), generator=g) < 0.15
        named[stray] = torch.randint(3, 10, (int(stray.sum()),), generator=g)
        assert class_swaps(source, ys, target, named, 10) == []
        chance += bool(plain(source, ys, target, named, 10, floor=False))
        swapped = named.clone()
        swapped[named == 0], swapped[named == 1] = 1, 0
        found += class_swaps(source, ys, target, swapped, 10) == [(0, 1)]
    assert chance >= 15 and found == 20  # without the floor most of these pools flag a pair of strays

