"""Everything a run can know is wrong before it validates, versions or trains anything.

`check_run_config(cfg)` raises ConfigError naming the params.yaml key (or DataError naming the
domain folder) for: an unknown method, a method option of the wrong name or type (every
`methods.<name>` entry, not only the chosen method's), an unknown validator (`validator`,
`promotion.validator`), an unknown backbone or backbone argument, and a source or target domain
that is not under `data.root`. Building the backbone once on CPU is the check for its arguments.
"""

from __future__ import annotations

import timm

from udaflow.config import Config, ConfigError
from udaflow.data.manifest import DataError
from udaflow.methods import UnknownMethodError, get_method_class, list_methods
from udaflow.methods.base import config_from_dict
from udaflow.models import BackboneError, create_backbone
from udaflow.validators import get_validator


def check_run_config(cfg: Config, *, domains: bool = True) -> None:
    try:
        get_method_class(cfg.method)
    except UnknownMethodError as exc:
        raise ConfigError(f"method: {exc}") from None
    known = list_methods()
    for name, options in cfg.methods.items():
        if name not in known:
            raise ConfigError(f"methods.{name}: unknown method (known: {', '.join(known)})")
        config_from_dict(get_method_class(name).Config, options or {}, f"methods.{name}")
    for key, name in (("validator", cfg.validator), ("promotion.validator", cfg.promotion.validator)):
        if name is None:
            continue
        try:
            get_validator(name)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    if not timm.is_model(cfg.model.backbone):
        raise ConfigError(f"model.backbone: unknown backbone '{cfg.model.backbone}'; any name from timm.list_models() works")
    try:
        create_backbone(cfg.model.backbone, cfg.model.pretrained, **cfg.model.backbone_args)
    except BackboneError as exc:
        raise ConfigError(f"model: {exc}") from None
    except TypeError as exc:  # an argument the timm model does not take
        raise ConfigError(f"model.backbone_args: {exc}") from None
    if domains:
        for key in ("source", "target"):
            folder = cfg.data.root / getattr(cfg, key)
            if not folder.is_dir():
                raise DataError(f"{key}: domain '{getattr(cfg, key)}' not found ({folder} is missing); "
                                "build it (udaflow data build) or ingest it (udaflow data ingest)")
