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

`predict` takes float images (B, 3, H, W) in [0, 1] and returns logits (B, K), as a numpy array.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from udaflow.models.heads import ImageClassifier

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
    return model.eval()


class PackagedModel:
    """What `mlflow.pyfunc.load_model` returns the predictions of (through PyFuncModel)."""

    def __init__(self, model: ImageClassifier, config: dict[str, Any]):
        self.model = model
        self.config = config

    def get_raw_model(self) -> ImageClassifier:
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


def _load_pyfunc(data_path: str) -> PackagedModel:
    """MLflow's pyfunc loader hook (`loader_module: udaflow.models.packaged`)."""
    return PackagedModel(load(Path(data_path)), read_config(Path(data_path)))
