"""The shared pseudo-label denoising filter and the tensor augmentations the recipe trains with."""

import pytest
import torch

from udaflow.config import AugmentConfig
from udaflow.data.transforms import affine, augment
from udaflow.pseudo_labels import PseudoLabelFilter, class_thresholds, class_top_fraction


def test_class_thresholds_by_hand():
    status = torch.tensor([0.5, 0.25, 0.0])  # beta = [1, 0.5, 0]
    got = class_thresholds(status, 0.9)
    # c * beta / (2 - beta): [0.9, 0.9 * 0.5 / 1.5, 0]
    assert torch.allclose(got, torch.tensor([0.9, 0.3, 0.0]))


def test_filter_off_is_the_plain_threshold():
    probs = torch.softmax(torch.randn(32, 5, generator=torch.Generator().manual_seed(0)) * 3, 1)
    labels, mask = PseudoLabelFilter(5, balance=False, agreement=False)(probs, 0.6)
    assert torch.equal(labels, probs.argmax(1))
    assert torch.equal(mask, (probs.max(1).values >= 0.6).float())


def test_balance_lowers_the_threshold_of_a_lagging_class_only():
    f = PseudoLabelFilter(2, balance=True, agreement=False, momentum=0.0)  # status = this batch's share
    # class 0: three confident predictions; class 1: one confident, one at 0.7
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.92, 0.08], [0.1, 0.9], [0.3, 0.7]])
    labels, mask = f(probs, 0.85)
    assert torch.allclose(f.status, torch.tensor([0.75, 0.25]))
    # class 1: beta = 1/3 -> threshold 0.85 * (1/3) / (5/3) = 0.17: the 0.7 prediction is now kept
    assert mask.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    _, plain = PseudoLabelFilter(2, balance=False)(probs, 0.85)
    assert plain.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    # the leading class keeps the global threshold
    _, mask = f(torch.tensor([[0.8, 0.2]]), 0.85)
    assert mask.tolist() == [0.0]


def test_balance_status_stays_when_nothing_is_confident():
    f = PseudoLabelFilter(2, balance=True, agreement=False, momentum=0.5)
    f(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), 0.7)  # one confident each: share [0.5, 0.5]
    assert torch.allclose(f.status, torch.tensor([0.5, 0.5]))
    f(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0.7)  # share [1, 0]: status 0.5 * 0.5 + 0.5 * share
    assert torch.allclose(f.status, torch.tensor([0.75, 0.25]))
    before = f.status.clone()
    f(torch.tensor([[0.6, 0.4], [0.45, 0.55]]), 0.7)  # none confident: no share to move towards
    assert torch.equal(f.status, before)


def test_agreement_drops_pseudo_labels_a_second_view_disputes():
    probs = torch.tensor([[0.9, 0.1], [0.95, 0.05], [0.1, 0.9]])
    second = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0]])  # logits: disagrees on row 1
    _, mask = PseudoLabelFilter(2, balance=False, agreement=True)(probs, 0.5, second)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    _, mask = PseudoLabelFilter(2, balance=False, agreement=True)(probs, 0.5, torch.tensor([0, 0, 0]))
    assert mask.tolist() == [1.0, 1.0, 0.0]


def test_class_top_fraction_keeps_the_most_confident_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    confidence = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3])
    assert sorted(class_top_fraction(labels, confidence, 0.5).tolist()) == [1, 3, 5]
    assert sorted(class_top_fraction(labels, confidence, 0.5, candidates=torch.tensor([0, 2, 4])).tolist()) == [2, 4]
    assert class_top_fraction(labels, confidence, 1.0).tolist() == list(range(6))


def test_adamatch_gets_the_shared_filter_and_checkpoints_its_status():
    from udaflow.methods import create_method
    from udaflow.models import build_classifier

    clf = build_classifier("udaflow_vit_micro", 4)
    method = create_method("adamatch", clf, {}, {"balance": True, "agreement": True})
    assert isinstance(method.pseudo_labels, PseudoLabelFilter) and method.pseudo_labels.balance
    assert "pseudo_labels.status" in method.state_dict()
    assert not hasattr(create_method("dann", clf, {}, {"balance": True}), "pseudo_labels")


def test_affine_identity_and_rotation_moves_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(affine(x, 0, 0.0, 0.0, g), x, atol=1e-5)
    y = affine(x, 0, 90.0, 0.0, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_affine_shear_moves_rows_sideways_and_zero_shear_draws_nothing():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, :, 4] = 1.0  # a vertical line through the middle
    g = torch.Generator().manual_seed(0)
    y = affine(x, 0, 0.0, 0.0, g, shear=1.0)
    top, bottom = y[0, 0, 0].argmax(), y[0, 0, -1].argmax()  # the line leans: its ends move apart
    assert top != bottom and y[0, 0, 4].argmax() == 4  # the middle row stays
    # shear 0 draws no number: the rotate/scale augmentation of earlier runs keeps its bits
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(affine(x, 1, 10.0, 0.1, a), affine(x, 1, 10.0, 0.1, b, shear=0.0)) and torch.equal(a.get_state(), b.get_state())


def test_strong_view_warps_only_with_its_rotate_or_shear():
    from udaflow.data.transforms import augment_view, cutout

    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    plain, warp = AugmentConfig(), AugmentConfig(strong_rotate=15, strong_shear=0.3)  # off by default
    g = torch.Generator().manual_seed(2)
    expected = cutout(augment(x, plain, g), g)  # default view + cutout, no warp
    assert torch.equal(augment_view(x, plain, torch.Generator().manual_seed(2), "strong"), expected)
    warped = augment_view(x, warp, torch.Generator().manual_seed(2), "strong")
    assert warped.shape == x.shape and warped.dtype == torch.uint8 and not torch.equal(warped, expected)
    assert torch.equal(warped, augment_view(x, warp, torch.Generator().manual_seed(2), "strong"))  # seeded
    # the weak and default views never warp
    for view in ("weak", "default"):
        assert torch.equal(augment_view(x, warp, torch.Generator().manual_seed(2), view),
                           augment_view(x, plain, torch.Generator().manual_seed(2), view))


@pytest.mark.parametrize("cfg", [AugmentConfig(rotate=15, scale=0.1), AugmentConfig()])
def test_augment_is_seeded(cfg):
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, cfg, torch.Generator().manual_seed(3))
    b = augment(x, cfg, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and torch.equal(a, b)


def test_adamatch_reads_pseudo_labels_from_the_teacher_and_checks_the_student():
    from udaflow.methods.adamatch import adamatch_losses

    k = 3
    labels = torch.tensor([0, 1])
    src = torch.tensor([[9.0, 0, 0], [0, 9.0, 0]])  # confident source: threshold 0.5 x ~1.0
    student_weak = torch.tensor([[5.0, 0, 0], [5.0, 0, 0]])
    teacher_weak = torch.tensor([[0, 0, 5.0], [5.0, 0, 0]])
    strong = torch.zeros(2, k, requires_grad=True)
    filt = PseudoLabelFilter(k, balance=False, agreement=True)
    out = adamatch_losses(src, src, labels, student_weak, strong, 0.5, filt, teacher_weak)
    # row 0: teacher says 2, student says 0 -> dropped; row 1: both say 0 -> kept
    assert out["mask_rate"].item() == 0.5
    plain = adamatch_losses(src, src, labels, student_weak, strong, 0.5, PseudoLabelFilter(k, balance=False), None)
    assert plain["mask_rate"].item() == 1.0
    # only the kept row's CE against label 0 counts, averaged over the batch
    expected = torch.nn.functional.cross_entropy(strong[1:], torch.tensor([0])) / 2
    assert torch.allclose(out["unlabelled"], expected)


def test_ema_update_by_hand():
    from udaflow.pseudo_labels import ema_update

    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 1.5))


def test_neighbour_vote_against_a_plain_recomputation():
    from udaflow.pseudo_labels import NeighbourBank

    g = torch.Generator().manual_seed(0)
    pool_f, pool_l = torch.randn(12, 4, generator=g), torch.randn(12, 3, generator=g)
    bank = NeighbourBank(3)
    bank.fill(pool_f, pool_l)
    f, p, idx = torch.randn(2, 4, generator=g), torch.softmax(torch.randn(2, 3, generator=g), 1), torch.tensor([5, 0])
    got = bank.vote(f, p, idx)
    # by hand: write the rows, then for each image the 3 most cosine-similar other rows of the pool
    feats = torch.nn.functional.normalize(pool_f, dim=1)
    probs = torch.softmax(pool_l, 1)
    feats[idx], probs[idx] = torch.nn.functional.normalize(f, dim=1), p
    for row, i in enumerate(idx.tolist()):
        sims = [(float(feats[i] @ feats[j]), j) for j in range(12) if j != i]
        nearest = [j for _, j in sorted(sims, reverse=True)[:3]]
        expected = 0.5 * (p[row] + probs[nearest].mean(0))
        assert torch.allclose(got[row], expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(2)) and torch.equal(bank.features, feats) and torch.equal(bank.probs, probs)


def test_neighbour_vote_outvotes_an_isolated_wrong_prediction():
    from udaflow.pseudo_labels import NeighbourBank

    # two clusters in feature space; the pool predicts class 0 on the first, class 1 on the second
    feats = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.97, 0.05], [0.0, 1.0], [0.1, 0.99], [-0.1, 0.98]])
    logits = torch.tensor([[4.0, 0.0]] * 4 + [[0.0, 4.0]] * 3)
    bank = NeighbourBank(3)
    bank.fill(feats, logits)
    # image 3 (first cluster) is now read as class 1 with some confidence: its neighbours outvote it
    vote = bank.vote(torch.tensor([[0.97, 0.05]]), torch.tensor([[0.3, 0.7]]), torch.tensor([3]))
    assert vote.argmax(1).item() == 0
    # a prediction its cluster shares keeps its label
    vote = bank.vote(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.8]]), torch.tensor([4]))
    assert vote.argmax(1).item() == 1


def test_neighbour_bank_writes_the_last_of_a_repeated_image_and_round_trips():
    from udaflow.pseudo_labels import NeighbourBank

    bank = NeighbourBank(2)
    bank.fill(torch.eye(4), torch.zeros(4, 2))
    f = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    bank.vote(f, p, torch.tensor([1, 3, 1]))  # image 1 drawn twice: its last row is kept, as a loop would
    assert torch.equal(bank.features[1], f[2]) and torch.equal(bank.probs[1], p[2])
    assert torch.equal(bank.probs[3], p[1])
    again = NeighbourBank(2)
    again.load_state(bank.state())
    assert torch.equal(again.features, bank.features) and torch.equal(again.probs, bank.probs)
    with pytest.raises(RuntimeError, match="before fill"):
        NeighbourBank(2).vote(f, p, torch.tensor([0, 1, 2]))


def test_adamatch_reads_the_neighbourhood_consensus():
    from udaflow.methods import create_method
    from udaflow.methods.adamatch import adamatch_losses
    from udaflow.models import build_classifier

    clf = build_classifier("udaflow_vit_micro", 2)
    assert create_method("adamatch", clf, {}, {}).pseudo_labels.bank is None  # off by default in the filter
    method = create_method("adamatch", clf, {}, {"neighbours": 5})
    assert method.pseudo_labels.bank.k == 5 and method.extra_state() == {"neighbour_bank": {}}
    # given probabilities replace the weak view's softmax: a weak view saying 0 is read as the consensus's 1
    src = torch.tensor([[9.0, 0], [0, 9.0]])
    weak, strong = torch.tensor([[5.0, 0], [5.0, 0]]), torch.zeros(2, 2)
    consensus = torch.tensor([[0.01, 0.99], [0.02, 0.98]])
    out = adamatch_losses(src, src, torch.tensor([0, 1]), weak, strong, 0.5, PseudoLabelFilter(2, balance=False), None, consensus)
    plain = adamatch_losses(src, src, torch.tensor([0, 1]), weak, strong, 0.5, PseudoLabelFilter(2, balance=False), None)
    assert out["mask_rate"].item() == 1.0 and plain["mask_rate"].item() == 1.0
    assert torch.allclose(out["unlabelled"], plain["unlabelled"])  # zero logits: the same CE for either label
    strong = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    out = adamatch_losses(src, src, torch.tensor([0, 1]), weak, strong, 0.5, PseudoLabelFilter(2, balance=False), None, consensus)
    plain = adamatch_losses(src, src, torch.tensor([0, 1]), weak, strong, 0.5, PseudoLabelFilter(2, balance=False), None)
    assert out["unlabelled"] < plain["unlabelled"]  # the strong view agrees with the consensus (1), not the weak view (0)
