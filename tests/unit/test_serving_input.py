"""What the registered model accepts from a client, and what it refuses (before any HTTP)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from udaflow.models import build_classifier
from udaflow.models.heads import ImageClassifier
from udaflow.models.packaged import InputError, PackagedModel


@pytest.fixture(scope="module")
def model() -> PackagedModel:
    torch.manual_seed(0)
    classifier = build_classifier("udaflow_vit_micro", 3, None)
    config = {"backbone": "udaflow_vit_micro", "backbone_args": {}, "image_size": 32}
    return PackagedModel(ImageClassifier(classifier, ("a", "b", "c")).eval(), config)


def _png(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue()


def same(p: dict, q: dict) -> bool:
    """Equal up to float rounding (a batch of another size sums in another order)."""
    return p.keys() == q.keys() and all(abs(p[k] - q[k]) < 1e-6 for k in p)


def test_files_and_pixels_of_any_size_give_the_same_answer(model):
    rng = np.random.default_rng(0)
    small, photo = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    frame = pd.DataFrame({"image": [base64.b64encode(_png(small)).decode(), _png(photo), small.tolist(), photo, photo[:, :, 0]]})
    out = model.predict(frame)
    assert list(out.columns) == ["class", "probabilities"] and len(out) == 5
    assert out["probabilities"][0] == out["probabilities"][2] and out["probabilities"][1] == out["probabilities"][3]
    assert all(abs(sum(p.values()) - 1) < 1e-5 and set(p) == {"a", "b", "c"} for p in out["probabilities"])
    # the same forms as the scoring server hands them over
    assert same(model.predict({"image": [small.tolist()]})["probabilities"][0], out["probabilities"][0])
    assert same(model.predict([{"image": np.array(base64.b64encode(_png(small)).decode())}])["probabilities"][0], out["probabilities"][0])
    assert same(model.predict(np.stack([small, small]))["probabilities"][1], out["probabilities"][0])
    # pixels are decoded exactly as a file of the same pixels: the model's own resize, then its normalisation
    grey = photo[:, :, 0]
    pair = model.predict({"image": [grey, _png(grey)]})["probabilities"]
    assert pair[0] == pair[1]


@pytest.mark.parametrize("value, needle", [
    (np.full((8, 8), np.nan), "NaN"),
    (np.full((8, 8, 3), 127.5), "fractional"),
    (np.full((8, 8), 256), "0-255"),
    (np.full((8, 8), -1), "0-255"),
    (np.zeros((8, 8, 2)), "shape"),
    (np.zeros(5), "shape"),
    ([[1, 2], [3]], "array"),
    ("@@@", "base64"),
    (b"GIF89a but not really", "decode"),
    (b"", "0 bytes of no image format it knows"),
    (None, "null, no image"),  # JSON null: it said "rows of different lengths"
    (float("nan"), "null, no image"),  # a record without the key, in a DataFrame with it
    (np.zeros((9000, 2)), "1-8192"),
    (np.eye(8, dtype=np.float32), "only 0 and 1, an image scaled to 0-1"),  # a 0/1 mask: read as 0-255, black
    ({"b64": "iVBORw0KGgo="}, "an object (keys ['b64']); send the base64 string itself"),  # TF Serving's wrapper
    ("iVBORw0KGgo+_", "not base64"),  # the two alphabets mixed
    ("a", "not base64"),  # one character: no byte
    (_png(np.zeros((2, 9000), np.uint8)), "a 9000x2 image file; each side must be 1-8192"),  # refused from its header, undecoded
])
def test_out_of_range_or_malformed_images_are_refused_by_index(model, value, needle):
    with pytest.raises(InputError) as err:
        model.predict({"image": [np.zeros((4, 4), np.uint8), value]})
    assert str(err.value).startswith("image 1:") and needle in str(err.value)


def test_base64_without_padding_url_safe_or_as_a_memoryview_is_the_same_image(model):
    """Web clients send base64 without its '=' padding or in the URL-safe alphabet (- and _), and Python
    clients a memoryview of the file: each was refused ("not base64", or "an array of shape [286]")."""
    rng = np.random.default_rng(1)
    files = {}  # one file per length mod 3: base64 pads them with 0, 2 and 1 '='
    while len(files) < 3:
        data = _png(rng.integers(0, 256, (int(rng.integers(20, 40)), 32, 3), dtype=np.uint8))
        files.setdefault(len(data) % 3, data)
    for data in files.values():
        std, url = base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()
        forms = [std, std.rstrip("="), url, url.rstrip("="), memoryview(data)]
        out = model.predict({"image": forms})["probabilities"]
        assert all(same(p, out[0]) for p in out[1:]), len(data) % 3
    assert any(c in base64.b64encode(d).decode() for d in files.values() for c in "+/")  # the two alphabets differ here


def test_a_request_without_images_is_refused(model):
    with pytest.raises(InputError, match="no 'image' column"):
        model.predict(pd.DataFrame({"picture": ["x"]}))
    with pytest.raises(InputError, match="no images"):
        model.predict({"image": []})


def test_the_scaled_float_layout_of_earlier_versions_is_checked_not_trusted(model):
    """Versions registered before took decoded pixels (B, 3, S, S) scaled to [0, 1]; their signature
    still asks for it. In range it answers as the same uint8 pixels do; unscaled 0-255 floats (200 and
    14% accuracy before) and NaN are refused."""
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    scaled = (pixels.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    out, reference = model.predict(scaled), model.predict(pixels)
    assert list(out["class"]) == list(reference["class"]) and all(same(p, q) for p, q in zip(out["probabilities"], reference["probabilities"]))
    with pytest.raises(InputError, match=r"values from 0 to 255 .* scaled to \[0, 1\]"):
        model.predict(scaled * 255.0)
    with pytest.raises(InputError, match="NaN"):
        model.predict(np.full((1, 3, 32, 32), np.nan, np.float32))


def test_a_refused_request_is_answered_with_its_reason_not_the_request(model):
    """MLflow's scoring server rewrote a predict error's message to `Failed to predict data '<the whole
    request>'...`: a client got every pixel it sent back, the reason at the end. The served model's
    error keeps its own message."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel, scoring_server

    from udaflow.models.packaged import _Served

    served = PyFuncModel(model_meta=Model(), model_impl=_Served(model.model, model.config))
    pixels = np.full((600, 600), 300).tolist()  # about 2 MB of JSON
    body = json.dumps({"inputs": [{"image": np.zeros((4, 4), int).tolist()}, {"image": pixels}]})
    with pytest.raises(MlflowException) as err:
        scoring_server.invocations(body, "application/json", served, None)
    answer = json.loads(err.value.serialize_as_json())
    assert answer["message"] == "image 1: pixel values from 300 to 300; uint8 pixels are 0-255", answer["message"][:300]
    assert err.value.get_http_status_code() == 400


def _served_with_signature(model):
    """The served model as `mlflow models serve` loads a registered version: its signature enforced."""
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel

    from udaflow.models.packaged import _Served
    from udaflow.tracking import _signature

    return PyFuncModel(model_meta=Model(signature=_signature()), model_impl=_Served(model.model, model.config))


def test_a_column_of_files_is_read_in_python_and_over_http(model):
    """MLflow's schema check turns a dict whose values are lists of strings into one row holding the
    list: `mlflow.pyfunc.load_model(...).predict({"image": [<b64>, <b64>]})` was refused ("pixels must
    be numbers 0-255 (got str... values)"), and an empty column was "an array of shape [0]". Each form
    now gets the records form's answer, and an empty one "no images"."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    served = _served_with_signature(model)
    rng = np.random.default_rng(2)
    files = [base64.b64encode(_png(rng.integers(0, 256, (28, 28), dtype=np.uint8))).decode() for _ in range(3)]

    def answer(body: dict) -> list:
        response = scoring_server.invocations(json.dumps(body), "application/json", served, None)
        assert response.status == 200, response.response
        return json.loads(response.response)["predictions"]

    records = answer({"inputs": [{"image": f} for f in files]})
    assert len(records) == 3
    for body in ({"inputs": {"image": files}}, {"dataframe_split": {"columns": ["image"], "data": [[f] for f in files]}},
                 {"dataframe_records": [{"image": f} for f in files]}, {"instances": [{"image": f} for f in files]}):
        assert answer(body) == records, body
    for column in (files, files[:1], [base64.b64decode(f) for f in files]):
        out = served.predict({"image": column})
        assert list(out["class"]) == [r["class"] for r in records[: len(column)]]
    for empty in ({"inputs": {"image": []}}, {"inputs": [{"image": []}]}):
        with pytest.raises(MlflowException) as err:
            scoring_server.invocations(json.dumps(empty), "application/json", served, None)
        assert err.value.get_http_status_code() == 400 and "no images" in err.value.message, err.value.message
    with pytest.raises(MlflowException, match="no images"):
        served.predict({"image": []})
    # nothing at all: MLflow hands the model the empty frame a misnamed column leaves, so the line names both
    for nothing in ({"inputs": []}, {"dataframe_records": []}):
        with pytest.raises(MlflowException) as err:
            scoring_server.invocations(json.dumps(nothing), "application/json", served, None)
        assert err.value.get_http_status_code() == 400 and "or the request held no images" in err.value.message, err.value.message
    # a JSON null among the records reaches the model as a 0-d object array: it said "rows of different lengths"
    with pytest.raises(MlflowException) as err:
        scoring_server.invocations(json.dumps({"inputs": [{"image": files[0]}, {"image": None}]}), "application/json", served, None)
    assert err.value.get_http_status_code() == 400 and err.value.message.startswith("image 1: null, no image"), err.value.message


@pytest.mark.parametrize("body", [{"inputs": [{"Image": "x"}, {"Image": "y"}]}, {"inputs": {"images": ["x", "y"]}},
                                  {"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}])
def test_a_request_without_the_image_column_gets_one_short_line_over_http(model, body):
    """MLflow refused a missing required column itself, as `Failed to predict data '<the whole request>'`:
    777 KB back for 1,000 images posted under `Image`. The column is optional to MLflow now; the model
    refuses the request in one line."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    body = json.loads(json.dumps(body).replace('"x"', json.dumps("A" * 5000)))  # a large request
    with pytest.raises(MlflowException) as err:
        scoring_server.invocations(json.dumps(body), "application/json", _served_with_signature(model), None)
    assert err.value.get_http_status_code() == 400
    assert err.value.message.startswith("no 'image' column (column names are case-sensitive; or the request held no images); send ")
    assert len(err.value.message) < 200


def test_the_registered_example_is_the_model_s_input_not_the_photo_as_stored(model, tmp_path):
    """`steps.serving_example` (the input and serving examples MLflow stores with every version): two photos
    as stored were two copies of each file, 98 MB apiece for 4096 x 3000 PNGs. Now each is a PNG of the
    pixels the model reads, upright: answered as the photo itself is."""
    from udaflow import steps
    from udaflow.config import Config
    from udaflow.data.manifest import ManifestRow, write_manifest

    rng = np.random.default_rng(1)
    root = tmp_path / "raw/cam"
    (root / "a").mkdir(parents=True)
    photos = []
    for i, turn in enumerate((6, 1)):  # a phone's portrait shot (stored turned, EXIF 6) and a plain one
        arr = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = turn
        Image.fromarray(arr).save(root / f"a/{i}.png", exif=exif)
        photos.append((root / f"a/{i}.png").read_bytes())
    write_manifest(root, [ManifestRow(f"a/{i}.png", "a", "train", str(i), 800, 600, "RGB", True) for i in range(2)])
    cfg = Config.model_validate({"data": {"root": str(tmp_path / "raw")}, "target": "cam", "model": {"backbone": "udaflow_vit_micro"}})
    example = steps.serving_example(cfg)
    assert len(example) == 2 and all(len(b64) < 8_000 for b64 in example["image"])  # 1.4 MB each as stored
    for b64, photo in zip(example["image"], photos):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            assert img.size == (32, 32) and img.mode == "RGB" and not img.getexif().get(0x0112)
        assert same(model.predict(pd.DataFrame({"image": [b64]}))["probabilities"][0],
                    model.predict(pd.DataFrame({"image": [base64.b64encode(photo).decode()]}))["probabilities"][0])
