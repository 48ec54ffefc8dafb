"""The registered model on disk: weights as safetensors plus a JSON config, nothing pickled.

A packaged model is a folder:

    weights.safetensors   the ImageClassifier's state_dict (tensors only)
    config.json           {"format": 1, "backbone": ..., "backbone_args": {...}, "classes": [...],
                           "mean": ..., "std": ..., "image_size": ...}

`load(folder)` rebuilds the network from the config with the udaflow installed here and loads the
weights with `safetensors` (which parses a header and raw tensor bytes: no code runs). So a model
pulled from an artifact store or a DVC remote can be loaded without trusting it. MLflow stores the
folder as a pyfunc model whose `loader_module` is this module (`_load_pyfunc`), imported from the
installed package, never from the artifact store.

`predict` takes images as a client has them (encoded files or uint8 pixels of any size, see
PackagedModel) and returns the class and the probabilities per image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from udaflow.models.heads import ImageClassifier

if TYPE_CHECKING:
    from PIL import Image

FORMAT = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


class PackageError(ValueError):
    """A packaged model folder is missing a file, has an unknown format or unreadable weights."""


def save(model: ImageClassifier, folder: Path, backbone: str, backbone_args: dict[str, Any], image_size: int) -> Path:
    """Write `model` (an ImageClassifier) into `folder`; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": str(FORMAT)})
    config = {
        "format": FORMAT, "backbone": backbone, "backbone_args": dict(backbone_args), "classes": list(model.classes),
        "mean": _values(model.mean), "std": _values(model.std), "image_size": int(image_size),
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _values(t: torch.Tensor) -> float | list[float]:
    flat = t.flatten().tolist()
    return float(flat[0]) if t.dim() == 0 else [float(v) for v in flat]


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; not a udaflow packaged model") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PackageError(f"{path}: unknown packaged-model format {config.get('format') if isinstance(config, dict) else config!r} (expected {FORMAT})")
    for key in ("backbone", "backbone_args", "classes", "mean", "std"):
        if key not in config:
            raise PackageError(f"{path}: key '{key}' missing")
    return config


def load(folder: Path) -> ImageClassifier:
    """Rebuild the ImageClassifier from `folder`; refuses anything that is not a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from udaflow.models import build_classifier

    folder = Path(folder)
    config = read_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS))
    except FileNotFoundError:
        raise PackageError(f"{folder / WEIGHTS}: missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{folder / WEIGHTS}: not a safetensors file ({exc}); refusing to load it") from None
    classifier = build_classifier(config["backbone"], len(config["classes"]), None, **config["backbone_args"])
    mean, std = (v if isinstance(v, (int, float)) else tuple(v) for v in (config["mean"], config["std"]))
    model = ImageClassifier(classifier, tuple(config["classes"]), mean, std)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PackageError(f"{folder / WEIGHTS}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.package_config = config  # what it was built from: backbone, its arguments, input size (input_spec)
    return model.eval()


def input_spec(config: dict[str, Any]):
    """The ImageSpec the pipeline decoded this model's images with (its backbone's timm config, else
    its recorded image_size)."""
    from udaflow.models.preprocess import resolve

    return resolve(config["backbone"], config["backbone_args"], int(config.get("image_size") or 32))


class InputError(ValueError):
    """A request the served model refuses; the message names the image and what is wrong with it."""


IMAGE = "image"  # the one input column: an encoded image (base64 text or bytes) or uint8 pixels
MAX_SIDE = 8192  # px; a larger array or image file is refused before it is decoded
_B64_BARE, _URLSAFE_B64_BARE = re.compile(r"[A-Za-z0-9+/]*"), re.compile(r"[A-Za-z0-9_-]*")  # base64 without its padding


def _pixels_of_array(value: Any, where: str) -> Image.Image:
    """uint8 pixels (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> a PIL image, or InputError."""
    from PIL import Image

    try:
        arr = np.asarray(value)
    except ValueError as exc:  # numpy refuses ragged nesting outright
        raise InputError(f"{where}: not an array of pixels ({exc})") from None
    if arr.dtype == object:
        raise InputError(f"{where}: rows of different lengths; send an (H, W) or (H, W, C) array of uint8 pixels")
    if arr.dtype.kind not in "uif":
        raise InputError(f"{where}: pixels must be numbers 0-255 (got {arr.dtype.name} values)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InputError(f"{where}: an array of shape {list(arr.shape)}; expected (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA")
    if min(arr.shape[:2]) < 1 or max(arr.shape[:2]) > MAX_SIDE:
        raise InputError(f"{where}: {arr.shape[0]}x{arr.shape[1]} pixels; each side must be 1-{MAX_SIDE}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"{where}: NaN or infinite pixel values")
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(f"{where}: fractional pixel values (e.g. {arr.flat[np.argmax(arr != np.round(arr))]:g}); "
                             "send uint8 pixels 0-255, as the image file holds them, or the encoded file")
        if arr.max() == 1 and arr.min() >= 0:  # a 0/1 mask or image scaled to 0-1: read as 0-255 it is black, silently
            raise InputError(f"{where}: float pixels of only 0 and 1, an image scaled to 0-1; send uint8 pixels 0-255, "
                             "as the image file holds them, or the encoded file")
    low, high = arr.min(), arr.max()
    if low < 0 or high > 255:
        raise InputError(f"{where}: pixel values from {low:g} to {high:g}; uint8 pixels are 0-255")
    return Image.fromarray(arr.astype(np.uint8), "L" if arr.ndim == 2 else "RGB" if arr.shape[2] == 3 else "RGBA")


def _decode(value: Any, where: str, spec) -> np.ndarray:
    """One image as a client sends it -> (3, S, S) uint8, through the same conversion as training."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    from udaflow.data.datasets import to_model_pixels

    if isinstance(value, np.ndarray) and value.ndim == 0:  # the scoring server hands each record's value over as a 0-d array
        value = value.item()
    if value is None or (isinstance(value, float) and np.isnan(value)):  # JSON null; pandas fills a missing cell with NaN
        raise InputError(f"{where}: null, no image; send the image file's bytes base64-encoded, or uint8 pixels")
    if isinstance(value, dict):  # e.g. TF Serving's {"b64": ...}: numpy made it a 0-d array, "rows of different lengths"
        raise InputError(f"{where}: an object (keys {sorted(map(str, value))[:5]}); send the base64 string itself as "
                         f"the '{IMAGE}' value, or uint8 pixels")
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, str):
        if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,<...>
            value = value.split(",", 1)[1]
        text = "".join(value.split())  # line breaks, as `base64` writes them
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            # padding left off, or the URL-safe alphabet (- and _ for + and /), as web libraries write it
            bare = text.rstrip("=")
            padded = bare + "=" * (-len(bare) % 4)
            try:
                if _B64_BARE.fullmatch(bare):
                    value = base64.b64decode(padded, validate=True)
                elif _URLSAFE_B64_BARE.fullmatch(bare):
                    value = base64.urlsafe_b64decode(padded)
                else:
                    raise ValueError(text[:20])
            except (binascii.Error, ValueError):
                raise InputError(f"{where}: a string that is not base64; send the image file's bytes base64-encoded") from None
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as img:  # lazy: the header only
                if min(img.size) < 1 or max(img.size) > MAX_SIDE:  # PIL itself refuses only over 179M pixels, after a 9 s decode at 144M
                    raise InputError(f"{where}: a {img.width}x{img.height} image file; each side must be 1-{MAX_SIDE}")
                return to_model_pixels(img, spec)
        except InputError:
            raise
        except UnidentifiedImageError:  # its message names a BytesIO object's address
            raise InputError(f"{where}: not an image file PIL can decode ({len(value)} bytes of no image format it knows)") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"{where}: not an image file PIL can decode ({type(exc).__name__}: {str(exc)[:200]})") from None
    if value is None:
        raise InputError(f"{where}: empty")
    return to_model_pixels(_pixels_of_array(value, where), spec)


def _encoded_column(value: Any) -> bool:
    """A list of encoded images (base64 text or bytes), or an empty list: a column, never one image's pixels."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, bytes, bytearray)) for v in value)


def _image_values(model_input: Any) -> list[Any]:
    """The per-image values of any form the scoring server or a caller passes."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if IMAGE not in model_input.columns:
            # served, MLflow has already dropped every column the signature lacks, and the rows with them: a misnamed
            # column and an empty request ({"inputs": []}) both arrive as an empty frame, so the line names both
            got = (f"got columns {list(map(str, model_input.columns))}" if len(model_input.columns)
                   else "column names are case-sensitive; or the request held no images")
            raise InputError(f"no '{IMAGE}' column ({got}); send {{\"inputs\": [{{\"{IMAGE}\": <base64 image file or uint8 pixels>}}, ...]}}")
        values = list(model_input[IMAGE])
        if len(values) == 1 and _encoded_column(values[0]):
            # MLflow's schema check turns the column form {"image": [<b64>, <b64>]} into one row holding the list
            return list(values[0])
        return values
    if isinstance(model_input, dict):
        if IMAGE not in model_input:
            raise InputError(f"no '{IMAGE}' key (got {sorted(map(str, model_input))})")
        values = model_input[IMAGE]
        return [values] if isinstance(values, (str, bytes)) else list(values)
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "uif" and model_input.ndim in (3, 4):
        return list(model_input)  # a batch of same-size pixel arrays (B, H, W[, C])
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return [v.get(IMAGE) if isinstance(v, dict) else v for v in model_input]
    raise InputError(f"cannot read images from a {type(model_input).__name__}")


class PackagedModel:
    """What `mlflow.pyfunc.load_model` returns the predictions of (through PyFuncModel).

    Input: images as a client has them, under the column `image`, one per row: the image file's bytes
    (PNG, JPEG, any PIL format; base64 text in JSON) or uint8 pixels of any size, (H, W), (H, W, 3) or
    (H, W, 4). Each goes through the conversion training and evaluation use (resize or crop to the
    model's input, RGB), then the model's own normalisation. Anything else is refused with InputError
    naming the image: values outside 0-255, fractional or NaN pixels, undecodable bytes.

    Output: a DataFrame with one row per image: `class` (the predicted class name) and
    `probabilities` ({class name: softmax probability}).
    """

    def __init__(self, model: ImageClassifier, config: dict[str, Any]):
        self.model = model
        self.config = config
        self._spec = None

    def get_raw_model(self) -> ImageClassifier:
        return self.model

    @property
    def spec(self):
        """The model's input: the same ImageSpec the pipeline decoded its training images with."""
        if self._spec is None and (self.config or {}).get("backbone"):
            self._spec = input_spec(self.config)
        return self._spec

    def pixels(self, model_input: Any) -> np.ndarray:
        values = _image_values(model_input)
        if not values:
            raise InputError("no images in the request")
        return np.stack([_decode(v, f"image {i}", self.spec) for i, v in enumerate(values)])

    def _scaled(self, model_input: Any) -> torch.Tensor | None:
        """The layout versions registered before encoded input took (their signature still asks for
        it): decoded float pixels (B, 3, S, S) scaled to [0, 1]. Checked, not trusted: unscaled or NaN
        values are refused. None for anything else."""
        size = self.spec.size if self.spec else None
        if not (isinstance(model_input, np.ndarray) and model_input.dtype.kind == "f" and model_input.ndim == 4
                and model_input.shape[1] == 3 and model_input.shape[2:] == (size, size)):
            return None
        if not np.isfinite(model_input).all():
            raise InputError("NaN or infinite pixel values")
        low, high = float(model_input.min()), float(model_input.max())
        if low < 0 or high > 1:
            raise InputError(f"values from {low:g} to {high:g} in the (B, 3, {size}, {size}) float layout, which takes pixels "
                             "scaled to [0, 1]; send the encoded file or uint8 pixels 0-255 under `image`")
        return torch.from_numpy(model_input.astype(np.float32))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        x = self._scaled(model_input)
        if x is None:
            x = torch.from_numpy(self.pixels(model_input)).float() / 255.0
        classes = list(self.model.classes)
        probabilities = []
        with torch.no_grad():
            for i in range(0, len(x), 256):
                probabilities.append(torch.softmax(self.model(x[i : i + 256]).float(), dim=1))
        p = torch.cat(probabilities).numpy()
        return pd.DataFrame({
            "class": [classes[k] for k in p.argmax(1)],
            "probabilities": [{c: float(v) for c, v in zip(classes, row)} for row in p],
        })


class _Served(PackagedModel):
    """The loader's model: a refused input becomes MLflow's bad-request error, so the scoring server
    answers 400 with the message instead of a generic one."""

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        try:
            return super().predict(model_input, params)
        except InputError as exc:
            from udaflow.tracking import bad_request

            raise bad_request(str(exc)) from None


def _load_pyfunc(data_path: str) -> PackagedModel:
    """MLflow's pyfunc loader hook (`loader_module: udaflow.models.packaged`)."""
    return _Served(load(Path(data_path)), read_config(Path(data_path)))
