"""dann: domain-adversarial training (Ganin et al., "Domain-Adversarial Training of Neural
Networks", JMLR 2016).

    L = CE(g(f(x_s)), y_s) + trade_off * [BCE(D(R_l(f(x_s))), 1) + BCE(D(R_l(f(x_t))), 0)] / 2

R_l is gradient reversal with coefficient l(p) = 2 / (1 + exp(-10 p)) - 1 rising from 0 to 1 over
training progress p, so the discriminator D learns to tell domains apart while the features f learn
to fool it.

Example:
    >>> d = DomainDiscriminator(128); f_s, f_t = torch.randn(8, 128), torch.randn(8, 128)
    >>> domain_adversarial_loss(d, f_s, f_t, coeff=1.0)  # scalar
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from pydantic import Field

from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method
from udaflow.models.heads import DomainDiscriminator, grad_reverse


def grl_coeff(progress: float, alpha: float = 10.0) -> float:
    return 2.0 / (1.0 + math.exp(-alpha * progress)) - 1.0


def domain_adversarial_loss(
    discriminator: torch.nn.Module,
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    coeff: float = 1.0,
    source_weight: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean BCE of the discriminator on reversed features: source -> 1, target -> 0.

    source_features (Bs, D), target_features (Bt, D); optional per-sample weights (Bs,), (Bt,).
    """
    feats = grad_reverse(torch.cat([source_features, target_features]), coeff)  # (Bs+Bt, D)
    logits = discriminator(feats).squeeze(1)  # (Bs+Bt,)
    s_logit, t_logit = logits[: len(source_features)], logits[len(source_features) :]
    s_loss = F.binary_cross_entropy_with_logits(s_logit, torch.ones_like(s_logit), weight=source_weight)
    t_loss = F.binary_cross_entropy_with_logits(t_logit, torch.zeros_like(t_logit), weight=target_weight)
    return 0.5 * (s_loss + t_loss)


class DannConfig(MethodConfig):
    trade_off: float = Field(1.0, ge=0)  # weight of the adversarial loss
    hidden: int = Field(256, ge=1)  # discriminator width
    label_smoothing: float = Field(0.1, ge=0, le=1)


@register_method("dann")
class Dann(Method):
    Config = DannConfig

    def __init__(self, classifier, config: DannConfig):
        super().__init__(classifier, config)
        self.discriminator = DomainDiscriminator(classifier.num_features, config.hidden)

    def forward(self, classifier, batch, ctx):
        feats = classifier.features(torch.cat([batch.source, batch.target]))  # (2B, D)
        f_s, f_t = feats.chunk(2)
        cls = F.cross_entropy(classifier.head(f_s), batch.source_labels, label_smoothing=self.config.label_smoothing)
        adv = domain_adversarial_loss(self.discriminator, f_s, f_t, grl_coeff(ctx.progress))
        return {"loss": cls + self.config.trade_off * adv, "cls": cls, "adv": adv}
