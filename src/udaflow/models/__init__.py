"""Backbones (timm), the classifier head and the shared adaptation blocks."""

from udaflow.models.backbone import BackboneError, create_backbone
from udaflow.models.heads import Classifier, ImageClassifier


def build_classifier(backbone: str, num_classes: int, pretrained: str | None = None, **kwargs) -> Classifier:
    return Classifier(create_backbone(backbone, pretrained=pretrained, **kwargs), num_classes)


__all__ = ["BackboneError", "Classifier", "ImageClassifier", "build_classifier", "create_backbone"]
