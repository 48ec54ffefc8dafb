"""oracle: supervised on TARGET labels; the upper bound. Benchmark only: never a registered candidate.

    L = CE(g(f(x_t)), y_t)

The engine feeds it labelled target-train images in the source slot of the batch: the caller
(bench) builds that data explicitly through `load_oracle_data`, the one door to target labels.
Like every adaptation method it trains with the self-supervised rotation task on target images,
here on the same target-train images (`experiment.train_oracle`): the whole loss is

    L = CE(g(f(x_t)), y_t) + train.rotation_weight * CE(r(f(rot_q(x_t'))), q),  q ~ U{0, 1, 2, 3}
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from udaflow.config import MethodConfig
from udaflow.methods import register_method
from udaflow.methods.base import Method


class OracleConfig(MethodConfig):
    label_smoothing: float = Field(0.1, ge=0, le=1)


@register_method("oracle")
class Oracle(Method):
    Config = OracleConfig
    uses_target = False
    uses_target_labels = True

    def forward(self, classifier, batch, ctx):
        cls = F.cross_entropy(classifier(batch.source), batch.source_labels, label_smoothing=self.config.label_smoothing)
        return {"loss": cls, "cls": cls}
