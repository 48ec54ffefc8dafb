"""What every method sees: a batch, a step context, and the Method base class.

A method owns its extra modules (discriminators...) and returns named losses; the engine owns
optimisers, schedules, AMP and checkpoints. No training loop lives in a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from udaflow.models.heads import Classifier


@dataclass
class Batch:
    source: torch.Tensor  # (B, 3, H, W) augmented, normalised source images
    source_labels: torch.Tensor  # (B,) class indices
    target: torch.Tensor | None  # (B, 3, H, W) augmented, normalised target images; no labels exist here
    target_index: torch.Tensor | None  # (B,) positions of those images in the unlabelled target set


@dataclass
class StepContext:
    step: int
    total_steps: int
    batch_size: int
    generator: torch.Generator  # CPU generator for any sampling a method does (seeded, checkpointed)
    device: torch.device
    # (indices, view="default") -> augmented source images (B, 3, H, W); views: weak | default | strong
    source_inputs: Callable[..., torch.Tensor]
    target_inputs: Callable[..., torch.Tensor]  # same, over the unlabelled target set
    source_labels: torch.Tensor  # (Ns,) labels of the whole source set (source labels are allowed)
    # (model=None) -> features (Ns, D), logits (Ns, K), eval mode; `model` (e.g. an EMA teacher) defaults to the trained classifier
    embed_source: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    embed_target: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # same, over the unlabelled target set (Nt, ...)
    num_target: int = 0  # Nt, size of the unlabelled target set (0 without one)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.step / max(1, self.total_steps)


class Method(nn.Module):
    """Base class. Subclasses set `name`, a `Config` dataclass, and implement `forward`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type("Config", (), {})
    uses_target_labels: ClassVar[bool] = False  # True only for the benchmark-only oracle
    uses_target: ClassVar[bool] = True  # False: batches carry no target images (saves time)
    uses_pseudo_labels: ClassVar[bool] = False  # True: create_method attaches `self.pseudo_labels` (pseudo_labels.py)
    draws_own_batches: ClassVar[bool] = False  # True: forward gets batch=None and samples via ctx
    refresh_every: int | None = None  # steps between `refresh` calls (pseudo-labels); None = never

    def __init__(self, classifier: Classifier, config: Any):
        super().__init__()
        self.config = config

    def adapt_steps(self, steps: int) -> int:
        """Optimisation steps this method adapts for, given the profile's `train.adapt_steps`."""
        return steps

    def selection_start(self, steps: int) -> int:
        """First step whose checkpoint the label-free validator may select, out of `steps`.

        Validators rank checkpoints of one objective. A method whose early steps train something
        else (a warm-up) returns the first step of its own objective; earlier evaluations are
        still recorded (validator study), never selected.
        """
        return 0

    def images_per_step(self, batch_size: int, uses_target: bool) -> int:
        """Images one optimisation step passes forward and backward (for images/s and FLOPs)."""
        return batch_size * (2 if uses_target else 1)

    def refresh(self, classifier: Classifier, ctx: StepContext) -> None:
        """Recompute whatever the method derives from the whole data (e.g. pseudo-labels)."""

    def forward(self, classifier: Classifier, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # what must survive a resume besides parameters (e.g. pseudo-label pairs)
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def config_from_dict(cls: type, values: dict[str, Any], where: str):
    """Build a method's Config (a pydantic `MethodConfig`) from params.yaml's `methods.<name>`; an
    unknown key, a wrong type or a value out of range raises ConfigError naming the full dotted key,
    e.g. `methods.adamatch.tau: must be <= 1 (got 1.5)`."""
    from pydantic import ValidationError

    from udaflow.config import ConfigError, error_key, explain

    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of options (got {values!r})", key=where)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(explain(exc, where, cls), key=error_key(exc, where)) from None
