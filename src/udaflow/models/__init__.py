"""Backbones (timm), the classifier head and the shared adaptation blocks."""

from udaflow.models.backbone import BackboneError, create_backbone
from udaflow.models.heads import Classifier, ImageClassifier


def build_classifier(backbone: str, num_classes: int, pretrained: str | None = None, **kwargs) -> Classifier:
    """Backbone + head; the classifier carries the normalisation its backbone expects (input_mean, input_std)."""
    from udaflow.models.preprocess import spec_of

    net = create_backbone(backbone, pretrained=pretrained, **kwargs)
    spec = spec_of(net, 0, backbone)
    return Classifier(net, num_classes, spec.mean, spec.std)


__all__ = ["BackboneError", "Classifier", "ImageClassifier", "build_classifier", "create_backbone"]
