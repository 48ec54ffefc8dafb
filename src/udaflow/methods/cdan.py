"""cdan: conditional domain-adversarial training with entropy conditioning (Long et al.,
"Conditional Adversarial Domain Adaptation", NeurIPS 2018).

    h = f ⊗ softmax(g)                      (multilinear map, (B, D*K); predictions detached)
    w = 1 + exp(-H(softmax(g)))             (entropy conditioning, normalised to mean 1 per domain)
    L = CE(g_s, y_s) + trade_off * [w_s·BCE(D(R(h_s)), 1) + w_t·BCE(D(R(h_t)), 0)] / 2

Confident examples weigh more, so alignment follows the classes instead of the domain marginals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method
from udaflow.methods.dann import domain_adversarial_loss, grl_coeff
from udaflow.models.heads import DomainDiscriminator


def multilinear_map(features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(B, D) x (B, K) -> (B, K*D) outer product p ⊗ f per sample, class-major."""
    return torch.bmm(probs.unsqueeze(2), features.unsqueeze(1)).flatten(1)  # (B, K, D) -> (B, K*D)


def entropy_weights(probs: torch.Tensor) -> torch.Tensor:
    """1 + exp(-H(p)) per sample, normalised so the weights average to 1: (B, K) -> (B,)."""
    ent = -(probs * torch.log(probs + 1e-5)).sum(dim=1)
    w = 1.0 + torch.exp(-ent)
    return w / w.sum() * len(w)


class CdanConfig(MethodConfig):
    trade_off: float = Field(1.0, ge=0)
    hidden: int = Field(256, ge=1)
    entropy: bool = True  # entropy conditioning (CDAN+E)
    label_smoothing: float = Field(0.1, ge=0, le=1)


@register_method("cdan")
class Cdan(Method):
    Config = CdanConfig

    def __init__(self, classifier, config: CdanConfig):
        super().__init__(classifier, config)
        self.discriminator = DomainDiscriminator(classifier.num_features * classifier.num_classes, config.hidden)

    def forward(self, classifier, batch, ctx):
        feats = classifier.features(torch.cat([batch.source, batch.target]))  # (2B, D)
        logits = classifier.head(feats)  # (2B, K)
        b = len(batch.source)
        cls = F.cross_entropy(logits[:b], batch.source_labels, label_smoothing=self.config.label_smoothing)
        probs = F.softmax(logits, dim=1).detach()
        h = multilinear_map(feats, probs)  # (2B, D*K)
        w_s = w_t = None
        if self.config.entropy:
            w_s, w_t = entropy_weights(probs[:b]), entropy_weights(probs[b:])
        adv = domain_adversarial_loss(self.discriminator, h[:b], h[b:], grl_coeff(ctx.progress), w_s, w_t)
        return {"loss": cls + self.config.trade_off * adv, "cls": cls, "adv": adv}
