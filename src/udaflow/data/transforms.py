"""Batch transforms on tensors (no per-image PIL work: two CPU cores can't afford it).

The random numbers are drawn on the CPU from the run's seeded generator and the arithmetic runs where
the images are: on the CPU, or on the GPU the engine trains on (a 224 px batch augmented on the host held
a GPU step to the host's pace, README "On a GPU"). On the CPU the bits are those of the CPU-only code before.
Under torchrun each rank augments only its rows of the global batch, with the numbers drawn for the
whole batch (`RowDraws`): the pixels one process would give those rows, at 1 / world size of the work.

Three views of a batch: `weak` (a small shift: what pseudo-labels are read from), `default` (the
training augmentation every method uses) and `strong` (default + cutout, and a random rotation and
shear when `strong_rotate` / `strong_shear` ask for one: what consistency and self-training methods
such as adamatch fit to the weak view's pseudo-labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from udaflow.config import AugmentConfig

MEAN, STD = 0.5, 0.5


class RowDraws:
    """Random numbers for `rows` of a batch of `total` images: each draw is made for the whole batch on
    `generator` (so every rank consumes what one process would) and only `rows` are kept. Passed where a
    transform takes a generator, it augments a rank's rows alone, pixel for pixel as the whole batch would."""

    def __init__(self, generator: torch.Generator, total: int, rows: slice):
        self.generator, self.total, self.rows = generator, total, rows
        self.size = len(range(total)[rows])

    def take(self, draw, b: int) -> torch.Tensor:
        if b != self.size:
            raise ValueError(f"RowDraws for {self.size} rows of {self.total} given a batch of {b} images")
        return draw(self.total)[self.rows]


Draws = torch.Generator | RowDraws


def _rand(generator: Draws, b: int, *shape: int) -> torch.Tensor:
    """torch.rand((b, *shape)) on the run's generator, or these rows of a global batch's draw."""
    if isinstance(generator, RowDraws):
        return generator.take(lambda n: torch.rand(n, *shape, generator=generator.generator), b)
    return torch.rand(b, *shape, generator=generator)


def _randint(generator: Draws, low: int, high: int, b: int) -> torch.Tensor:
    """torch.randint(low, high, (b,)) on the run's generator, or these rows of a global batch's draw."""
    if isinstance(generator, RowDraws):
        return generator.take(lambda n: torch.randint(low, high, (n,), generator=generator.generator), b)
    return torch.randint(low, high, (b,), generator=generator)


def to_device(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`images` on `device`; host images bound for a GPU are pinned first (page-locked: the copy overlaps
    with the GPU's work, non_blocking)."""
    if torch.device(device).type == "cuda" and images.device.type == "cpu":
        images = images.pin_memory()
    return images.to(device, non_blocking=True)


def to_input(images: torch.Tensor, device: torch.device | str = "cpu", mean: float | tuple[float, ...] = MEAN,
             std: float | tuple[float, ...] = STD) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 on device, (x / 255 - mean) / std (one value, or one per channel)."""
    x = to_device(images, device).float().div_(255.0)
    if not isinstance(mean, (int, float)):
        mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    if not isinstance(std, (int, float)):
        std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: Draws) -> torch.Tensor:
    """Random shift, colour jitter, channel mixing and inversion: (B, 3, H, W) uint8 -> uint8.

    Randomness comes from `generator` (on CPU) so a seeded run draws the same augmentations; the images
    may be on any device.
    """
    b, device = images.shape[0], images.device
    if cfg.rotate > 0 or cfg.scale > 0:
        x = images.float() / 255.0
        x = affine(x, pixels(cfg.translate, x), cfg.rotate, cfg.scale, generator)
    else:  # the shift moves the stored bytes, then the scaling: the same floats as scaling first (a shift only moves values)
        x = (shift(images, pixels(cfg.translate, images), generator) if cfg.translate > 0 else images).float() / 255.0
    if cfg.color:
        # random convex channel mix: covers grey<->colour and hue swaps between domains
        mix = _rand(generator, b, 3, 3) + torch.eye(3) * 2.0
        mix = mix / mix.sum(dim=2, keepdim=True)  # rows sum to 1: (B, 3 out, 3 in)
        x = torch.einsum("boi,bihw->bohw", mix.to(device), x)
        # independent per-channel gain and offset: turns grey digits into colour ones
        gain = 0.7 + 0.6 * _rand(generator, b, 3, 1, 1)
        offset = 0.4 * (_rand(generator, b, 3, 1, 1) - 0.5)
        x = x * gain.to(device) + offset.to(device)
        contrast = (0.6 + 0.8 * _rand(generator, b, 1, 1, 1)).to(device)
        brightness = (0.3 * (_rand(generator, b, 1, 1, 1) - 0.5)).to(device)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean + brightness
    if cfg.invert > 0:
        flip = (_rand(generator, b, 1, 1, 1) < cfg.invert).float().to(device)
        x = flip * (1.0 - x) + (1.0 - flip) * x
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


VIEWS = ("weak", "default", "strong")
REFERENCE_SIZE = 32  # `translate` is in pixels of a 32 px image and scales with the input size


def pixels(translate: float, images: torch.Tensor) -> int:
    """`translate` (px at 32 px) in pixels of these images: the same share of the picture at any size."""
    return int(round(translate * min(images.shape[-2:]) / REFERENCE_SIZE))


def shift(images: torch.Tensor, translate: int, generator: Draws) -> torch.Tensor:
    """Random integer shift of up to `translate` px with replicated borders: (B, C, H, W) -> same, same dtype.

    One gather from the image itself, each output pixel reading the clamped source row and column (what a
    replicate pad then a crop reads), in the images' own dtype: uint8 batches move a quarter of the bytes.
    Until 2026-12-07 a replicate pad of a float copy and an advanced-indexing gather: the same pixels
    (a test), 4-5x the time (1.0 ms against 0.2 ms a 64-image view on one thread, an AMD EPYC: 1.5-2% of
    an adaptation step)."""
    b, c, h, w = images.shape
    t = translate
    dx = _randint(generator, 0, 2 * t + 1, b).to(images.device)
    dy = _randint(generator, 0, 2 * t + 1, b).to(images.device)
    rows = (dy[:, None] - t + torch.arange(h, device=images.device)).clamp_(0, h - 1)  # (B, H): the source row of each output row
    cols = (dx[:, None] - t + torch.arange(w, device=images.device)).clamp_(0, w - 1)  # (B, W)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)  # (B, C, H*W) into H*W
    return images.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


def affine(images: torch.Tensor, translate: float, rotate: float, scale: float, generator: Draws,
           shear: float = 0.0) -> torch.Tensor:
    """Random rotation (+-rotate degrees), zoom (1 +- scale), shift (+-translate px) and, when `shear` > 0,
    a horizontal shear (x += s * y, s in +-shear), one batched grid_sample with replicated borders:
    (B, C, H, W) float -> same."""
    b, _, h, w = images.shape
    angle = (_rand(generator, b) * 2 - 1) * rotate * torch.pi / 180  # (B,)
    zoom = 1 + (_rand(generator, b) * 2 - 1) * scale  # (B,)
    move = (_rand(generator, b, 2) * 2 - 1) * translate * 2 / torch.tensor([w, h])  # (B, 2) in [-1, 1] units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # rotation @ [[1, s], [0, 1]]; with shear 0 no number is drawn (the rotate/scale augmentation's bits are unchanged)
    s = (_rand(generator, b) * 2 - 1) * shear if shear > 0 else torch.zeros(b)
    theta = torch.stack([torch.stack([cos, cos * s - sin, move[:, 0]], 1), torch.stack([sin, sin * s + cos, move[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutout(images: torch.Tensor, generator: Draws, max_fraction: float = 0.5) -> torch.Tensor:
    """Erase one random square per image (side up to max_fraction of the shorter side) with a random grey."""
    b, _, h, w = images.shape
    side = _randint(generator, 1, max(2, int(min(h, w) * max_fraction) + 1), b)
    y0 = _randint(generator, 0, h, b)
    x0 = _randint(generator, 0, w, b)
    grey = _randint(generator, 0, 256, b)
    side, y0, x0, grey = (v.to(images.device) for v in (side, y0, x0, grey))
    ys, xs = torch.arange(h, device=images.device)[None, :], torch.arange(w, device=images.device)[None, :]  # (1, H), (1, W)
    in_y = (ys >= (y0 - side // 2)[:, None]) & (ys < (y0 + (side + 1) // 2)[:, None])  # (B, H)
    in_x = (xs >= (x0 - side // 2)[:, None]) & (xs < (x0 + (side + 1) // 2)[:, None])  # (B, W)
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(box, grey.to(images.dtype)[:, None, None, None], images)


def augment_view(images: torch.Tensor, cfg: AugmentConfig, generator: Draws, view: str = "default") -> torch.Tensor:
    """(B, 3, H, W) uint8 -> uint8 in one of VIEWS."""
    if view == "default":
        return augment(images, cfg, generator)
    if view == "weak":
        return shift(images, max(1, pixels(cfg.translate, images) // 2), generator) if cfg.translate > 0 else images
    if view == "strong":
        x = augment(images, cfg, generator)
        if cfg.strong_rotate > 0 or cfg.strong_shear > 0:
            warped = affine(x.float() / 255.0, 0, cfg.strong_rotate, 0.0, generator, shear=cfg.strong_shear)
            x = (warped.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return cutout(x, generator)
    raise ValueError(f"unknown augmentation view '{view}' (known: {', '.join(VIEWS)})")
