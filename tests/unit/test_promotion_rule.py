"""The promotion gate's rule on hand-made measurements (both versions measured on the same data)."""

import math

import pytest

from udaflow.promotion import Measurement, Recorded, decide, prediction_diversity


def m(version, validator=0.5, source=99.0, diversity=0.9, target_val=None):
    return Measurement(version, validator, source, diversity, target_val)


def gate(challenger, champion=None, recorded=None, tolerance=1.0):
    return decide(challenger, champion, "im", tolerance, 0.5, recorded, data="the pool")


GOOD_FIRST = Recorded(validator=0.8, source_only_validator=0.6, source_only_source_val_acc=99.5)


def test_first_version_must_beat_its_own_source_only_model():
    d = gate(m("1", source=99.0), recorded=GOOD_FIRST)
    assert d.promote and d.criterion == "first" and "beats its source-only" in d.reason and d.data == "the pool"
    d = gate(m("1"), recorded=Recorded(0.6, 0.6, 99.0))  # equal is not better
    assert not d.promote and "does not beat its source-only model's 0.6" in d.reason
    d = gate(m("1", source=97.0), recorded=GOOD_FIRST)  # 2.5 points below its source-only model on source val
    assert not d.promote and "2.50 points below its source-only" in d.reason
    d = gate(m("1"), recorded=Recorded(0.8, None, None))  # nothing to check it against: refused, not waved through
    assert not d.promote and "no recorded validator.im" in d.reason


def test_collapsed_challenger_is_refused_first_or_not():
    d = gate(m("1", diversity=0.2), recorded=GOOD_FIRST)
    assert not d.promote and d.criterion == "collapse" and "0.200 < 0.5" in d.reason
    d = gate(m("2", validator=0.99, diversity=0.3), m("1", validator=0.1))
    assert not d.promote and d.criterion == "collapse"


def test_target_val_split_decides_when_measured_on_both():
    d = gate(m("2", validator=0.1, target_val=81.0), m("1", validator=0.9, target_val=80.0))
    assert d.promote and d.criterion == "target_val_acc"
    d = gate(m("2", validator=0.9, target_val=79.0), m("1", validator=0.1, target_val=80.0))
    assert not d.promote and d.criterion == "target_val_acc" and "79" in d.reason
    assert ("target_val_acc", "80", "79") in d.rows


def test_validator_decides_without_a_val_split():
    d = gate(m("2", validator=0.7), m("1", validator=0.6))
    assert d.promote and d.criterion == "validator.im" and ("validator.im", "0.6", "0.7") in d.rows
    assert not gate(m("2", validator=0.5), m("1", validator=0.6)).promote
    assert gate(m("2", validator=0.6), m("1", validator=0.6)).promote  # ties go to the newer version


def test_source_accuracy_drop_beyond_tolerance_blocks():
    d = gate(m("2", validator=0.9, source=97.5), m("1", validator=0.1, source=99.0))
    assert not d.promote and "dropped 1.50" in d.reason
    assert gate(m("2", validator=0.9, source=98.5), m("1", validator=0.1, source=99.0)).promote


def test_same_version_is_a_no_op():
    d = gate(m("3"), m("3"))
    assert not d.promote and d.criterion == "same"


def test_prediction_diversity():
    assert prediction_diversity([0, 1, 2, 3] * 5, 4) == pytest.approx(1.0)
    assert prediction_diversity([2] * 20, 4) == 0.0
    assert prediction_diversity([0, 0, 1, 1], 4) == pytest.approx(math.log(2) / math.log(4))
    assert prediction_diversity([], 4) == 1.0 and prediction_diversity([0, 0], 1) == 1.0
