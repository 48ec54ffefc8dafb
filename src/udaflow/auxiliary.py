"""Self-supervised auxiliary task any method can switch on: rotation prediction on target images
(Gidaris et al., ICLR 2018; for domain adaptation: Sun et al., "Unsupervised Domain Adaptation
through Self-Supervision", 2019).

Each adaptation step rotates B target images by k x 90 degrees (k ~ U{0..3}) and a small head on the
shared features predicts k:

    L_rot = CE(h(f(rot_k(x_t))), k)          h: (B, D) -> (B, 4)
    L = L_method + rotation_weight * L_rot   (train.rotation_weight; 0 = off)

Predicting orientation needs the shapes of the target's objects, so the features learn the target
domain's structure without its labels. Digits are not rotation-symmetric except 0/1/8 in part,
which only caps the auxiliary accuracy, not its use.

Example:
    >>> head = RotationHead(96); x = torch.rand(8, 3, 32, 32); k = torch.randint(4, (8,))
    >>> rotate_quarters(x, k).shape  # (8, 3, 32, 32)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RotationHead(nn.Linear):
    """(B, D) features -> (B, 4) logits over rotations 0, 90, 180, 270 degrees."""

    def __init__(self, in_features: int):
        super().__init__(in_features, 4)


def rotate_quarters(images: torch.Tensor, quarters: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) square images, (B,) ints in 0..3 -> each image rotated by quarters[i] x 90 degrees (counter-clockwise)."""
    out = images.clone()
    for k in range(1, 4):
        chosen = quarters == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


def rotation_loss(classifier: nn.Module, head: RotationHead, images: torch.Tensor, quarters: torch.Tensor) -> torch.Tensor:
    """Rotate each image (B, 3, H, W) by its quarter turns (B,) in 0..3 and score the head's guess."""
    rotated = rotate_quarters(images, quarters.to(images.device))
    return F.cross_entropy(head(classifier.features(rotated)), quarters.to(images.device))
