"""adamatch: AdaMatch (Berthelot, Roelofs, Sohn, Carlini, Kurakin, "AdaMatch: A Unified Approach
to Semi-Supervised Learning and Domain Adaptation", ICLR 2022).

Each step draws Bs source and Bt target images (by default Bs = Bt = B; `uratio` splits the 2B images of a view
1 : uratio between the domains, as the paper's uratio puts more target images in a step), each in a
weak and a strong view (shapes below for Bs = Bt = B):

    z'  = f([x_s^w, x_s^s, x_t^w, x_t^s])                 (4B, K) one batch: BN sees both domains
    z'' = f([x_s^w, x_s^s])                               (2B, K) source alone (logit_interpolation only)
    z_s = l * z'_s + (1 - l) * z''_s,  l ~ U(0, 1)^(2B, K)  random logit interpolation (else z_s = z'_s)
    p_s = softmax(z_s^w),  p_t = softmax(z'_t^w)           weak-view predictions, no gradient
    p~_t = normalise(p_t * mean(p_s) / mean(p_t))          distribution alignment to the source class mix
    c_tau = tau * mean_i max_k p_s[i, k]                   relative confidence threshold
    y^_t = argmax p~_t,  m = [max p~_t >= c_tau]           pseudo-labels and their mask, through the shared
                                                           denoising filter (pseudo_labels.py): class-balanced
                                                           c_tau per class, agreement with the strong view
    L = (CE(z_s^w, y) + CE(z_s^s, y)) / 2 + mu(p) * mean(m * CE(z'_t^s, y^_t))
    mu(p) = 1/2 - cos(min(pi, 2 pi p)) / 2                 ramps 0 -> 1 over the first half of training

With `train.pseudo_labels.neighbours` = k > 0 (the default, 10), p_t is first replaced by the
neighbourhood consensus (pseudo_labels.py, NeighbourBank): the mean of p_t and the predictions of the
k target images nearest to each weak-view feature f_t (the backbone's pooled features, (Bt, D)), read
from a memory of the whole pool that each step's weak view overwrites and one eval pass fills at the
first step. The memory is checkpointed (extra_state).

The weak target view only reads pseudo-labels (no gradient flows through p_t). With
`weak_target_grad: false` it runs forward alone, under no_grad, and the batch with a backward holds
[x_s^w, x_s^s, x_t^s]: the same step with about 13% less arithmetic (a forward is about a third of a
forward + backward). The weak view is then read in eval mode, BatchNorm on its running statistics
(those of mixed-domain batches, as the evaluation reads the model); only that differs from the
joint batch, whose weak rows BatchNorm normalised with the batch's own statistics.

With `teacher_ema` > 0, p_t comes from an exponential moving average of the weights (a mean teacher,
Tarvainen & Valpola 2017), evaluated on the weak target view in eval mode; the student's own weak-view
prediction is then the second opinion the agreement filter checks. The teacher's forward pass (B images,
no backward) is counted in seconds, not in img/s.

Example:
    >>> p_s = torch.tensor([[0.9, 0.1], [0.8, 0.2]]); p_t = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    >>> relative_threshold(p_s, 0.9)  # 0.9 * mean(0.9, 0.8) = 0.765
    >>> distribution_alignment(p_t, p_s)  # rows rescaled by [0.85, 0.15] / [0.45, 0.55], renormalised
"""

from __future__ import annotations

import copy
import math
import torch
import torch.nn.functional as F
from pydantic import Field

from udaflow import distributed
from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method
from udaflow.pseudo_labels import PseudoLabelFilter, ema_update


def distribution_alignment(target_probs: torch.Tensor, source_probs: torch.Tensor) -> torch.Tensor:
    """(Bt, K) target probabilities re-weighted by mean(source) / mean(target) per class, rows renormalised."""
    ratio = source_probs.mean(0) / target_probs.mean(0).clamp_min(1e-6)  # (K,)
    aligned = target_probs * ratio  # (Bt, K)
    return aligned / aligned.sum(1, keepdim=True)


def relative_threshold(source_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """tau x the mean top-1 confidence on the (weak) source batch: a scalar threshold for target pseudo-labels."""
    return tau * source_probs.max(1).values.mean()


def unlabelled_weight(progress: float) -> float:
    """mu(p) = 1/2 - cos(min(pi, 2 pi p)) / 2: 0 at the start, 1 from half-way."""
    return 0.5 - math.cos(min(math.pi, 2.0 * math.pi * progress)) / 2.0


def adamatch_losses(
    source_weak: torch.Tensor, source_strong: torch.Tensor, labels: torch.Tensor,
    target_weak: torch.Tensor, target_strong: torch.Tensor, tau: float,
    denoise: PseudoLabelFilter | None = None, teacher_weak: torch.Tensor | None = None, target_probs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Logits (B, K) of the four views + source labels (B,) -> source CE, masked target CE, mask rate.

    `denoise` (optional): the shared pseudo-label filter; without it the mask is the plain relative threshold.
    `teacher_weak` (optional, (B, K)): a teacher's logits on the weak target view; they replace the student's
    for the pseudo-labels, and the student's weak view becomes the filter's second opinion.
    `target_probs` (optional, (Bt, K) over the global batch): the weak-view probabilities to read, already
    denoised (the neighbourhood consensus); they replace softmax of the weak view's (or teacher's) logits.
    """
    cls = 0.5 * (F.cross_entropy(source_weak, labels) + F.cross_entropy(source_strong, labels))
    with torch.no_grad():
        # batch statistics (threshold, class mix, filter) over the global batch: under torchrun every
        # rank gathers all rows, decides alike, and keeps its own rows' labels and mask
        p_s = distributed.gather(F.softmax(source_weak.float(), dim=1))
        reader = target_weak if teacher_weak is None else teacher_weak
        if target_probs is None:
            target_probs = distributed.gather(F.softmax(reader.float(), dim=1))
        p_t = distribution_alignment(target_probs, p_s)
        threshold = relative_threshold(p_s, tau)
        if denoise is None:
            confidence, pseudo_labels = p_t.max(1)  # (B,), (B,)
            mask = (confidence >= threshold).float()  # (B,)
        else:
            second = target_strong if teacher_weak is None else target_weak
            pseudo_labels, mask = denoise(p_t, threshold, second=distributed.gather(second.float()))
        pseudo_labels, mask = distributed.shard(pseudo_labels), distributed.shard(mask)
    unlabelled = (F.cross_entropy(target_strong, pseudo_labels, reduction="none") * mask).mean()
    return {"cls": cls, "unlabelled": unlabelled, "mask_rate": mask.mean()}


class AdaMatchConfig(MethodConfig):
    tau: float = Field(0.9, gt=0, le=1)  # relative confidence threshold (x the source's mean top-1 confidence)
    teacher_ema: float = Field(0.0, ge=0, lt=1)  # > 0: target pseudo-labels from an EMA teacher of the weights (decay per step)
    unlabelled_weight: float = Field(1.0, ge=0)  # weight of the target pseudo-label loss once ramped up
    logit_interpolation: bool = False  # the paper's second, source-only pass (BN statistics per domain): 1.5x the cost
    uratio: float = Field(1.0, gt=0, le=15)  # target images per source image; the 2B images of a view are split 1 : uratio
    weak_target_grad: bool = True  # False: the weak target view (read for pseudo-labels only) runs forward alone, without a backward


@register_method("adamatch")
class AdaMatch(Method):
    Config = AdaMatchConfig
    uses_pseudo_labels = True
    draws_own_batches = True  # four views of one draw, not the engine's one view per domain

    def __init__(self, classifier, config):
        super().__init__(classifier, config)
        if config.teacher_ema > 0:
            self.teacher = copy.deepcopy(classifier).eval()  # frozen: its parameters never reach the optimiser
            self.teacher.requires_grad_(False)

    def batch_sizes(self, batch_size: int) -> tuple[int, int]:
        """(Bs, Bt): source and target images per view; 2B split 1 : uratio (B, B at uratio 1)."""
        source = max(1, round(2 * batch_size / (1.0 + self.config.uratio)))
        return source, max(1, 2 * batch_size - source)

    def images_per_step(self, batch_size: int, uses_target: bool) -> int:
        """Forward + backward images a step: 2Bs + 2Bt (+ 2Bs for logit interpolation); a weak target
        view without backward counts a third (a forward is about a third of forward + backward)."""
        n_s, n_t = self.batch_sizes(batch_size)
        weak_target = n_t if self.config.weak_target_grad else n_t // 3
        return 2 * n_s * (2 if self.config.logit_interpolation else 1) + n_t + weak_target

    def forward(self, classifier, batch, ctx):
        n_s, n_t = self.batch_sizes(ctx.batch_size)
        s_idx = torch.randint(len(ctx.source_labels), (n_s,), generator=ctx.generator)
        t_idx = torch.randint(ctx.num_target, (n_t,), generator=ctx.generator)
        source = torch.cat([ctx.source_inputs(s_idx, "weak"), ctx.source_inputs(s_idx, "strong")])  # (2Bs, 3, H, W)
        target_weak, target_strong = ctx.target_inputs(t_idx, "weak"), ctx.target_inputs(t_idx, "strong")  # (Bt, 3, H, W) each
        labels = distributed.shard(ctx.source_labels[s_idx]).to(ctx.device)
        b = len(labels)  # this rank's source rows per view (all Bs in one process)
        teacher_weak = None
        if self.config.teacher_ema > 0:
            ema_update(self.teacher, classifier, self.config.teacher_ema)  # the weights after the previous step
            with torch.no_grad():
                teacher_weak = self.teacher.eval()(target_weak)  # (Bt, K); eval: BN running statistics
        if self.config.weak_target_grad:
            features = classifier.features(torch.cat([source, target_weak, target_strong]))  # (2Bs + 2Bt, D)
            logits = classifier.head(features)  # (2Bs + 2Bt, K): classifier(x), with the features kept
            source_logits, target_logits = logits[: 2 * b], logits[2 * b :].chunk(2)
            weak_features = features[2 * b :].chunk(2)[0]  # (Bt, D)
        else:  # the weak view only reads pseudo-labels: its backward would be wasted work
            training = classifier.training
            with torch.no_grad():  # eval mode: BatchNorm's running (mixed-domain) statistics, as the evaluation reads it
                weak_features = classifier.eval().features(target_weak)  # (Bt, D)
                weak_logits = classifier.head(weak_features)  # (Bt, K)
            classifier.train(training)
            logits = classifier(torch.cat([source, target_strong]))  # (2Bs + Bt, K)
            source_logits, target_logits = logits[: 2 * b], (weak_logits, logits[2 * b :])
        if self.config.logit_interpolation:
            alone = classifier(source)  # (2Bs, K)
            mix = torch.rand((2, n_s, source_logits.shape[1]), generator=ctx.generator)  # (2, Bs, K) over the global batch
            mix = distributed.shard(mix.transpose(0, 1)).transpose(0, 1).reshape(source_logits.shape).to(ctx.device)  # (2b, K)
            source_logits = mix * source_logits + (1.0 - mix) * alone
        denoise = getattr(self, "pseudo_labels", None)
        target_probs = None
        if denoise is not None and denoise.bank is not None:  # neighbourhood consensus (pseudo_labels.py)
            with torch.no_grad():
                if not denoise.bank.filled:  # the first step: one pass over the pool
                    denoise.bank.fill(*ctx.embed_target())
                reader = target_logits[0] if teacher_weak is None else teacher_weak
                target_probs = denoise.bank.vote(  # over the global batch: t_idx is the whole draw
                    distributed.gather(weak_features.detach().float()), distributed.gather(F.softmax(reader.float(), dim=1)), t_idx)
        losses = adamatch_losses(*source_logits.chunk(2), labels, *target_logits, self.config.tau, denoise, teacher_weak, target_probs)
        mu = self.config.unlabelled_weight * unlabelled_weight(ctx.progress)
        return {"loss": losses["cls"] + mu * losses["unlabelled"], **losses}

    def extra_state(self) -> dict:
        bank = getattr(getattr(self, "pseudo_labels", None), "bank", None)
        return {"neighbour_bank": bank.state()} if bank is not None else {}

    def load_extra_state(self, state: dict) -> None:
        bank = getattr(getattr(self, "pseudo_labels", None), "bank", None)
        if bank is not None:
            bank.load_state(state.get("neighbour_bank", {}))
