"""Pseudo-label denoising shared by every method that trains on its own target predictions
(adamatch, ssrt's confident consistency, cdtrans's pairs). Two label-free filters, each switched
in params.yaml under `train.pseudo_labels`:

* class-balanced selection (`balance`): a confidence threshold per class, scaled by how well the
  model has learnt that class so far (FlexMatch, Zhang et al., NeurIPS 2021; the class-balanced
  self-training of CBST, Zou et al., ECCV 2018, keeps a per-class share for the same reason). With
  sigma_k a running share of confident predictions that fall in class k,

      beta_k = sigma_k / max_j sigma_j                   in (0, 1]
      c_k    = c * beta_k / (2 - beta_k)                 the global threshold c, lowered for lagging classes

  so a class the source model is unsure about is not drowned by the easy ones; `status` is a buffer
  (checkpointed with the method) updated with momentum from every batch's confident predictions.
* agreement (`agreement`): keep a pseudo-label only when a second opinion (another view, a teacher)
  has the same arg-max; disagreement is where pseudo-labels are most often wrong.

`class_top_fraction` is the same class-balanced idea over a whole target set (cdtrans's curriculum).

Example:
    >>> f = PseudoLabelFilter(3, balance=True, agreement=False)
    >>> probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    >>> labels, mask = f(probs, threshold=0.75)  # labels (3,), mask (3,) float in {0, 1}
"""

from __future__ import annotations

import torch
import torch.nn as nn


def class_thresholds(status: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """(K,) learning status (non-negative) + the global threshold -> (K,) per-class thresholds c_k."""
    beta = status / status.max().clamp_min(1e-12)  # (K,) in [0, 1]
    return threshold * beta / (2.0 - beta)


def class_top_fraction(labels: torch.Tensor, confidence: torch.Tensor, fraction: float, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `fraction` most confident items of each pseudo-class (at least one per class).

    labels / confidence (N,); candidates: indices to choose from (default all). Per-class quotas keep a
    class the model is unsure about from vanishing behind the confident ones.
    """
    items = torch.arange(len(labels)) if candidates is None else candidates
    if fraction >= 1.0 or len(items) == 0:
        return items
    kept = []
    for k in torch.unique(labels[items]):
        members = items[labels[items] == k]
        n = max(1, int(round(len(members) * fraction)))
        kept.append(members[torch.argsort(confidence[members], descending=True)[:n]])
    return torch.cat(kept)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, over float parameters and buffers; counters copied."""
    weights = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.is_floating_point():
            value.mul_(decay).add_(weights[name].detach().to(value.dtype), alpha=1.0 - decay)
        else:
            value.copy_(weights[name])


class PseudoLabelFilter(nn.Module):
    """probs (B, K) [+ a second opinion (B, K) or (B,)] -> pseudo-labels (B,) and a 0/1 mask (B,)."""

    def __init__(self, num_classes: int, balance: bool = True, agreement: bool = False, momentum: float = 0.99):
        super().__init__()
        self.balance, self.agreement, self.momentum = balance, agreement, momentum
        self.register_buffer("status", torch.full((num_classes,), 1.0 / num_classes))  # sigma_k, uniform at start

    @torch.no_grad()
    def forward(self, probs: torch.Tensor, threshold: float | torch.Tensor, second: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        confidence, labels = probs.max(1)  # (B,), (B,)
        if self.balance:
            confident = labels[confidence >= threshold]
            if len(confident):  # running share of confident predictions per class
                share = torch.bincount(confident, minlength=len(self.status)).float().to(self.status) / len(confident)
                self.status.mul_(self.momentum).add_(share, alpha=1.0 - self.momentum)
            cut = class_thresholds(self.status, threshold).to(confidence)[labels]  # (B,)
        else:
            cut = torch.as_tensor(threshold, dtype=confidence.dtype, device=confidence.device)
        mask = confidence >= cut
        if self.agreement and second is not None:
            other = second.argmax(1) if second.dim() == 2 else second
            mask = mask & (other == labels)
        return labels, mask.float()
