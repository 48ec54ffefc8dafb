"""The loss functions of every method against independent recomputations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from udaflow import methods
from udaflow.methods.base import Batch
from udaflow.methods.cdan import entropy_weights, multilinear_map
from udaflow.methods.cdtrans import centre_aware_labels, distillation_loss, two_way_pairs
from udaflow.methods.dann import domain_adversarial_loss, grl_coeff
from udaflow.methods.mcc import class_confusion_loss
from udaflow.models import build_classifier
from udaflow.models.heads import DomainDiscriminator, grad_reverse


# ------------------------------------------------------------------------------------------ dann
@pytest.fixture
def discriminator():
    torch.manual_seed(0)
    d = DomainDiscriminator(8, hidden=16)
    d.eval()  # BatchNorm on running stats: the same network for the joint and the split evaluation
    return d


def _manual_adv(d, f_s, f_t, w_s=None, w_t=None):
    s_logit = d(f_s).squeeze(1)
    t_logit = d(f_t).squeeze(1)
    s = F.binary_cross_entropy_with_logits(s_logit, torch.ones(len(f_s)), reduction="none")
    t = F.binary_cross_entropy_with_logits(t_logit, torch.zeros(len(f_t)), reduction="none")
    if w_s is not None:
        s, t = s * w_s, t * w_t
    return 0.5 * (s.mean() + t.mean())


def test_domain_adversarial_loss_matches_bce(discriminator):
    g = torch.Generator().manual_seed(1)
    f_s, f_t = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    got = domain_adversarial_loss(discriminator, f_s, f_t, coeff=0.3)
    assert got.ndim == 0
    torch.testing.assert_close(got, _manual_adv(discriminator, f_s, f_t), atol=1e-6, rtol=1e-6)


def test_domain_adversarial_loss_with_weights(discriminator):
    g = torch.Generator().manual_seed(2)
    f_s, f_t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    w_s, w_t = torch.rand(5, generator=g) * 2, torch.rand(5, generator=g) * 2
    got = domain_adversarial_loss(discriminator, f_s, f_t, 1.0, w_s, w_t)
    torch.testing.assert_close(got, _manual_adv(discriminator, f_s, f_t, w_s, w_t), atol=1e-6, rtol=1e-6)
    unweighted = domain_adversarial_loss(discriminator, f_s, f_t, 1.0)
    assert not torch.allclose(got, unweighted)  # the weights are actually used


def test_domain_adversarial_loss_reverses_feature_gradient(discriminator):
    """d loss / d features is -coeff times the gradient without reversal."""
    g = torch.Generator().manual_seed(3)
    f_s = torch.randn(4, 8, generator=g, requires_grad=True)
    f_t = torch.randn(4, 8, generator=g, requires_grad=True)
    domain_adversarial_loss(discriminator, f_s, f_t, coeff=0.5).backward()
    rev_s, rev_t = f_s.grad.clone(), f_t.grad.clone()
    f_s.grad = f_t.grad = None
    _manual_adv(discriminator, f_s, f_t).backward()
    torch.testing.assert_close(rev_s, -0.5 * f_s.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(rev_t, -0.5 * f_t.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("coeff", [0.0, 0.25, 1.0, 3.0])
def test_grad_reverse_is_identity_forward_and_minus_c_backward(coeff):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    upstream = torch.randn(3, 5, generator=g)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -coeff * upstream)


def test_grl_coeff_schedule():
    assert grl_coeff(0.0) == 0.0
    assert grl_coeff(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coeff(0.3) == pytest.approx(2 / (1 + math.exp(-3)) - 1)
    assert grl_coeff(0.1) < grl_coeff(0.5) < grl_coeff(1.0) < 1.0


# ------------------------------------------------------------------------------------------ cdan
def test_multilinear_map_is_per_sample_outer_product():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(4, 6, generator=g)
    p = F.softmax(torch.randn(4, 3, generator=g), dim=1)
    got = multilinear_map(f, p)
    assert got.shape == (4, 6 * 3)
    expected = torch.einsum("bk,bd->bkd", p, f).reshape(4, -1)
    torch.testing.assert_close(got, expected)
    for i in range(4):  # and per sample, with torch.outer
        torch.testing.assert_close(got[i], torch.outer(p[i], f[i]).flatten())


def test_entropy_weights_by_hand():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 4, generator=g) * 3
    p = F.softmax(logits, dim=1)
    ent = -(p * torch.log(p)).sum(1)
    w = 1 + torch.exp(-ent)
    expected = w / w.mean()
    got = entropy_weights(p)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # src adds 1e-5 inside the log
    assert got.mean().item() == pytest.approx(1.0, abs=1e-6)
    # the most confident sample weighs the most
    assert got.argmax() == ent.argmin()


def test_entropy_weights_uniform_and_onehot():
    p = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    # one-hot: w = 1 + e^0 = 2 ; uniform: w = 1 + 1/3 -> normalised to mean 1
    w = torch.tensor([2.0, 1 + 1 / 3])
    torch.testing.assert_close(entropy_weights(p), w / w.mean(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- mcc
def _mcc_by_loop(logits: torch.Tensor, temperature: float) -> float:
    b, k = logits.shape
    probs = [[math.exp(v / temperature) for v in row] for row in logits.tolist()]
    probs = [[v / sum(row) for v in row] for row in probs]
    ents = [-sum(v * math.log(v) for v in row if v > 0) for row in probs]
    w = [1 + math.exp(-e) for e in ents]
    w = [b * v / sum(w) for v in w]
    conf = [[sum(w[i] * probs[i][j] * probs[i][jj] for i in range(b)) for jj in range(k)] for j in range(k)]
    conf = [[v / sum(row) for v in row] for row in conf]
    return sum(conf[j][jj] for j in range(k) for jj in range(k) if j != jj) / k


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_class_confusion_loss_matches_loop(temperature):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 4, generator=g) * 2
    got = class_confusion_loss(logits, temperature)
    assert got.item() == pytest.approx(_mcc_by_loop(logits, temperature), abs=1e-4)


def test_class_confusion_loss_confident_diverse_vs_confused():
    confident = torch.eye(4).repeat(2, 1) * 100.0  # one-hot, every class used
    confused = torch.zeros(8, 4)  # uniform predictions
    low = class_confusion_loss(confident).item()
    high = class_confusion_loss(confused).item()
    assert low == pytest.approx(0.0, abs=1e-6)
    # uniform: every confusion row is uniform, so the off-diagonal mass is (K - 1) / K
    assert high == pytest.approx(3 / 4, abs=1e-5)
    half = class_confusion_loss(torch.eye(4).repeat(2, 1) * 2.0).item()
    assert low < half < high


# --------------------------------------------------------------------------------------- cdtrans
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_loss_matches_kl_div(temperature):
    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(6, 5, generator=g)
    student = torch.randn(6, 5, generator=g)
    expected = F.kl_div(
        F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1), reduction="batchmean"
    ) * temperature**2
    got = distillation_loss(teacher, student, temperature)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(9)
    teacher = torch.randn(4, 3, generator=g, requires_grad=True)
    student = torch.randn(4, 3, generator=g, requires_grad=True)
    distillation_loss(teacher, student, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_centre_aware_labels_fix_outliers_of_two_clusters():
    # two tight clusters around directions e0 and e1; the classifier is wrong on one point of each
    features = torch.tensor([
        [1.0, 0.05, 0.0], [1.0, -0.05, 0.02], [0.9, 0.1, 0.0], [1.0, 0.0, 0.1],
        [0.05, 1.0, 0.0], [-0.05, 1.0, 0.02], [0.1, 0.9, 0.0], [0.0, 1.0, 0.1],
    ])
    logits = torch.tensor([
        [2.0, 0.0], [2.0, 0.0], [1.5, 0.0], [0.0, 1.0],  # last one of cluster 0 mislabelled
        [0.0, 2.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.5],  # third one of cluster 1 mislabelled
    ])
    assert logits.argmax(1).tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    labels, _ = centre_aware_labels(features, logits)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert labels.dtype == torch.int64


def test_centre_aware_labels_follow_class_index_not_cluster_order():
    # cluster along e1 is class 0 here: the labels must keep the classifier's class indices
    features = torch.tensor([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1]])
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])
    assert centre_aware_labels(features, logits)[0].tolist() == [0, 0, 1, 1]


def test_two_way_pairs_by_hand():
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    target = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    # target -> nearest source: t0 -> s0 (cos 0.995 vs 0.93 for s2), t1 -> s1
    # source -> nearest target: s0 -> t0, s1 -> t1, s2 -> t0
    pairs = two_way_pairs(source, target)
    assert pairs.shape[1] == 2 and pairs.dtype == torch.int64
    assert {tuple(p) for p in pairs.tolist()} == {(0, 0), (1, 1), (2, 0)}
    assert len(pairs) == 3  # unique


def test_two_way_pairs_chunking_does_not_change_result():
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(13, 4, generator=g), torch.randn(9, 4, generator=g)
    full = two_way_pairs(s, t)
    chunked = two_way_pairs(s, t, chunk=2)
    assert torch.equal(full, chunked)
    # every target and every source appears in at least one pair
    assert set(full[:, 1].tolist()) == set(range(9))
    assert set(full[:, 0].tolist()) == set(range(13))  # every source has its nearest target
    assert len(full) <= 13 + 9


# ----------------------------------------------------------------------------- source_only/oracle
def _smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    uniform = -logp.mean(1)
    return ((1 - eps) * nll + eps * uniform).mean()


@pytest.mark.parametrize("name", ["source_only", "oracle"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_supervised_methods_loss_is_label_smoothed_ce(name, smoothing):
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3).eval()
    method = methods.create_method(name, clf, {"label_smoothing": smoothing})
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.tensor([0, 2, 1, 2])
    out = method(clf, Batch(x, y, None, None), None)
    assert set(out) == {"loss", "cls"}
    with torch.no_grad():
        logits = clf(x)
    expected = _smoothed_ce(logits, y, smoothing)
    torch.testing.assert_close(out["loss"].detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cls"].detach(), expected, atol=1e-5, rtol=1e-5)


def test_select_confident_keeps_top_fraction_per_pseudo_class():
    from udaflow.methods.cdtrans import select_confident

    # targets 0-3 are class 0, targets 4-5 class 1; confidence orders them
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    confidence = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.7])
    pairs = torch.tensor([[10, 0], [11, 1], [12, 2], [13, 3], [14, 4], [15, 5], [16, 0]])
    kept = select_confident(pairs, labels, confidence, 0.5)
    assert sorted(kept[:, 1].tolist()) == [0, 0, 2, 5]  # class 0: targets 0 and 2; class 1: target 5
    assert torch.equal(select_confident(pairs, labels, confidence, 1.0), pairs)


def test_balanced_pair_weights_give_each_class_and_target_equal_mass():
    from udaflow.methods.cdtrans import balanced_pair_weights

    labels = torch.tensor([0, 0, 1])
    # target 0 (class 0) has 3 pairs, target 1 (class 0) one, target 2 (class 1) one
    pairs = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 1], [4, 2]])
    w = balanced_pair_weights(pairs, labels)
    assert torch.allclose(w, torch.tensor([1 / 12, 1 / 12, 1 / 12, 1 / 4, 1 / 2]))
    assert torch.isclose(w.sum(), torch.tensor(1.0))


# ------------------------------------------------------------------ cdtrans hybrid (adversarial, EMA)
HYBRID = {"refresh_every": 1, "adversarial_weight": 0.7, "warmup_fraction": 0.0, "ema": 0.9}


def _ctx(step, total, x_s, y_s, x_t, batch_size):
    from udaflow.methods.base import StepContext

    return StepContext(
        step=step, total_steps=total, batch_size=batch_size, generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"), source_inputs=lambda idx: x_s[idx], target_inputs=lambda idx: x_t[idx],
        source_labels=y_s, embed_source=None, embed_target=None, num_target=len(x_t),
    )


def test_cdtrans_adversarial_term_matches_bce_on_branch_features():
    """Pair phase: 'adv' is DANN's BCE on the source / target branch features, added with its weight."""
    from udaflow.models.cross_attention import three_branch_features

    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3).eval()
    method = methods.create_method("cdtrans", clf, HYBRID).eval()
    g = torch.Generator().manual_seed(12)
    x_s, x_t = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    y_s = torch.tensor([0, 1, 2, 1])
    method.pairs = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]])
    method.weights = torch.ones(4) / 4
    ctx = _ctx(5, 10, x_s, y_s, x_t, 4)
    out = method(clf, None, ctx)
    s_idx, t_idx = method._sample_pairs(4, torch.Generator().manual_seed(0))  # the same draw as forward's
    with torch.no_grad():
        f_s, f_t, _ = three_branch_features(clf.backbone, x_s[s_idx], x_t[t_idx])
        expected = _manual_adv(method.discriminator, f_s, f_t)
    torch.testing.assert_close(out["adv"].detach(), expected, atol=1e-5, rtol=1e-5)
    rest = out["cls"] + out["cross"] + out["target"] + out["distill"]
    torch.testing.assert_close(out["loss"].detach(), (rest + 0.7 * out["adv"]).detach(), atol=1e-5, rtol=1e-5)


def test_cdtrans_warmup_is_smoothed_source_ce_plus_adversarial():
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3).eval()
    method = methods.create_method("cdtrans", clf, {**HYBRID, "warmup_fraction": 0.5}).eval()
    g = torch.Generator().manual_seed(13)
    x_s, x_t = torch.randn(6, 3, 32, 32, generator=g), torch.randn(5, 3, 32, 32, generator=g)
    y_s = torch.tensor([0, 1, 2, 1, 0, 2])
    ctx = _ctx(2, 10, x_s, y_s, x_t, 4)  # progress 0.2 < 0.5: warm-up
    out = method(clf, None, ctx)
    assert set(out) == {"loss", "cls", "adv"}
    gen = torch.Generator().manual_seed(0)
    s_idx = torch.randint(6, (4,), generator=gen)
    t_idx = torch.randint(5, (4,), generator=gen)
    with torch.no_grad():
        f_s, f_t = clf.features(x_s[s_idx]), clf.features(x_t[t_idx])
        cls = _smoothed_ce(clf.head(f_s), y_s[s_idx], 0.1)
        adv = _manual_adv(method.discriminator, f_s, f_t)
    torch.testing.assert_close(out["cls"].detach(), cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["adv"].detach(), adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), cls + 0.7 * adv, atol=1e-5, rtol=1e-5)


def test_cdtrans_ema_teacher_update():
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3)
    method = methods.create_method("cdtrans", clf, HYBRID)
    assert not any(p.requires_grad for p in method.teacher.parameters())
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(1.0)
    method._update_teacher(clf)
    student = clf.state_dict()
    for k, v in method.teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * student[k])
        else:
            assert torch.equal(v, student[k])


# -------------------------------------------------------------------------------------- adamatch
def test_relative_threshold_and_distribution_alignment_by_hand():
    from udaflow.methods.adamatch import distribution_alignment, relative_threshold

    p_s = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    p_t = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    assert float(relative_threshold(p_s, 0.9)) == pytest.approx(0.9 * 0.85)
    # source mix (0.85, 0.15), target mix (0.45, 0.55): class 0 up by 0.85/0.45, class 1 down by 0.15/0.55
    row0 = torch.tensor([0.6 * 0.85 / 0.45, 0.4 * 0.15 / 0.55])
    row1 = torch.tensor([0.3 * 0.85 / 0.45, 0.7 * 0.15 / 0.55])
    expected = torch.stack([row0 / row0.sum(), row1 / row1.sum()])
    assert torch.allclose(distribution_alignment(p_t, p_s), expected, atol=1e-6)
    # already aligned mixes change nothing
    assert torch.allclose(distribution_alignment(p_s, p_s), p_s, atol=1e-6)


def test_unlabelled_weight_ramps_over_the_first_half():
    from udaflow.methods.adamatch import unlabelled_weight

    assert unlabelled_weight(0.0) == pytest.approx(0.0)
    assert unlabelled_weight(0.25) == pytest.approx(0.5)
    assert unlabelled_weight(0.5) == pytest.approx(1.0) and unlabelled_weight(0.9) == pytest.approx(1.0)


def test_adamatch_losses_match_a_plain_recomputation():
    from udaflow.methods.adamatch import adamatch_losses

    torch.manual_seed(0)
    s_w, s_s, t_w, t_s = (torch.randn(16, 5) * 3 for _ in range(4))
    t_s.requires_grad_(True)
    labels = torch.randint(5, (16,))
    out = adamatch_losses(s_w, s_s, labels, t_w, t_s, tau=0.7)

    assert float(out["cls"]) == pytest.approx(float((F.cross_entropy(s_w, labels) + F.cross_entropy(s_s, labels)) / 2), rel=1e-6)
    p_s, p_t = s_w.softmax(1), t_w.softmax(1)
    aligned = [p_t[i] * p_s.mean(0) / p_t.mean(0) for i in range(16)]
    aligned = torch.stack([a / a.sum() for a in aligned])
    threshold = 0.7 * p_s.max(1).values.mean()
    terms = [F.cross_entropy(t_s[i : i + 1], aligned[i].argmax().view(1)) if aligned[i].max() >= threshold else torch.tensor(0.0) for i in range(16)]
    assert float(out["unlabelled"]) == pytest.approx(float(sum(terms) / 16), rel=1e-5)
    assert float(out["mask_rate"]) == pytest.approx(float((aligned.max(1).values >= threshold).float().mean()))
    assert 0.0 < float(out["mask_rate"]) < 1.0  # the example exercises both sides of the threshold
    out["unlabelled"].backward()  # gradient reaches the strong target view only (the weak views are inputs)
    assert t_s.grad is not None and t_s.grad.abs().sum() > 0


def _adamatch_step(options: dict, batch_size: int = 8, training: bool = False):
    """One adamatch forward of udaflow_vit_micro, by default in eval mode (BatchNorm on running
    statistics, so a split forward equals the joint one): losses, parameter gradients, drawn sizes,
    and each pass of the backbone as (rows, train mode)."""
    from udaflow.methods.base import StepContext

    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3).train(training)
    passes = []
    # the backbone's passes: adamatch calls features + head (its weak view's features feed the neighbour bank)
    clf.backbone.register_forward_pre_hook(lambda module, args: passes.append((len(args[0]), module.training)))
    method = methods.create_method("adamatch", clf, options)
    images = {"source": torch.randn(40, 3, 32, 32), "target": torch.randn(30, 3, 32, 32)}
    drawn = {}

    def inputs(domain):
        def view(idx, kind="default"):
            drawn[domain] = len(idx)
            return images[domain][idx] * (0.5 if kind == "strong" else 1.0)  # the strong view differs from the weak one
        return view

    ctx = StepContext(step=900, total_steps=1000, batch_size=batch_size, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"),
                      source_inputs=inputs("source"), target_inputs=inputs("target"), source_labels=torch.arange(40) % 3,
                      embed_source=None, embed_target=None, num_target=30)
    losses = method(clf, None, ctx)
    losses["loss"].backward()
    drawn["passes"] = passes
    return losses, {n: p.grad.clone() for n, p in clf.named_parameters() if p.grad is not None}, drawn


def test_adamatch_weak_target_view_without_backward_gives_the_same_step():
    joint, joint_grads, _ = _adamatch_step({"weak_target_grad": True})
    split, split_grads, _ = _adamatch_step({"weak_target_grad": False})
    for key in ("loss", "cls", "unlabelled", "mask_rate"):
        assert float(split[key]) == pytest.approx(float(joint[key]), rel=1e-5, abs=1e-7), key
    assert float(joint["mask_rate"]) > 0  # the target term takes part
    assert joint_grads.keys() == split_grads.keys()
    for name, grad in joint_grads.items():
        assert torch.allclose(split_grads[name], grad, rtol=1e-4, atol=1e-6), name
    method = methods.create_method("adamatch", build_classifier("udaflow_vit_micro", 3), {"weak_target_grad": False})
    assert method.images_per_step(64, True) == 2 * 64 + 64 + 64 // 3  # the weak target view counts a forward only
    # in training, the weak view is read in eval mode (BatchNorm's running statistics, left as they were), then the
    # 3B rows with a backward in train mode; the joint form is one pass of 4B rows
    assert _adamatch_step({"weak_target_grad": False}, training=True)[2]["passes"] == [(8, False), (24, True)]
    assert _adamatch_step({"weak_target_grad": True}, training=True)[2]["passes"] == [(32, True)]


def test_adamatch_source_views_strong_reads_the_weak_source_view_forward_only():
    """source_views: strong - CE on the strong source view alone; the weak source view, read for the threshold
    and class mix only, runs in one eval-mode, no-grad pass with the weak target view."""
    from udaflow.methods.adamatch import adamatch_losses

    torch.manual_seed(0)
    s_w, s_s, t_w, t_s = (torch.randn(16, 5) * 3 for _ in range(4))
    labels = torch.randint(5, (16,))
    both = adamatch_losses(s_w, s_s, labels, t_w, t_s, tau=0.7)
    strong = adamatch_losses(s_w, s_s, labels, t_w, t_s, tau=0.7, source_views="strong")
    weak = adamatch_losses(s_w, None, labels, t_w, t_s, tau=0.7, source_views="weak")
    assert float(strong["cls"]) == pytest.approx(float(F.cross_entropy(s_s, labels)), rel=1e-6)
    assert float(weak["cls"]) == pytest.approx(float(F.cross_entropy(s_w, labels)), rel=1e-6)
    for out in (strong, weak):  # p_s reads the weak source view in every form: the same threshold and class mix
        assert float(out["unlabelled"]) == float(both["unlabelled"]) and float(out["mask_rate"]) == float(both["mask_rate"])

    losses, grads, drawn = _adamatch_step({"weak_target_grad": False, "source_views": "strong"}, training=True)
    assert drawn["passes"] == [(16, False), (16, True)]  # weak source + weak target forward only; strong views with a backward
    assert float(losses["mask_rate"]) > 0 and grads
    assert _adamatch_step({"weak_target_grad": True, "source_views": "strong"}, training=True)[2]["passes"] == [(8, False), (24, True)]
    assert _adamatch_step({"weak_target_grad": False, "source_views": "weak"}, training=True)[2]["passes"] == [(8, False), (16, True)]
    method = methods.create_method("adamatch", build_classifier("udaflow_vit_micro", 3), {"weak_target_grad": False, "source_views": "strong"})
    assert method.images_per_step(64, True) == 64 + 64 // 3 + 64 + 64 // 3
    with pytest.raises(Exception, match="source_views"):
        methods.create_method("adamatch", build_classifier("udaflow_vit_micro", 3), {"logit_interpolation": True, "source_views": "strong"})


@pytest.mark.parametrize("uratio, expected", [(1.0, (8, 8)), (3.0, (4, 12)), (0.6, (10, 6))])
def test_adamatch_uratio_splits_the_batch_between_domains(uratio, expected):
    method = methods.create_method("adamatch", build_classifier("udaflow_vit_micro", 3), {"uratio": uratio})
    assert method.batch_sizes(8) == expected
    assert method.images_per_step(8, True) == 2 * sum(expected) == 32  # the same work a step at any ratio
    _, _, drawn = _adamatch_step({"uratio": uratio})
    assert (drawn["source"], drawn["target"]) == expected


# ------------------------------------------------------------------------------------------ ssrt
def test_masked_kl_matches_a_loop():
    from udaflow.methods.ssrt import masked_kl

    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(12, 5) * 2, torch.randn(12, 5) * 2
    terms, kept = 0.0, 0
    for i in range(12):
        p, q = p_logits[i].softmax(0), q_logits[i].softmax(0)
        if p.max() > 0.4:
            terms += float((p * (p.log() - q.log())).sum())
            kept += 1
    assert 0 < kept < 12
    assert float(masked_kl(p_logits, q_logits, 0.4)) == pytest.approx(terms / kept, rel=1e-5)


def test_perturbed_tokens_with_zero_strength_give_the_clean_features():
    from udaflow.methods.ssrt import perturbed_features

    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3).eval()
    x_s, x_t = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    f_s, f_t, f_p = perturbed_features(clf.backbone, x_s, x_t, layer=1, alpha=0.0)
    plain = clf.backbone(torch.cat([x_s, x_t]))
    assert torch.allclose(torch.cat([f_s, f_t]), plain, atol=1e-5) and torch.allclose(f_p, f_t, atol=1e-5)
    _, _, moved = perturbed_features(clf.backbone, x_s, x_t, layer=1, alpha=0.5)
    assert not torch.allclose(moved, f_t, atol=1e-3)


def test_diversity_drop_detection_by_hand():
    from udaflow.methods.ssrt import diversity_dropped

    assert not diversity_dropped([10, 10, 9, 10], None, levels=1)
    assert diversity_dropped([10, 10, 2, 2], None, levels=1)  # halves: 10 -> 2
    assert not diversity_dropped([10, 9, 9, 10], [10, 10], levels=2)
    assert diversity_dropped([7, 7, 7, 7], [10, 10], levels=0)  # against the previous period's end


def test_safe_training_rolls_back_a_collapse_and_ramps_in_again():
    clf = build_classifier("udaflow_vit_micro", 3)
    method = methods.create_method("ssrt", clf, {"period": 10, "levels": 1})
    diverse = torch.eye(3).repeat(4, 1)  # (12, 3): three classes predicted
    collapsed = torch.zeros(12, 3)
    collapsed[:, 0] = 1.0  # one class predicted for every image
    for step in range(10):
        method._guard(clf, step)
        method._watch(diverse, step)
    assert not method.safety["restore"] and method.safety["previous"] == [3.0] * 10
    for step in range(10, 20):
        method._guard(clf, step)  # snapshot at step 10
        if step == 10:
            at_snapshot = {k: v.clone() for k, v in clf.state_dict().items()}
        with torch.no_grad():
            clf.head.weight.add_(1.0)  # training moves on ...
        method._watch(collapsed, step)  # ... and the predictions collapse
    assert method.safety["restore"] and method.safety["ramp_start"] == 20
    method._guard(clf, 20)  # the next step rolls back
    assert method.safety["rollbacks"] == 1
    assert all(torch.equal(clf.state_dict()[k], at_snapshot[k]) for k in at_snapshot)
    assert method.ramp(20) == 0.0 and method.ramp(25) == pytest.approx(math.sin(math.pi / 4))
    # a second collapse within one period of the rollback: the ramp period doubles
    for step in range(20, 30):
        method._guard(clf, step)
        method._watch(diverse if step < 25 else collapsed, step)
    assert method.safety["restore"] and method.safety["period"] == 20
