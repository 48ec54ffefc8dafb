"""source_only: supervised cross-entropy on labelled source images; the lower bound.

    L = CE(g(f(x_s)), y_s)
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method


class SourceOnlyConfig(MethodConfig):
    label_smoothing: float = Field(0.1, ge=0, le=1)  # on the source cross-entropy


@register_method("source_only")
class SourceOnly(Method):
    Config = SourceOnlyConfig
    uses_target = False

    def forward(self, classifier, batch, ctx):
        cls = F.cross_entropy(classifier(batch.source), batch.source_labels, label_smoothing=self.config.label_smoothing)
        return {"loss": cls, "cls": cls}
