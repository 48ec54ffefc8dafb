"""Method registry: `@register_method("dann")` on a Method subclass; `create_method(name, ...)`.

Importing this package imports every method file below, so a new method is one new file plus
its line in `_BUILTIN`.
"""

from __future__ import annotations

import importlib
from typing import Any

from udaflow.methods.base import Batch, Method, StepContext, config_from_dict
from udaflow.models.heads import Classifier
from udaflow.pseudo_labels import PseudoLabelFilter

_REGISTRY: dict[str, type[Method]] = {}
_BUILTIN = ("source_only", "oracle", "dann", "cdan", "mcc", "cdtrans", "adamatch", "ssrt")


class UnknownMethodError(ValueError):
    pass


def register_method(name: str):
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for mod in _BUILTIN:
        importlib.import_module(f"udaflow.methods.{mod}")


def list_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def create_method(name: str, classifier: Classifier, options: dict[str, Any] | None = None,
                  pseudo_labels: dict[str, Any] | None = None) -> Method:
    """`options`: params.yaml's methods.<name>; `pseudo_labels`: train.pseudo_labels, the shared denoising
    filter a method that trains on its own target predictions gets as `method.pseudo_labels`."""
    cls = get_method_class(name)
    config = config_from_dict(cls.Config, options or {}, f"methods.{name}")
    method = cls(classifier, config)
    if cls.uses_pseudo_labels:
        method.pseudo_labels = PseudoLabelFilter(classifier.num_classes, **(pseudo_labels or {}))
    return method


__all__ = [
    "Batch", "Method", "StepContext", "UnknownMethodError",
    "create_method", "get_method_class", "list_methods", "register_method",
]
