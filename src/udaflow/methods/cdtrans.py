"""cdtrans: cross-domain transformer (Xu et al., "CDTrans: Cross-domain Transformer for
Unsupervised Domain Adaptation", ICLR 2022).

Three weight-sharing branches over one ViT: source self-attention, target self-attention, and a
source-target branch whose attention takes source queries against target keys/values through the
SAME attention weights (models/cross_attention.py). Training pairs (s, t) come from two-way
centre-aware pseudo-labelling, refreshed every `refresh_every` steps:

    centre-aware labels  ŷ_t = argmax_k cos(f_t, c_k),  c_k = Σ_t p_tk f_t / Σ_t p_tk (then once
                         more with hard labels, as in SHOT)
    two-way matching     every target's nearest source and every source's nearest target (cosine)
    filter               keep a pair only when y_s == ŷ_t; per pseudo-class, the most confident
                         targets first (start_fraction, growing to all by `ramp`)
    sampling             class-balanced: pseudo-class, then target, then one of its pairs

    L = CE(g(f_s), y) + CE(g(f_st), y) + target_weight * CE(g(f_t), y)
        + distill_weight * T² KL(softmax(g(f_st)/T).detach() || softmax(g(f_t)/T))

where y = y_s (= ŷ_t after filtering). The cross branch distils into the target branch; only the
target branch (the plain classifier) is used at inference.

Hybrid options (off by default, on in params.yaml): `adversarial_weight` adds DANN's
gradient-reversal domain loss on the source/target branch features, so the features align while
pairs are formed; for the first `warmup_fraction` of training only the source CE and that loss
run (no pairs: a weak source model's pairs confirm its own errors); `ema` > 0 forms the
pseudo-labels, centres and pairs from an exponential moving average of the weights (a teacher)
instead of the current ones. `step_scale` > 1 lengthens training: the pair phase can only start
from an aligned model, so the warm-up must not eat into it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from udaflow import distributed
from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method
from udaflow.methods.dann import domain_adversarial_loss, grl_coeff
from udaflow.models.cross_attention import check_vit, three_branch_features
from udaflow.models.heads import DomainDiscriminator
from udaflow.pseudo_labels import class_top_fraction, ema_update


def centre_aware_labels(features: torch.Tensor, logits: torch.Tensor, rounds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels from class centroids in feature space: (N, D), (N, K) -> labels (N,), cosine to own centroid (N,)."""
    f = F.normalize(features, dim=1)
    weights = F.softmax(logits, dim=1)  # (N, K) soft assignment for the first centroids
    k = logits.shape[1]
    sims = f @ F.normalize(weights.t() @ f, dim=1).t()  # (N, K)
    for _ in range(rounds):
        centroids = F.normalize(weights.t() @ f, dim=1)  # (K, D)
        sims = f @ centroids.t()  # (N, K)
        weights = F.one_hot(sims.argmax(1), k).float()
    labels = sims.argmax(1)
    return labels, sims.gather(1, labels[:, None]).squeeze(1)


def select_confident(pairs: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep, per pseudo-class, the pairs of the `fraction` most confident targets of that class.

    pairs (P, 2) [source, target]; labels / confidence (Nt,) per target. Per-class quotas keep a
    class the source model is unsure about from vanishing behind the confident ones.
    """
    if fraction >= 1.0 or len(pairs) == 0:
        return pairs
    keep_targets = class_top_fraction(labels, confidence, fraction, candidates=torch.unique(pairs[:, 1]))
    return pairs[torch.isin(pairs[:, 1], keep_targets)]


def balanced_pair_weights(pairs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sampling weights (P,): every pseudo-class equally likely, then every target of it, then its pairs.

    Source->target matches pile onto a few hub targets, and easy classes collect most pairs;
    uniform sampling over pairs would train on those alone.
    """
    t = pairs[:, 1]
    _, per_target = torch.unique(t, return_inverse=True)
    pairs_of_target = torch.bincount(per_target)[per_target].float()  # (P,)
    cls = labels[t]
    targets_of_class = torch.zeros(int(labels.max()) + 1)
    for k in torch.unique(cls):
        targets_of_class[k] = len(torch.unique(t[cls == k]))
    n_classes = len(torch.unique(cls))
    return 1.0 / (n_classes * targets_of_class[cls] * pairs_of_target)


def two_way_pairs(source_features: torch.Tensor, target_features: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Nearest-neighbour pairs both ways by cosine similarity: -> (P, 2) [source index, target index], unique."""
    s = F.normalize(source_features, dim=1)
    t = F.normalize(target_features, dim=1)
    t_to_s = torch.cat([(t[i : i + chunk] @ s.t()).argmax(1) for i in range(0, len(t), chunk)])  # (Nt,)
    s_to_t = torch.cat([(s[i : i + chunk] @ t.t()).argmax(1) for i in range(0, len(s), chunk)])  # (Ns,)
    pairs = torch.cat([
        torch.stack([t_to_s, torch.arange(len(t))], 1),
        torch.stack([torch.arange(len(s)), s_to_t], 1),
    ])
    return torch.unique(pairs, dim=0)


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² KL(softmax(teacher/T) || softmax(student/T)), teacher detached, batch mean: (B, K), (B, K) -> scalar."""
    t = temperature
    teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    log_student = F.log_softmax(student_logits / t, dim=1)
    return (teacher * (torch.log(teacher + 1e-8) - log_student)).sum(1).mean() * t * t


class CdtransConfig(MethodConfig):
    refresh_every: int = Field(50, ge=1)  # steps between pseudo-label / pair refreshes (measured: 200 -> 71%, 100 -> 79% synth->mnist)
    target_weight: float = Field(1.0, ge=0)  # CE of the target branch on the pair labels
    distill_weight: float = Field(1.0, ge=0)  # cross branch -> target branch distillation
    temperature: float = Field(1.0, gt=0)  # distillation temperature
    start_fraction: float = Field(0.5, gt=0, le=1)  # share of each pseudo-class's most confident targets used at first
    ramp: float = Field(0.5, ge=0, le=1)  # progress (of the pair phase, after warm-up) at which every agreeing pair is used
    label_smoothing: float = Field(0.1, ge=0, le=1)
    adversarial_weight: float = Field(0.0, ge=0)  # DANN gradient-reversal domain loss on source/target branch features; 0 = off
    hidden: int = Field(256, ge=1)  # domain discriminator width (when adversarial_weight > 0)
    warmup_fraction: float = Field(0.0, ge=0, lt=1)  # share of training with source CE (+ adversarial) only, before any pairs
    ema: float = Field(0.0, ge=0, lt=1)  # EMA decay of the teacher that pseudo-labels and pairs; 0 = use the current weights
    step_scale: float = Field(1.0, gt=0)  # adapt for step_scale * train.adapt_steps (the warm-up is part of them); 1 = as every method


@register_method("cdtrans")
class Cdtrans(Method):
    Config = CdtransConfig
    draws_own_batches = True  # batches are pseudo-labelled pairs, not independent draws

    def __init__(self, classifier, config: CdtransConfig):
        super().__init__(classifier, config)
        check_vit(classifier.backbone)
        self.refresh_every = config.refresh_every
        self.pairs = torch.zeros(0, 2, dtype=torch.long)  # (P, 2) [source index, target index]
        self.agreement = 0.0
        self.weights = torch.zeros(0)  # (P,) sampling weights of the pairs
        if config.adversarial_weight > 0:
            self.discriminator = DomainDiscriminator(classifier.num_features, config.hidden)
        if config.ema > 0:
            self.teacher = copy.deepcopy(classifier)  # frozen: its parameters never reach the optimiser
            self.teacher.requires_grad_(False)

    def adapt_steps(self, steps: int) -> int:
        return max(1, round(steps * self.config.step_scale))

    def selection_start(self, steps: int) -> int:
        # the warm-up trains a source + adversarial (DANN) model, not cdtrans: select from the checkpoint
        # after the first pair step on (the same test as training's, so float rounding cannot split them)
        first_pair_step = next((s for s in range(steps) if not self._warmup_at(s, steps)), steps)
        return first_pair_step + 1 if first_pair_step > 0 else 0

    def _warmup_at(self, step: int, total_steps: int) -> bool:
        return step / max(1, total_steps) < self.config.warmup_fraction

    def _in_warmup(self, ctx) -> bool:
        return self._warmup_at(ctx.step, ctx.total_steps)

    def _update_teacher(self, classifier) -> None:
        ema_update(self.teacher, classifier, self.config.ema)

    @torch.no_grad()
    def refresh(self, classifier, ctx):
        if self._in_warmup(ctx):  # no pairs yet: forward trains on source CE (+ adversarial) only
            return
        model = self.teacher if self.config.ema > 0 else None
        f_s, _ = ctx.embed_source(model)
        f_t, logits_t = ctx.embed_target(model)
        pseudo, confidence = centre_aware_labels(f_t, logits_t)
        pairs = two_way_pairs(f_s, f_t)
        keep = ctx.source_labels[pairs[:, 0]] == pseudo[pairs[:, 1]]
        self.agreement = float(keep.float().mean())  # share of matched pairs whose labels agree (label-free)
        # curriculum: start from the most confident targets per class, end with all agreeing pairs
        c = self.config
        phase = (ctx.progress - c.warmup_fraction) / max(1.0 - c.warmup_fraction, 1e-6)  # progress of the pair phase
        fraction = c.start_fraction + (1.0 - c.start_fraction) * min(1.0, phase / max(c.ramp, 1e-6))
        self.pairs = select_confident(pairs[keep], pseudo, confidence, fraction)
        self.weights = balanced_pair_weights(self.pairs, pseudo) if len(self.pairs) else torch.zeros(0)

    def _sample_pairs(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.pairs[torch.multinomial(self.weights, n, replacement=True, generator=generator)]
        return rows[:, 0], rows[:, 1]

    def forward(self, classifier, batch, ctx):
        b, c = ctx.batch_size, self.config
        if c.ema > 0:
            self._update_teacher(classifier)  # the weights after the previous step
        if self._in_warmup(ctx) or len(self.pairs) == 0:  # no pairs (yet): source training (+ alignment)
            idx = torch.randint(len(ctx.source_labels), (b,), generator=ctx.generator)
            x_s = ctx.source_inputs(idx)
            if c.adversarial_weight <= 0:
                cls = F.cross_entropy(classifier(x_s), distributed.shard(ctx.source_labels[idx]).to(ctx.device))
                return {"loss": cls, "cls": cls}
            t_idx = torch.randint(ctx.num_target, (b,), generator=ctx.generator)
            f_s, f_t = classifier.features(torch.cat([x_s, ctx.target_inputs(t_idx)])).chunk(2)
            cls = F.cross_entropy(classifier.head(f_s), distributed.shard(ctx.source_labels[idx]).to(ctx.device), label_smoothing=c.label_smoothing)
            adv = domain_adversarial_loss(self.discriminator, f_s, f_t, grl_coeff(ctx.progress))
            return {"loss": cls + c.adversarial_weight * adv, "cls": cls, "adv": adv}
        s_idx, t_idx = self._sample_pairs(b, ctx.generator)
        y = distributed.shard(ctx.source_labels[s_idx]).to(ctx.device)
        f_s, f_t, f_st = three_branch_features(classifier.backbone, ctx.source_inputs(s_idx), ctx.target_inputs(t_idx))
        ls = c.label_smoothing
        logits_t, logits_st = classifier.head(f_t), classifier.head(f_st)
        cls = F.cross_entropy(classifier.head(f_s), y, label_smoothing=ls)
        cross = F.cross_entropy(logits_st, y, label_smoothing=ls)
        tgt = F.cross_entropy(logits_t, y, label_smoothing=ls)
        distill = distillation_loss(logits_st, logits_t, c.temperature)
        loss = cls + cross + c.target_weight * tgt + c.distill_weight * distill
        out = {"cls": cls, "cross": cross, "target": tgt, "distill": distill}
        if c.adversarial_weight > 0:
            # paired targets are not a uniform draw, but both branches see the same images as the CE terms
            out["adv"] = domain_adversarial_loss(self.discriminator, f_s, f_t, grl_coeff(ctx.progress))
            loss = loss + c.adversarial_weight * out["adv"]
        return {"loss": loss, **out}

    def extra_state(self):
        return {"pairs": self.pairs, "weights": self.weights}

    def load_extra_state(self, state):
        self.pairs = state.get("pairs", self.pairs)
        self.weights = state.get("weights", self.weights)
