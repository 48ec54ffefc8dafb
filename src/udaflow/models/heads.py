"""Classifier = backbone + linear head; the shared adversarial blocks (gradient reversal,
domain discriminator) used by dann and cdan."""

from __future__ import annotations

import torch
import torch.nn as nn


class Classifier(nn.Module):
    """backbone (pooled features, (B, D)) -> linear head -> logits (B, K). `forward` always returns logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, input_mean: float | tuple[float, ...] = 0.5, input_std: float | tuple[float, ...] = 0.5):
        super().__init__()
        # how uint8 pixels become inputs: (x / 255 - mean) / std (data.transforms.to_input); not weights
        self.input_mean, self.input_std = input_mean, input_std
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, K)


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -coeff backward (Ganin & Lempitsky 2015)."""
    return _GradientReverse.apply(x, coeff)


class DomainDiscriminator(nn.Sequential):
    """MLP (B, in_features) -> (B, 1) logit that the input came from the source domain."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )


class ImageClassifier(nn.Module):
    """What gets registered: RGB images in [0, 1], (B, 3, H, W) float32 -> logits (B, K).

    Carries its own normalisation and class names, so a user of `mlflow.pytorch.load_model`
    needs nothing from udaflow's data code to call it.
    """

    def __init__(self, classifier: Classifier, classes: tuple[str, ...], mean: float | tuple[float, ...] | None = None,
                 std: float | tuple[float, ...] | None = None):
        super().__init__()
        self.classifier = classifier
        self.classes = list(classes)
        mean = classifier.input_mean if mean is None else mean
        std = classifier.input_std if std is None else std
        # one value, or one per channel (a timm backbone's pretrained normalisation)
        self.register_buffer("mean", torch.tensor(mean) if isinstance(mean, (int, float)) else torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std) if isinstance(std, (int, float)) else torch.tensor(std).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier((images - self.mean) / self.std)
