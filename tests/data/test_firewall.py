"""The label firewall: training code can never see target labels; bad target data fails clearly."""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from pathlib import Path

import pytest
import torch

from udaflow import engine
from udaflow.data.datasets import Domain, LabelledImages, ShiftData, UnlabelledImages, load_oracle_data, load_shift
from udaflow.data.domains import CLASSES, build_domain
from udaflow.data.manifest import DataError, describe_image, read_manifest, write_manifest
from udaflow.methods import get_method_class, list_methods
from udaflow.methods.base import Batch, Method, StepContext


@pytest.fixture(scope="module")
def built_root(tmp_path_factory) -> Path:
    """A data root with two tiny synth domains rendered with different seeds: 'synth' and 'synth2'."""
    root = tmp_path_factory.mktemp("root")
    build_domain("synth", root, seed=0, synth_size=30)
    other = tmp_path_factory.mktemp("other")
    build_domain("synth", other, seed=1, synth_size=30)
    shutil.move(str(other / "synth"), str(root / "synth2"))
    return root


@pytest.fixture
def root(built_root, tmp_path) -> Path:
    """A private copy the test may damage."""
    copy = tmp_path / "root"
    shutil.copytree(built_root, copy)
    return copy


def test_load_shift_types_and_sizes(built_root):
    shift = load_shift(built_root, "synth", "synth2", 32, protocol="holdout")
    assert isinstance(shift, ShiftData)
    assert shift.classes == tuple(CLASSES)
    assert isinstance(shift.source_train, LabelledImages) and isinstance(shift.source_val, LabelledImages)
    # 3 images per class, round(3 * 0.2) = 1 of them held out
    assert len(shift.source_train) == 20 and len(shift.source_val) == 10
    assert shift.source_train.images.shape == (20, 3, 32, 32) and shift.source_train.images.dtype == torch.uint8
    assert type(shift.target_adapt) is UnlabelledImages
    assert len(shift.target_adapt) == 20 and shift.target_adapt.domain == "synth2"
    assert not hasattr(shift.target_adapt, "labels")
    assert {f.name for f in dataclasses.fields(UnlabelledImages)} == {"images", "domain"}
    assert isinstance(shift.target_eval, LabelledImages) and len(shift.target_eval) == 10
    # the two domains really are different renderings
    assert not torch.equal(shift.source_train.images, shift.target_adapt.images)


def test_transductive_adapts_on_every_target_image(built_root):
    shift = load_shift(built_root, "synth", "synth2", 32, protocol="transductive")
    assert len(shift.target_adapt) == len(shift.target_eval) == 30
    assert torch.equal(shift.target_adapt.images, shift.target_eval.images)  # same images, in the same order
    assert not hasattr(shift.target_adapt, "labels")


def test_target_without_labels_loads_for_adaptation(root):
    tgt = root / "synth2"
    write_manifest(tgt, [dataclasses.replace(r, label="") for r in read_manifest(tgt)])
    shift = load_shift(root, "synth", "synth2", 32)
    assert shift.target_eval is None
    assert len(shift.target_adapt) == 20


def test_frozen_unlabelled_images_cannot_grow_labels(built_root):
    shift = load_shift(built_root, "synth", "synth2", 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        shift.target_adapt.labels = torch.zeros(len(shift.target_adapt))  # type: ignore[attr-defined]
    assert shift.source_train.without_labels() == UnlabelledImages(shift.source_train.images, "synth")


def _label_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "target" in f.name and ("label" in f.name or f.name.endswith("_y"))]


def test_batch_and_step_context_carry_no_target_labels():
    assert [f.name for f in dataclasses.fields(Batch)] == ["source", "source_labels", "target", "target_index"]
    assert _label_fields(Batch) == []
    names = {f.name for f in dataclasses.fields(StepContext)}
    assert "source_labels" in names
    assert _label_fields(StepContext) == []
    # the only target-facing members: images by index, label-free embeddings and the pool's size
    assert {n for n in names if "target" in n} == {"target_inputs", "embed_target", "num_target"}


def test_training_signatures_take_unlabelled_target():
    params = inspect.signature(engine.train).parameters
    assert str(params["target"].annotation).replace(" ", "") == "UnlabelledImages|None"
    assert str(params["source"].annotation) == "LabelledImages"
    assert list(inspect.signature(Method.forward).parameters) == ["self", "classifier", "batch", "ctx"]
    assert list(inspect.signature(Method.refresh).parameters) == ["self", "classifier", "ctx"]


def test_only_oracle_uses_target_labels():
    users = [name for name in list_methods() if get_method_class(name).uses_target_labels]
    assert users == ["oracle"]
    assert get_method_class("oracle").uses_target is False


def test_oracle_data_is_the_labelled_target_train_split(built_root):
    shift = load_shift(built_root, "synth", "synth2", 32)
    oracle = load_oracle_data(built_root, "synth2", shift.classes, 32)
    assert isinstance(oracle, LabelledImages) and len(oracle) == 20
    assert torch.equal(oracle.images, shift.target_adapt.images)


def test_unknown_target_class_raises(root):
    tgt = root / "synth2"
    rows = read_manifest(tgt)
    rows[0] = dataclasses.replace(rows[0], label="eleven")
    write_manifest(tgt, rows)
    with pytest.raises(DataError) as info:
        load_shift(root, "synth", "synth2", 32, protocol="transductive")
    assert "eleven" in str(info.value) and "synth2" in str(info.value)


def test_undecodable_png_listed_in_manifest_raises(root):
    tgt = root / "synth2"
    bad = tgt / "3" / "99999.png"
    bad.write_bytes(b"this is not a png at all")
    row = describe_image(bad, tgt, "3", "train")
    assert row.decodable is False
    write_manifest(tgt, [*read_manifest(tgt), row])
    with pytest.raises(DataError) as info:
        load_shift(root, "synth", "synth2", 32)
    assert "3/99999.png" in str(info.value) and "not a decodable image" in str(info.value)
    with pytest.raises(DataError, match="99999.png"):
        Domain.open(root, "synth2").unlabelled("train", 32)


def test_image_corrupted_after_manifest_raises_data_error(root):
    tgt = root / "synth2"
    victim = next(r for r in read_manifest(tgt) if r.split == "train")
    (tgt / victim.path).write_bytes(b"garbage")
    with pytest.raises(DataError, match=victim.path):
        load_shift(root, "synth", "synth2", 32)


def test_same_source_and_target_is_refused(built_root):
    with pytest.raises(DataError, match="both 'synth'"):
        load_shift(built_root, "synth", "synth", 32)
