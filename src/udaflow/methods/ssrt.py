"""ssrt: safe self-refinement (Sun, Lu, Zhang, Ling, "Safe Self-Refinement for Transformer-based
Domain Adaptation", CVPR 2022).

DANN's adversarial alignment plus a consistency loss between each target image's prediction and
the prediction of a perturbed copy of its tokens, guarded by "safe training":

    l ~ U(layers)                                   a random block (0 = the tokens entering block 0)
    z'_t = z_t + alpha_r * (z_t[rev] - z_t).detach()    target tokens at block l moved towards another
                                                        target image's (the batch reversed)
    p = softmax(g(f(z_t))),  p' = softmax(g(f(z'_t)))   (B, K) clean and perturbed predictions
    L_sr = sum_i m_i KL(p_i || p'_i) / sum_i m_i,  m_i = [max p_i > eps]   (or p and p' swapped, p = 1/2)
    L = CE(g(f(x_s)), y_s) + trade_off * L_adv + w_r * L_sr
    alpha_r = alpha * r,  w_r = w * r,  r = sin(pi/2 * min(1, (t - t0) / T))  ramps in after every (re)start t0

Safe training: every T steps the weights are snapshot. The label-free collapse signal is the
diversity of target predictions (distinct predicted classes per batch); when its mean over any
of the last period's 2^j sub-intervals (j = 0..L) drops by more than one class against the
sub-interval before, the next step rolls the model back to the snapshot, restarts the ramp
(softer perturbation and weight) and, after a second rollback within one period, doubles T.

Example:
    >>> p_logits, q_logits = torch.randn(8, 10), torch.randn(8, 10)
    >>> masked_kl(p_logits, q_logits, eps=0.4)  # scalar, mean KL over confident rows
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method
from udaflow.methods.dann import domain_adversarial_loss, grl_coeff
from udaflow.models.cross_attention import check_vit
from udaflow.models.heads import DomainDiscriminator


def masked_kl(reference_logits: torch.Tensor, other_logits: torch.Tensor, eps: float) -> torch.Tensor:
    """sum_i m_i KL(p_i || q_i) / sum_i m_i with p = softmax(reference), q = softmax(other), m_i = [max p_i > eps]; (B, K) each."""
    p = F.softmax(reference_logits, dim=1)
    kl = (p * (F.log_softmax(reference_logits, dim=1) - F.log_softmax(other_logits, dim=1))).sum(1)  # (B,)
    mask = (p.detach().max(1).values > eps).float()
    return (kl * mask).sum() / (mask.sum() + 1e-6)


def perturbed_features(backbone, source: torch.Tensor, target: torch.Tensor, layer: int, alpha: float) -> tuple[torch.Tensor, ...]:
    """Pooled features (B, D) of source, target and perturbed target: the target tokens entering block
    `layer` are moved by alpha towards the tokens of the batch's reversed order (a constant offset)."""
    check_vit(backbone)
    tokens = backbone.patch_embed(torch.cat([source, target]))  # (2B, N, D): BN sees both domains
    tokens = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(tokens)))
    b = source.shape[0]
    for i, blk in enumerate(backbone.blocks):
        if i == layer:
            t = tokens[b : 2 * b]  # (B, N, D)
            tokens = torch.cat([tokens, t + (t.flip(0) - t).detach() * alpha])  # (3B, N, D)
        tokens = blk(tokens)
    features = backbone.forward_head(backbone.norm(tokens), pre_logits=True)  # (3B, D)
    return features[:b], features[b : 2 * b], features[2 * b :]


def diversity_dropped(diversities: list[float], previous: list[float] | None, levels: int, margin: float = 1.0) -> bool:
    """Did the mean diversity fall by more than `margin` between consecutive sub-intervals, at any of
    the 2^0 .. 2^levels splits of the period (the previous period's last sub-interval leading)?"""
    for level in range(levels + 1):
        chunks = [float(c.mean()) for c in np.array_split(np.asarray(diversities, dtype=float), 2**level) if len(c)]
        if previous:
            chunks.insert(0, float(np.array_split(np.asarray(previous, dtype=float), 2**level)[-1].mean()))
        if any(b < a - margin for a, b in zip(chunks, chunks[1:])):
            return True
    return False


class SsrtConfig(MethodConfig):
    trade_off: float = Field(1.0, ge=0)  # weight of the adversarial loss
    hidden: int = Field(256, ge=1)  # discriminator width
    sr_weight: float = Field(0.2, ge=0)  # weight of the self-refinement (consistency) loss, once ramped in
    alpha: float = Field(0.3, ge=0, le=1)  # perturbation strength towards another target image's tokens
    layers: tuple[Annotated[int, Field(ge=0)], ...] = ()  # blocks whose input tokens may be perturbed; () = every block
    eps: float = Field(0.4, ge=0, le=1)  # confidence above which a prediction is refined
    period: int = Field(200, ge=1)  # T: steps between snapshots, and the ramp length
    levels: int = Field(4, ge=0)  # L: sub-interval splits of a period checked for a diversity drop
    label_smoothing: float = Field(0.1, ge=0, le=1)


@register_method("ssrt")
class Ssrt(Method):
    Config = SsrtConfig

    def __init__(self, classifier, config: SsrtConfig):
        super().__init__(classifier, config)
        check_vit(classifier.backbone)
        depth = len(classifier.backbone.blocks)
        self.layers = tuple(int(layer) for layer in config.layers) or tuple(range(depth))
        bad = [layer for layer in self.layers if not 0 <= layer < depth]
        if bad:
            from udaflow.config import ConfigError

            raise ConfigError(f"methods.ssrt.layers: {bad} outside the backbone's blocks 0..{depth - 1}")
        self.discriminator = DomainDiscriminator(classifier.num_features, config.hidden)
        self.safety: dict[str, Any] = {"period": config.period, "ramp_start": 0, "last_rollback": -(10**9), "rollbacks": 0,
                                       "restore": False, "snapshot": None, "diversities": [], "previous": None}

    def ramp(self, step: int) -> float:
        s = self.safety
        return math.sin(math.pi / 2 * min(1.0, max(0, step - s["ramp_start"]) / s["period"]))

    def _guard(self, classifier, step: int) -> None:
        """Roll back if the last period collapsed; snapshot at each period start."""
        s = self.safety
        if s["restore"] and s["snapshot"] is not None:
            classifier.load_state_dict(s["snapshot"]["classifier"])
            self.discriminator.load_state_dict(s["snapshot"]["discriminator"])
            s.update(restore=False, last_rollback=step, rollbacks=s["rollbacks"] + 1)
        if step % s["period"] == 0:
            s["snapshot"] = {
                "classifier": copy.deepcopy({k: v.detach().cpu() for k, v in classifier.state_dict().items()}),
                "discriminator": copy.deepcopy({k: v.detach().cpu() for k, v in self.discriminator.state_dict().items()}),
            }
            s["diversities"] = []

    def _watch(self, target_logits: torch.Tensor, step: int) -> None:
        """Record this batch's prediction diversity; at a period's end, flag a collapse for rollback."""
        s = self.safety
        s["diversities"].append(float(target_logits.argmax(1).unique().numel()))
        if (step + 1) % s["period"] == 0 and step > 0:
            if self.ramp(step) > 0.1 and diversity_dropped(s["diversities"], s["previous"], self.config.levels):
                if step - s["last_rollback"] <= s["period"]:
                    s["period"] *= 2  # collapsing again soon after a rollback: ramp in more slowly
                s.update(restore=True, ramp_start=step + 1)
            else:
                s["previous"] = s["diversities"]

    def forward(self, classifier, batch, ctx):
        self._guard(classifier, ctx.step)
        r = self.ramp(ctx.step)
        layer = self.layers[int(torch.randint(len(self.layers), (1,), generator=ctx.generator))]
        f_s, f_t, f_p = perturbed_features(classifier.backbone, batch.source, batch.target, layer, self.config.alpha * r)
        cls = F.cross_entropy(classifier.head(f_s), batch.source_labels, label_smoothing=self.config.label_smoothing)
        adv = domain_adversarial_loss(self.discriminator, f_s, f_t, grl_coeff(ctx.progress))
        clean, perturbed = classifier.head(f_t), classifier.head(f_p)  # (B, K) each
        if float(torch.rand(1, generator=ctx.generator)) <= 0.5:
            sr = masked_kl(clean, perturbed, self.config.eps)
        else:
            sr = masked_kl(perturbed, clean, self.config.eps)
        self._watch(clean.detach(), ctx.step)
        loss = cls + self.config.trade_off * adv + self.config.sr_weight * r * sr
        return {"loss": loss, "cls": cls, "adv": adv, "sr": sr, "ramp": torch.tensor(r), "rollbacks": torch.tensor(float(self.safety["rollbacks"]))}

    def images_per_step(self, batch_size: int, uses_target: bool) -> int:
        return batch_size * 3  # source, target and the perturbed target pass the blocks

    def extra_state(self) -> dict[str, Any]:
        return copy.deepcopy(self.safety)

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.safety = copy.deepcopy(state)
