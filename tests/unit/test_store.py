"""Decoded images as a file of rows (store.ImageFile): it indexes like the uint8 tensor it replaces,
is named by content and size, and training on it gives the bits training in memory gives."""

import gc
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from udaflow.data.datasets import Domain, load_shift
from udaflow.data.domains import build_domain
from udaflow.data.store import ImageFile, digest


def test_an_image_file_indexes_like_the_tensor(tmp_path):
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    store = ImageFile.build(tmp_path / "rows.u8", iter(images.numpy()), n=10, size=8, key="k")
    assert len(store) == 10 and store.shape == (10, 3, 8, 8)
    for key in (3, -1, slice(2, 7), slice(None, None, 3), torch.tensor([9, 0, 0, 4]), [1, 2], torch.tensor(5), slice(8, 20)):
        assert torch.equal(store[key], images[key]), key
    with pytest.raises(IndexError):
        store[10]
    with pytest.raises(IndexError):
        store[torch.tensor([0, 10])]
    again = pickle.loads(pickle.dumps(store))  # a rank or a task opens its own descriptor
    assert torch.equal(again[torch.tensor([4, 2])], images[[4, 2]]) and again.key == "k"
    with pytest.raises(ValueError, match="expected 11 images, decoded 10"):
        ImageFile.build(tmp_path / "short.u8", iter(images.numpy()), n=11, size=8)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "short.u8").exists()

    def undecodable():  # a probe's truncated image, met while the cache file was being written
        yield images[0].numpy()
        raise OSError("image file is truncated")

    with pytest.raises(OSError, match="truncated"):
        ImageFile.build(tmp_path / "broken.u8", undecodable(), n=2, size=8)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "broken.u8").exists()
    (tmp_path / "torn.u8").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not a whole number"):
        ImageFile(tmp_path / "torn.u8", 8)


def test_a_refused_file_leaves_nothing_for_the_finaliser(tmp_path, monkeypatch):
    # a file refused in __init__ must not make __del__ raise (it read a descriptor never set)
    unraised = []
    monkeypatch.setattr(sys, "unraisablehook", unraised.append)
    (tmp_path / "torn.u8").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not a whole number"):
        ImageFile(tmp_path / "torn.u8", 8)
    with pytest.raises(FileNotFoundError):
        ImageFile(tmp_path / "missing.u8", 8)
    gc.collect()
    assert [u.exc_value for u in unraised] == []


def test_a_domain_is_decoded_once_per_content_and_size(tmp_path):
    root = tmp_path / "data"
    build_domain("synth", root, seed=0, synth_size=40)
    build_domain("mnist", root, seed=0)
    cache = tmp_path / "cache"
    in_memory = load_shift(root, "synth", "mnist", 16, "transductive")
    streamed = load_shift(root, "synth", "mnist", 16, "transductive", cache)
    for a, b in ((in_memory.source_train, streamed.source_train), (in_memory.target_adapt, streamed.target_adapt)):
        assert isinstance(b.images, ImageFile) and torch.equal(a.images[:], b.images[:])
    # transductive: the pool and the evaluation set are the same rows, one file
    assert streamed.target_adapt.images.path == streamed.target_eval.images.path
    files = sorted(cache.glob("*.u8"))
    assert len(files) == 3  # synth train, synth test, mnist all
    mtimes = [f.stat().st_mtime_ns for f in files]
    load_shift(root, "synth", "mnist", 16, "transductive", cache)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # reused, not decoded again
    load_shift(root, "synth", "mnist", 24, "transductive", cache)
    assert len(list(cache.glob("*.u8"))) == 6  # another size, other files
    # new content under the same name: a file of its own
    domain = Domain.open(root, "mnist")
    row = domain.rows[0]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "mnist" / row.path)
    changed = [r if r is not row else type(row)(**{**row.__dict__, "sha256": "0" * 64}) for r in domain.rows]
    other = Domain("mnist", domain.root, tuple(changed)).pixels(changed, 16, cache)
    assert other.path not in files and digest(other) != digest(streamed.target_adapt.images)


@pytest.mark.parametrize("method", ["dann", "adamatch"])
def test_training_on_the_file_gives_the_bits_of_training_in_memory(method, tmp_path, make_train_config):
    from udaflow import engine
    from udaflow.data.datasets import LabelledImages, UnlabelledImages
    from udaflow.methods import create_method
    from udaflow.models import build_classifier

    from conftest import CLASSES, colour_images

    xs, ys = colour_images(60, seed=0)
    xt, _ = colour_images(60, seed=1, shift=20.0)
    files = [ImageFile.build(tmp_path / f"{n}.u8", iter(x.numpy()), len(x), x.shape[-1]) for n, x in (("s", xs), ("t", xt))]
    states = []
    for s_images, t_images in ((xs, xt), tuple(files)):
        torch.manual_seed(0)
        clf = build_classifier("udaflow_vit_micro", 3)
        cfg = make_train_config(rotation_weight=0.5)
        result = engine.train(clf, create_method(method, clf, {}), LabelledImages(s_images, ys, CLASSES, "s"), UnlabelledImages(t_images, "t"),
                              cfg, steps=12, lr=cfg.adapt_lr, seed=0, auxiliary=True)
        states.append(result)
    assert states[0].validator_history == states[1].validator_history
    assert all(torch.equal(states[0].last_state[k], states[1].last_state[k]) for k in states[0].last_state)
