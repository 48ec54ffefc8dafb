"""Backbones: any timm model by name, plus udaflow's small hybrid ViTs for 32x32 images.

The default `udaflow_vit_tiny3` (and `udaflow_vit_tiny2`, `udaflow_vit_tiny` before it) is a real timm `VisionTransformer`
whose patch embedding is a small convolutional stem (as in timm's hybrid ViTs): on 32x32 digits
trained from scratch on a CPU, plain 4x4 patches learn far slower than a stem of 3x3 convolutions
that hands the transformer 4x4 = 16 tokens. They are registered with timm, so `timm.create_model`
builds them like any other model and every timm helper (pooling, reset_classifier, checkpoint
loading) applies. A registered name never changes its architecture: a packaged model rebuilds
from its name (models/packaged.py), so a better default is a new name.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


class BackboneError(ValueError):
    """Unknown backbone name or unusable weights; the message says what to do."""


INPUT_NORMS = ("none", "image", "channel", "gray")


class GELUNHWC(nn.GELU):
    """GELU computed on the NHWC-contiguous view of a channels-last activation: the same function, with
    PyTorch's vectorised CPU kernel where a channels-last input takes a slower path (erf differs by up to
    5e-7, so other bits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


# the stem's activation between its convolutions (no weights either way)
STEM_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "gelu_nhwc": GELUNHWC}


class ConvStem(nn.Module):
    """Conv stem: (B, C, H, W) -> (B, (H/p) * (W/p), D) tokens, p = patch_size (4 or 8).

    A stride-1 3x3 conv, then log2(p) stride-2 3x3 convs with BatchNorm + GELU (`stem_act`) between them;
    `stem_first_stride=2` drops the full-resolution conv (the first conv halves H, W): its
    activations were most of the stem's memory traffic, so the channels can widen at the same cost.
    Widths: `stem_width` (the first conv's, doubling at each conv) or `stem_widths` (each conv's, the
    last one D); neither: D/8, D/4, D/2, D.
    Signature matches timm's PatchEmbed so VisionTransformer(embed_layer=ConvStem) works.
    """

    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=128, bias=True, dynamic_img_pad=False, input_norm="none", stem_width=None,
                 stem_first_stride=1, stem_act="gelu", stem_widths=None, **_):
        super().__init__()
        if stem_act not in STEM_ACTS:
            raise BackboneError(f"model.backbone_args.stem_act: '{stem_act}' is not one of {', '.join(STEM_ACTS)}")
        if input_norm not in INPUT_NORMS:
            raise BackboneError(f"model.backbone_args.input_norm: '{input_norm}' is not one of {', '.join(INPUT_NORMS)}")
        self.input_norm = input_norm
        img_size = img_size if isinstance(img_size, int) else img_size[0]
        patch_size = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch_size not in (2, 4, 8):
            raise BackboneError(f"ConvStem reduces by powers of two: patch_size must be 2, 4 or 8, not {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if stem_first_stride not in (1, 2):
            raise BackboneError(f"model.backbone_args.stem_first_stride: 1 (a full-resolution conv first) or 2, not {stem_first_stride}")
        downs = int(math.log2(patch_size))
        convs = downs if stem_first_stride == 2 else downs + 1  # stride 2: the first conv already halves H, W
        if stem_widths is not None:  # every conv's width, the last one D
            ok = isinstance(stem_widths, (list, tuple)) and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in stem_widths)
            if not ok or len(stem_widths) != convs or stem_widths[-1] != embed_dim:
                raise BackboneError(f"model.backbone_args.stem_widths: a list of {convs} whole widths ending in embed_dim {embed_dim}, "
                                    f"not {stem_widths!r}")
            if stem_width:
                raise BackboneError("model.backbone_args: stem_width or stem_widths, not both")
            widths = list(stem_widths)
        elif stem_width:  # first conv's width, doubling at each conv, capped at D
            widths = [min(embed_dim, int(stem_width) << i) for i in range(convs - 1)] + [embed_dim]
        else:
            widths = [max(8, embed_dim >> (convs - 1 - i)) for i in range(convs - 1)] + [embed_dim]  # e.g. D/8, D/4, D/2, D
        layers: list[nn.Module] = [nn.Conv2d(in_chans, widths[0], 3, stem_first_stride, 1, bias=False)]  # (B, w0, H/s, W/s)
        for i in range(convs - 1):
            layers += [nn.BatchNorm2d(widths[i]), STEM_ACTS[stem_act]()]
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1, bias=bias and i == convs - 2))  # halves H, W
        self.stem = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "gray":  # luminance, standardised per image (the CNN baseline's input)
            x = x.mean(1, keepdim=True)
            x = ((x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)).expand(-1, 3, -1, -1)
        elif self.input_norm != "none":
            # per-image standardisation: removes each image's brightness/contrast ("image") or its colour cast too ("channel")
            dims = (1, 2, 3) if self.input_norm == "image" else (2, 3)
            x = (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-3)
        # channels-last: oneDNN's strided 3x3 convolutions run their backward 1.5-3x faster on few
        # channels (one CPU thread, 12 -> 24 channels at 32x32: 61 -> 22 ms), the whole training step
        # 1.10-1.17x; the tokens below then come out contiguous. The same function, other summation order.
        x = self.stem(x.contiguous(memory_format=torch.channels_last))  # (B, D, h, w), stored (B, h, w, D)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, D)


def _hybrid_vit(embed_dim: int, depth: int, num_heads: int, **kwargs) -> VisionTransformer:
    kwargs.setdefault("img_size", 32)
    kwargs.setdefault("patch_size", 4)
    kwargs.setdefault("global_pool", "avg")  # mean of tokens: steadier than a cls token on tiny data
    kwargs.setdefault("class_token", False)
    kwargs.setdefault("mlp_ratio", 2.0)
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    stem = partial(ConvStem, input_norm=kwargs.pop("input_norm", "none"), stem_width=kwargs.pop("stem_width", None),
                   stem_first_stride=kwargs.pop("stem_first_stride", 1), stem_act=kwargs.pop("stem_act", "gelu"),
                   stem_widths=kwargs.pop("stem_widths", None))
    seq_pool = kwargs.pop("seq_pool", False)
    if seq_pool and kwargs["global_pool"] != "avg":
        raise BackboneError(f"seq_pool pools the tokens itself: global_pool must stay 'avg', not {kwargs['global_pool']!r}")
    vit = VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, embed_layer=stem, **kwargs)
    if seq_pool:  # built after the ViT's own initialisation: the ViT's weights are the same with or without it
        vit.attn_pool = SeqPool(embed_dim)  # timm's pool() calls attn_pool in place of the token mean
    return vit


class SeqPool(nn.Module):
    """Sequence pooling (Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers",
    2021, CCT): a learned weighting of the tokens in place of their mean.

        w = softmax_over_tokens(LN(x) a + b),  pooled = sum_n w_n x_n
        x: (B, N, D) tokens -> w: (B, N, 1) -> pooled: (B, D)

    3D + 1 parameters. Uniform weights are the token mean (global_pool "avg"), so it can only add.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.score(self.norm(x)).softmax(dim=1)  # (B, N, 1): a distribution over the N tokens
        return (weights * x).sum(1)  # (B, D)


def _own_vit(name: str, pretrained: bool, kwargs: dict, **defaults) -> VisionTransformer:
    """udaflow's hybrid ViT `name`: an 8x stem and `defaults` (embed_dim, depth, ...), each unless kwargs sets it."""
    if pretrained:
        raise BackboneError(f"{name} has no published weights: pass model.pretrained=<path to a .pt file>")
    if kwargs.get("stem_widths") is not None and "stem_width" not in kwargs:
        defaults.pop("stem_width", None)  # each conv's width given: the name's own first width yields to it
    return _hybrid_vit(**{"patch_size": 8, **defaults, **kwargs})


@register_model
def udaflow_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The default until 2026-12-01 (now udaflow_vit_tiny2): 8x conv stem (4x4 = 16 tokens), 4 blocks, width 96,
    4 heads (~0.36M params).

    Measured on 2 CPU cores, synth source pretraining: a 4x stem (64 tokens, width 128) reached
    32% source accuracy after 400 steps at 430 img/s; this one reached 66% at 1,450 img/s.
    """
    return _own_vit("udaflow_vit_tiny", pretrained, kwargs, embed_dim=96, depth=4, num_heads=4)


@register_model
def udaflow_vit_tiny2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The default 2026-12-01 (now udaflow_vit_tiny3): udaflow_vit_tiny with a wider stem (16-32-64-96 channels, not 12-24-48-96)
    and 3 blocks, not 4 (~0.31M params): the same training FLOPs (0.0425 GFLOP an image, 0.0416 before).

    Measured with adamatch, quick profile, seed 0, one thread: synth->mnist 97.46 -> 97.94, mnist->mnistm
    96.86 -> 97.72, adaptation 404 -> 369 s beside each other (docs/measurements.md, "A wider stem, one block fewer").
    The stem's width alone (4 blocks) read 97.82 / 97.52 at 1.10x the seconds.
    """
    return _own_vit("udaflow_vit_tiny2", pretrained, kwargs, embed_dim=96, depth=3, num_heads=4, stem_width=16)


@register_model
def udaflow_vit_tiny3(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Default since 2026-12-01 (late night): udaflow_vit_tiny2 pooled by SeqPool (CCT's learned token weighting) instead of
    the token mean; 289 parameters more, the same FLOPs to within 0.1%.

    Measured (quick profile, one thread, 3 seeds; docs/measurements.md, "Backbone ceiling"): the oracle (the supervised
    ceiling) mnist->mnistm 96.90 -> 97.13, synth->mnist 98.53 -> 98.87; adamatch level: synth->mnist 97.59 ->
    97.61, mnist->mnistm 97.50 -> 97.47, synth->mnist-tint (third shift) 96.83 (2 seeds) -> 96.81.
    """
    return _own_vit("udaflow_vit_tiny3", pretrained, kwargs, embed_dim=96, depth=3, num_heads=4, stem_width=16, seq_pool=True)


@register_model
def udaflow_vit_micro(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """For tests: 8x conv stem + 2 blocks, width 32, 2 heads."""
    return _own_vit("udaflow_vit_micro", pretrained, kwargs, embed_dim=32, depth=2, num_heads=2)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(pretrained: str | None) -> str | None:
    """sha256 of a `model.pretrained` weights file's bytes (None for no file, or "timm"): the source model's
    cache key and a run's record hold it, since the same path can hold other weights tomorrow. Hashed once
    per file version (path, size, mtime) in a process."""
    if not pretrained or pretrained == "timm" or not Path(pretrained).is_file():
        return None
    stat = Path(pretrained).stat()
    key = (str(Path(pretrained).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        import hashlib

        h = hashlib.sha256()
        with open(pretrained, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file of tensors (`{"state_dict": ...}`
    or the dict itself), loaded without unpickling objects. Anything else is a BackboneError."""
    if not path.is_file():
        raise BackboneError(f"{path}: pretrained weights file not found (model.pretrained)")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BackboneError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a foreign or pickled file
        raise BackboneError(f"{path}: not a safetensors or torch weights file of tensors ({type(exc).__name__}); refusing to load it") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: holds no state dict of tensors")
    return state


def create_backbone(name: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """A timm model without classifier (forward returns pooled features of size `num_features`).

    pretrained: None (from scratch), a path to a weights file (safetensors, or a torch state dict),
    or "timm" to use weights that are already in the local timm/Hugging Face cache (never
    downloaded: HF_HUB_OFFLINE is forced). A file's tensors must match the backbone's by name and shape.
    """
    if not timm.is_model(name):
        similar = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(similar)})" if similar else ""
        raise BackboneError(f"unknown backbone '{name}'{hint}; any name from timm.list_models() works")
    if pretrained == "timm":
        import os

        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - timm raises many kinds when weights are missing
            raise BackboneError(
                f"pretrained weights for '{name}' are not in the local timm/Hugging Face cache ({type(exc).__name__}); "
                "nothing is downloaded at run time: put them in the cache or pass model.pretrained=<file>"
            ) from None
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if pretrained:
        path = Path(pretrained)
        state = read_weights(path)
        own = model.state_dict()
        matching = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
        wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if wrong_shape:
            raise BackboneError(
                f"{path}: tensor '{wrong_shape[0]}' has shape {tuple(state[wrong_shape[0]].shape)}, "
                f"backbone '{name}' expects {tuple(own[wrong_shape[0]].shape)} ({len(wrong_shape)} mismatches)"
            )
        if not matching:
            raise BackboneError(f"{path}: no tensor in this file matches backbone '{name}'")
        missing = [k for k in own if k not in state]  # strict=False alone left them at their random start, without a word
        if missing:
            raise BackboneError(
                f"{path}: {len(missing)} of backbone '{name}''s {len(own)} tensors are not in the file (first: "
                f"{', '.join(repr(k) for k in missing[:3])}); they would train from random values",
            )
        model.load_state_dict(state, strict=False)  # tensors the backbone lacks (a classifier head) are left out
    return model
