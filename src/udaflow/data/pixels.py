"""The pixels of an image file as udaflow's model sees them, before resizing: upright by the EXIF
orientation, 16-bit and float greys stretched to 8 bits, transparency over black, RGB.

Every decode goes through `model_rgb` (training, evaluation, the served model, `datasets.to_model_pixels`),
and `pixel_digest` hashes its result: two files are the same image to udaflow when their digests match,
whatever bytes store them (a PNG re-saved with other compression or metadata, a grey image saved as RGB,
a photo stored turned with an EXIF tag). The GX suites and ingest's overlap check use it to find a
duplicate that the file checksums miss. PIL and numpy only: no torch, so `udaflow data` stays light.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
from PIL import ExifTags, Image

_ORIENTATIONS = {  # EXIF Orientation -> the transpose that shows the stored pixels as a viewer does
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def upright(img: Image.Image) -> Image.Image:
    """`img` as a viewer shows it: turned or mirrored by its EXIF Orientation tag (2-8); itself without one,
    or with EXIF that cannot be read (the pixels decode all the same, as viewers show them). The pixels are
    decoded first, outside that leniency: a broken image still fails here as it did before."""
    img.load()  # a PNG's getexif() decodes the pixels to reach an eXIf chunk after them: its errors are not EXIF's
    with warnings.catch_warnings():  # PIL warns per image on a truncated EXIF block
        warnings.simplefilter("ignore")
        try:
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # noqa: BLE001 - unreadable EXIF: no orientation to apply
            return img
    turn = _ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(turn) if turn is not None else img


def model_rgb(img: Image.Image) -> Image.Image:
    """`img` upright, as 8-bit RGB at its own size: the first half of every decode (`datasets.to_model_pixels`)."""
    img = upright(img)
    # a transparent colour (PNG's tRNS chunk in a grey or RGB image, as optimisers write it) is transparency
    # like an alpha channel's: the same picture decodes the same whichever way its file stores it
    transparent = img.info.get("transparency") if img.mode in ("1", "L", "RGB", "I;16", "I;16B", "I;16L", "I") else None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raw = np.asarray(img, dtype=np.float32)
        arr = np.clip(np.nan_to_num(raw, nan=0.0, posinf=0.0), 0, None)  # a 32-bit "I" or float image may hold negatives: black, not wrapped around uint8
        # stretched by its own maximum: a 12-bit sensor's range in 16 bits; a float image in 0-1 as it is
        grey = Image.fromarray((arr / max(float(arr.max()), 1.0) * 255).astype(np.uint8), "L")
        if isinstance(transparent, int):
            grey.putalpha(Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8), "L"))
        img = grey
    elif transparent is not None:
        img = img.convert("RGBA")  # PIL turns the transparent colour into alpha 0
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    return img if img.mode == "RGB" else img.convert("RGB")  # an RGB image as it is: a 12 MP photo's copy costs 20 ms


EXACT = "px:"  # a digest of every pixel: equal digests, the same picture
SKETCH = "sk:"  # a digest of box averages (a large image): unequal sketches, different pictures; equal ones, look closer
SKETCH_FROM = 256  # px on the shorter side: a smaller image is digested exactly (its pixels cost less than a sketch's bookkeeping)


def pixel_digest(img: Image.Image, exact: bool = False) -> str:
    """A digest of `model_rgb(img)`'s size and pixels, equal for files that decode to the same picture.

    An image 256 px or more on its shorter side is digested from box averages of about 128 px on that side
    (`SKETCH`) unless `exact`: hashing a 12 MP photo's 36 MB of pixels tripled its validation (61 -> 170 ms), its
    sketch adds 15%. The same picture always has the same sketch; two pictures with the same sketch are compared
    with `exact=True` (`settle`), which is rare outside real copies."""
    rgb = model_rgb(img)
    factor = 1 if exact else min(rgb.size) // (SKETCH_FROM // 2) if min(rgb.size) >= SKETCH_FROM else 1
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}/{factor}:".encode())
    digest.update((rgb.reduce(factor) if factor > 1 else rgb).tobytes())
    return (SKETCH if factor > 1 else EXACT) + digest.hexdigest()


def file_digest(file, exact: bool = False) -> str | None:
    """`pixel_digest` of an image file; None when it cannot be read or decoded."""
    try:
        with Image.open(file) as img:
            return pixel_digest(img, exact)
    except Exception:  # noqa: BLE001 - unreadable here: the GX suites name such a file, this check only looks for copies
        return None


def settle(digests: list[str | None], files: list) -> list[str | None]:
    """`digests` with every sketch that another digest repeats replaced by its file's exact digest: after this,
    equal values mean the same picture and different values different pictures."""
    from collections import Counter

    seen = Counter(d for d in digests if d is not None)
    return [file_digest(f, exact=True) if d is not None and d.startswith(SKETCH) and seen[d] > 1 else d for d, f in zip(digests, files)]
