"""mcc: minimum class confusion (Jin et al., "Minimum Class Confusion for Versatile Domain
Adaptation", ECCV 2020).

    P = softmax(g(f(x_t)) / T)                          (B, K), temperature-scaled
    w_i = B (1 + exp(-H(P_i))) / sum_j (1 + exp(-H(P_j)))   (certainty weights)
    C = P^T diag(w) P, rows normalised to sum 1         (K, K) class confusion
    L_mcc = (sum(C) - trace(C)) / K
    L = CE(g_s, y_s) + trade_off * L_mcc
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method


def class_confusion_loss(target_logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """(B, K) target logits -> scalar minimum-class-confusion loss."""
    b, k = target_logits.shape
    probs = F.softmax(target_logits / temperature, dim=1)  # (B, K)
    ent = -(probs * torch.log(probs + 1e-5)).sum(dim=1)  # (B,)
    w = 1.0 + torch.exp(-ent)
    w = (b * w / w.sum()).detach()  # (B,)
    confusion = (probs * w.unsqueeze(1)).t() @ probs  # (K, K)
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / k


class MccConfig(MethodConfig):
    trade_off: float = Field(1.0, ge=0)
    temperature: float = Field(2.5, gt=0)
    label_smoothing: float = Field(0.1, ge=0, le=1)


@register_method("mcc")
class Mcc(Method):
    Config = MccConfig

    def forward(self, classifier, batch, ctx):
        logits = classifier(torch.cat([batch.source, batch.target]))  # (2B, K)
        b = len(batch.source)
        cls = F.cross_entropy(logits[:b], batch.source_labels, label_smoothing=self.config.label_smoothing)
        mcc = class_confusion_loss(logits[b:], self.config.temperature)
        return {"loss": cls + self.config.trade_off * mcc, "cls": cls, "mcc": mcc}
