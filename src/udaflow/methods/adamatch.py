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
        (`source_views: strong`: CE(z_s^s, y) alone, the weak source view forward only; `weak`: CE(z_s^w, y) alone)
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

`source_views: strong` does for the source what `weak_target_grad: false` does for the target: the weak
source view is read for p_s alone (the threshold and the class mix), so it runs forward only, in eval mode,
in one pass with the weak target view, and the source term is the strong view's cross-entropy. The batch
with a backward is then [x_s^s, x_t^s] (2B rows instead of 3B). `weak` drops the strong source view.
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
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

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
    source_views: str = "both",
) -> dict[str, torch.Tensor]:
    """Logits (B, K) of the four views + source labels (B,) -> source CE, masked target CE, mask rate.

    `denoise` (optional): the shared pseudo-label filter; without it the mask is the plain relative threshold.
    `teacher_weak` (optional, (B, K)): a teacher's logits on the weak target view; they replace the student's
    for the pseudo-labels, and the student's weak view becomes the filter's second opinion.
    `target_probs` (optional, (Bt, K) over the global batch): the weak-view probabilities to read, already
    denoised (the neighbourhood consensus); they replace softmax of the weak view's (or teacher's) logits.
    `source_views`: the source views the cross-entropy averages, both | weak | strong (p_s always reads the
    weak view; `source_strong` may be None for weak).
    """
    views = {"both": (source_weak, source_strong), "weak": (source_weak,), "strong": (source_strong,)}[source_views]
    cls = sum(F.cross_entropy(v, labels) for v in views) / len(views)
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
    # the source views the cross-entropy reads: both (the paper); strong (the weak source view, read for the threshold
    # and class mix only, runs forward alone in eval mode); weak (the strong source view dropped)
    source_views: Literal["both", "weak", "strong"] = "both"

    @model_validator(mode="after")
    def _one_source_pass(self):
        if self.logit_interpolation and self.source_views != "both":
            raise ValueError("logit_interpolation mixes both source views' logits: it needs source_views 'both'")
        return self


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
        source = {"both": 2 * n_s, "weak": n_s, "strong": n_s + n_s // 3}[self.config.source_views]
        return source * (2 if self.config.logit_interpolation else 1) + n_t + weak_target

    def forward(self, classifier, batch, ctx):
        n_s, n_t = self.batch_sizes(ctx.batch_size)
        s_idx = torch.randint(len(ctx.source_labels), (n_s,), generator=ctx.generator)
        t_idx = torch.randint(ctx.num_target, (n_t,), generator=ctx.generator)
        views = self.config.source_views
        source_weak = ctx.source_inputs(s_idx, "weak")  # (Bs, 3, H, W)
        source_strong = ctx.source_inputs(s_idx, "strong") if views != "weak" else None
        source = torch.cat([source_weak, source_strong]) if views == "both" else source_strong if views == "strong" else source_weak
        target_weak, target_strong = ctx.target_inputs(t_idx, "weak"), ctx.target_inputs(t_idx, "strong")  # (Bt, 3, H, W) each
        labels = distributed.shard(ctx.source_labels[s_idx]).to(ctx.device)
        b = len(labels)  # this rank's source rows per view (all Bs in one process)
        rows = b * (2 if views == "both" else 1)  # the source rows of the batch with a backward
        teacher_weak = None
        if self.config.teacher_ema > 0:
            ema_update(self.teacher, classifier, self.config.teacher_ema)  # the weights after the previous step
            with torch.no_grad():
                teacher_weak = self.teacher.eval()(target_weak)  # (Bt, K); eval: BN running statistics
        # the weak views read only p_s and pseudo-labels: a view without backward runs forward alone, under no_grad,
        # in eval mode (BatchNorm's running, mixed-domain statistics, as the evaluation reads the model)
        forward_only = ([source_weak] if views == "strong" else []) + ([] if self.config.weak_target_grad else [target_weak])
        if forward_only:
            training = classifier.training
            with torch.no_grad():
                alone_features = classifier.eval().features(torch.cat(forward_only))  # (Bs and/or Bt, D)
                alone_logits = classifier.head(alone_features)
            classifier.train(training)
        if self.config.weak_target_grad:
            features = classifier.features(torch.cat([source, target_weak, target_strong]))  # (rows + 2Bt, D)
            logits = classifier.head(features)  # (rows + 2Bt, K): classifier(x), with the features kept
            source_logits, target_logits = logits[:rows], logits[rows:].chunk(2)
            weak_features = features[rows:].chunk(2)[0]  # (Bt, D)
        else:
            logits = classifier(torch.cat([source, target_strong]))  # (rows + Bt, K)
            weak_features = alone_features[-len(target_weak):]  # (Bt, D)
            source_logits, target_logits = logits[:rows], (alone_logits[-len(target_weak):], logits[rows:])
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
        weak_source_logits = alone_logits[:b] if views == "strong" else source_logits[:b]  # (b, K), the view p_s reads
        strong_source_logits = source_logits[b:] if views == "both" else source_logits if views == "strong" else None
        losses = adamatch_losses(weak_source_logits, strong_source_logits, labels, *target_logits, self.config.tau, denoise, teacher_weak,
                                 target_probs, views)
        mu = self.config.unlabelled_weight * unlabelled_weight(ctx.progress)
        return {"loss": losses["cls"] + mu * losses["unlabelled"], **losses}

    def extra_state(self) -> dict:
        bank = getattr(getattr(self, "pseudo_labels", None), "bank", None)
        return {"neighbour_bank": bank.state()} if bank is not None else {}

    def load_extra_state(self, state: dict) -> None:
        bank = getattr(getattr(self, "pseudo_labels", None), "bank", None)
        if bank is not None:
            bank.load_state(state.get("neighbour_bank", {}))
