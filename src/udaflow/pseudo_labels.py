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
* neighbourhood consensus (`neighbours` = k > 0, `NeighbourBank`): before thresholding, an image's
  prediction is averaged with those of its k nearest target images in feature space, read from a
  memory of the whole target pool (neighbourhood aggregation with a memory bank: ATDOC, Liang, Hu &
  Feng, CVPR 2021; NRC, Yang et al., NeurIPS 2021). With f_i the L2-normalised feature of target
  image i and (F, P) the bank's features (N, D) and probabilities (N, K),

      F[i], P[i] <- f_i, p_i                               this step's images overwrite their rows
      N_k(i)     = the k rows j != i with the largest f_i . F[j]
      p~_i       = (p_i + mean_{j in N_k(i)} P[j]) / 2     (B, K): what the threshold and labels read

  An isolated wrong prediction is outvoted by its neighbours; a cluster's label is kept.

`class_top_fraction` is the same class-balanced idea over a whole target set (cdtrans's curriculum).

Example:
    >>> f = PseudoLabelFilter(3, balance=True, agreement=False)
    >>> probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    >>> labels, mask = f(probs, threshold=0.75)  # labels (3,), mask (3,) float in {0, 1}
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class NeighbourBank:
    """A memory of the target pool, L2-normalised features (N, D) and probabilities (N, K), for the
    neighbourhood consensus (module docstring). `fill` once from a pass over the pool; `vote` writes
    a batch's rows and returns its predictions averaged with their k nearest neighbours'. Its tensors
    are plain attributes: a method checkpoints them through `state` / `load_state` (extra_state)."""

    def __init__(self, k: int):
        self.k = k
        self.features: torch.Tensor | None = None  # (N, D)
        self.probs: torch.Tensor | None = None  # (N, K)

    @property
    def filled(self) -> bool:
        return self.features is not None

    def fill(self, features: torch.Tensor, logits: torch.Tensor) -> None:
        """Features (N, D) and logits (N, K) of every target image, in the pool's order."""
        self.features = F.normalize(features.detach().float(), dim=1)
        self.probs = F.softmax(logits.detach().float(), dim=1)

    @torch.no_grad()
    def vote(self, features: torch.Tensor, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """features (B, D), probs (B, K) of target images index (B,) -> (B, K) neighbourhood-averaged probs."""
        if not self.filled:
            raise RuntimeError("NeighbourBank.vote before fill: pass the target pool's features and logits first")
        device = probs.device
        if self.features.device != device:  # filled from embed (on the CPU) or a checkpoint: the memory moves to the batch's device once
            self.features, self.probs = self.features.to(device), self.probs.to(device)
        with torch.autocast(device.type, enabled=False):  # similarities in fp32 under bf16 training too
            f = F.normalize(features.float(), dim=1)  # (B, D)
            p, index = probs.float(), index.to(device)
            # an image drawn twice in a batch: its last row is written, as a loop would (every duplicate writes
            # that row's values, so the order of the writes does not matter and no mask's size is read)
            last = _last_occurrence_rows(index)
            self.features[index], self.probs[index] = f[last], p[last]
            if len(self.features) < 2:  # a pool of one image has no neighbour
                return p
            sim = f @ self.features.T  # (B, N) cosine similarities
            sim[torch.arange(len(index), device=device), index] = float("-inf")  # an image is not its own neighbour
            neighbours = sim.topk(min(self.k, sim.shape[1] - 1), dim=1).indices  # (B, k)
            return 0.5 * (p + self.probs[neighbours].mean(1))  # (B, K), rows sum to 1

    def state(self) -> dict[str, torch.Tensor]:
        return {} if not self.filled else {"features": self.features.cpu(), "probs": self.probs.cpu()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.features, self.probs = state["features"].float(), state["probs"].float()


def _last_occurrence_rows(index: torch.Tensor) -> torch.Tensor:
    """index (B,) -> (B,): for each row, the row of the last occurrence of its value in index."""
    order = torch.argsort(index, stable=True)  # equal values keep their batch order: a value's last row sorts last
    return order[torch.searchsorted(index[order], index, right=True) - 1]


class PseudoLabelFilter(nn.Module):
    """probs (B, K) [+ a second opinion (B, K) or (B,)] -> pseudo-labels (B,) and a 0/1 mask (B,).
    With `neighbours` > 0 it also holds the `bank` a method reads the neighbourhood consensus from."""

    def __init__(self, num_classes: int, balance: bool = True, agreement: bool = False, momentum: float = 0.99, neighbours: int = 0):
        super().__init__()
        self.balance, self.agreement, self.momentum = balance, agreement, momentum
        self.register_buffer("status", torch.full((num_classes,), 1.0 / num_classes))  # sigma_k, uniform at start
        self.bank = NeighbourBank(neighbours) if neighbours > 0 else None

    @torch.no_grad()
    def forward(self, probs: torch.Tensor, threshold: float | torch.Tensor, second: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        confidence, labels = probs.max(1)  # (B,), (B,)
        if self.balance:
            # running share of confident predictions per class, when any is confident; counted without
            # indexing by the mask, whose size the host would have to wait for on a GPU
            classes = torch.arange(len(self.status), device=labels.device)
            counts = ((labels.unsqueeze(1) == classes) & (confidence >= threshold).unsqueeze(1)).to(self.status).sum(0)  # (K,)
            confident = counts.sum()
            updated = self.status.mul(self.momentum).add_(counts / confident.clamp_min(1.0), alpha=1.0 - self.momentum)
            self.status.copy_(torch.where(confident > 0, updated, self.status))
            cut = class_thresholds(self.status, threshold).to(confidence)[labels]  # (B,)
        else:
            cut = torch.as_tensor(threshold, dtype=confidence.dtype, device=confidence.device)
        mask = confidence >= cut
        if self.agreement and second is not None:
            other = second.argmax(1) if second.dim() == 2 else second
            mask = mask & (other == labels)
        return labels, mask.float()
