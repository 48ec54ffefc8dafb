"""The model's own input: size, resize/crop and normalisation.

A timm model with a pretrained config (any timm name but udaflow's own `udaflow_vit_*`) brings its
preprocessing: `timm.data.resolve_data_config` gives the interpolation, centre-crop fraction and
per-channel mean/std it was trained with, and the input size is the one the built model takes (a
ViT's patch embedding size, so `model.backbone_args.img_size` wins over the 224 of the config).
Images are then resized on their shorter side to size / crop_pct and centre-cropped to size x
size, as timm's evaluation transform does (or, where the config's crop_mode says so, squashed to a
square or resized on their longer side and padded before the crop). udaflow's own backbones have no pretrained config:
they take `data.image_size` from params.yaml, a plain resize to a square and mean = std = 0.5.

Example:
    >>> resolve("vit_small_patch16_224", {}, 32)
    ImageSpec(size=224, interpolation='bicubic', crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), origin="timm's pretrained config of vit_small_patch16_224")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class ImageSpec:
    size: int  # square input side, px
    interpolation: str = "bilinear"  # PIL resampling: nearest | bilinear | bicubic | lanczos
    crop_pct: float | None = None  # None: resize straight to size x size; else a resize to size / crop_pct, then crop_mode
    mean: float | tuple[float, ...] = 0.5  # subtracted from pixels in [0, 1] (one value, or one per channel)
    std: float | tuple[float, ...] = 0.5
    origin: str = "params.yaml (data.image_size)"
    # timm's eval crop: "center" the shorter side to size / crop_pct, a centre crop; "squash" both sides to it (the aspect
    # ratio not kept), a centre crop; "border" the longer side to it, padded with the mean colour, a centre crop
    crop_mode: str = "center"

    @property
    def variant(self) -> str:
        """What the decoded pixels depend on besides the size (part of a decoded-file's name)."""
        if self.crop_pct is None and self.interpolation == "bilinear":
            return ""
        return f"{self.interpolation}-crop{self.crop_pct}" + ("" if self.crop_mode == "center" else f"-{self.crop_mode}")

    def describe(self) -> str:
        """The resize and crop in words (the `input:` line `udaflow run` prints)."""
        if self.crop_pct is None:
            return f"{self.interpolation} resize to {self.size}x{self.size}"
        scale = int(self.size / self.crop_pct)
        return {"center": f"{self.interpolation} resize of the shorter side to {scale} px, centre crop",
                "squash": f"{self.interpolation} resize to {scale}x{scale} px (aspect ratio not kept), centre crop",
                "border": f"{self.interpolation} resize of the longer side to {scale} px, padded with the mean colour, centre crop",
                }[self.crop_mode]


def resolve(backbone: str, backbone_args: dict[str, Any], image_size: int) -> ImageSpec:
    """The ImageSpec for `backbone` built with `backbone_args`; `image_size` when it has no pretrained config."""
    return _resolve(backbone, json.dumps(backbone_args, sort_keys=True, default=str), image_size)


@lru_cache(maxsize=16)
def _resolve(backbone: str, args_json: str, image_size: int) -> ImageSpec:
    import timm

    from udaflow.models.backbone import BackboneError

    if not timm.is_model(backbone):
        raise BackboneError(f"unknown backbone '{backbone}'; any name from timm.list_models() works")
    model = timm.create_model(backbone, pretrained=False, num_classes=0, **json.loads(args_json))
    return spec_of(model, image_size, backbone)


def spec_of(model, image_size: int, name: str = "the backbone") -> ImageSpec:
    """The ImageSpec of a built timm model (see the module docstring)."""
    from timm.data import resolve_data_config

    if not getattr(model, "pretrained_cfg", None) or "mean" not in model.pretrained_cfg:
        return ImageSpec(image_size)
    cfg = resolve_data_config({}, model=model)
    embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = int(embed_size[0]) if embed_size else int(cfg["input_size"][-1])
    return ImageSpec(
        size=size, interpolation=str(cfg.get("interpolation", "bicubic")), crop_pct=float(cfg.get("crop_pct", 1.0)),
        mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
        origin=f"timm's pretrained config of {name}", crop_mode=str(cfg.get("crop_mode") or "center"),
    )
