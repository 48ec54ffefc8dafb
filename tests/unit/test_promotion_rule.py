"""The promotion gate's rule on hand-made measurements (both versions measured on the same data)."""

import math

import pytest

from udaflow.promotion import Measurement, Recorded, decide, prediction_diversity, two_classes_worth


def m(version, validator=0.5, source=99.0, diversity=0.9, target_val=None, classes=None):
    return Measurement(version, validator, source, diversity, target_val, num_classes=classes)


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


def test_first_version_with_a_labelled_val_split_is_checked_there_not_on_the_validator():
    """A user who labelled a target `val` split: the first version must be at least as accurate there as
    its own source-only model (both recorded at evaluation), whatever the validator says."""
    worse = Recorded(validator=0.9, source_only_validator=0.3, source_only_source_val_acc=99.0, target_val_acc=0.0, source_only_target_val_acc=5.56)
    d = gate(m("1", target_val=0.0), recorded=worse)
    assert not d.promote and d.criterion == "first"
    assert d.reason == "first version: target_val_acc 0 does not reach its source-only model's 5.56 on the target's val split"
    assert ("target_val_acc at evaluation (source-only | adapted)", "5.56", "0") in d.rows
    tie = Recorded(0.1, 0.9, 99.0, target_val_acc=80.0, source_only_target_val_acc=80.0)  # a worse validator, the same val accuracy
    d = gate(m("1", target_val=80.0), recorded=tie)
    assert d.promote and "target_val_acc 80 reaches its source-only model's 80 on the target's val split" in d.reason
    d = gate(m("1", source=97.0, target_val=90.0), recorded=Recorded(0.1, 0.9, 99.5, 90.0, 60.0))  # source val still guarded
    assert not d.promote and "2.50 points below its source-only" in d.reason


def test_first_version_evaluated_before_its_val_split_existed_falls_back_to_the_validator_and_says_so():
    d = gate(m("1", target_val=70.0), recorded=GOOD_FIRST)
    assert d.promote and "validator.im 0.8 beats its source-only model's 0.6 on the pool it adapted on" in d.reason
    assert d.data == "the pool; but this first version recorded no val accuracy at its evaluation: its validator.im against its source-only model's decided"


def test_collapsed_challenger_is_refused_first_or_not():
    d = gate(m("1", diversity=0.2), recorded=GOOD_FIRST)
    assert not d.promote and d.criterion == "collapse" and "0.200 < 0.5" in d.reason
    d = gate(m("2", validator=0.99, diversity=0.3), m("1", validator=0.1))
    assert not d.promote and d.criterion == "collapse"


def test_the_collapse_bar_scales_with_the_source_models_spread_on_the_pool():
    """A target holding 3 of the source's 28 classes: a perfect model's diversity is log 3 / log 28 = 0.33, and the
    absolute bar of 0.5 called it collapsed (a probe's flat 3-class target could never get a champion). The bar is
    now min_diversity x the source-only model's diversity on the same pool (recorded at evaluation)."""
    perfect = prediction_diversity([0, 1, 2] * 20, 28)
    assert perfect == pytest.approx(math.log(3) / math.log(28))
    spread = prediction_diversity([0, 1, 2, 3, 4, 5] * 10, 28)  # the source model, unadapted: 6 classes on the 3-class pool
    recorded = Recorded(0.8, 0.6, 99.5, source_only_diversity=spread)
    d = gate(m("1", diversity=perfect), recorded=recorded)
    assert d.promote and d.criterion == "first", d.reason
    d = gate(m("2", validator=0.9, diversity=perfect), m("1", validator=0.8), recorded=recorded)  # against a champion alike
    assert d.promote and d.criterion == "validator.im", d.reason
    d = gate(m("1", diversity=0.1), recorded=recorded)  # one class for nearly all: collapsed still
    assert not d.promote and d.criterion == "collapse"
    assert d.reason == f"collapsed: prediction diversity 0.100 < 0.5 x its source-only model's {spread:.3f} = {0.5 * spread:.3f} on the target pool"
    d = gate(m("1", diversity=perfect), recorded=GOOD_FIRST)  # a version registered before the record: the absolute bar
    assert not d.promote and d.reason == f"collapsed: prediction diversity {perfect:.3f} < 0.5 on the target pool"


def test_a_source_model_that_predicts_one_class_does_not_switch_the_collapse_check_off():
    """A probe's weak source model predicted one class on the whole pool (recorded diversity 0.0): the bar
    0.5 x 0 = 0 let a one-class challenger (10% accuracy, diversity 0) through as the first champion, "not
    collapsed", and skipped the check against a champion. The record counts for two classes' worth at least."""
    two = math.log(2) / math.log(10)
    assert two_classes_worth(10) == pytest.approx(two) and two_classes_worth(2) == 1.0 and two_classes_worth(None) == 0.0
    flat = Recorded(0.011, 0.002, 10.1, source_only_diversity=0.0)
    d = gate(m("1", validator=0.011, source=10.1, diversity=0.0, classes=10), recorded=flat)
    assert not d.promote and d.criterion == "collapse"
    assert d.reason == (f"collapsed: prediction diversity 0.000 < 0.5 x {two:.3f} = {0.5 * two:.3f} (two classes' worth: "
                        "its source-only model's 0.000 shows fewer on the pool) on the target pool")
    d = gate(m("2", validator=0.9, diversity=0.0, classes=10), m("1", validator=0.1), recorded=flat)  # against a champion too
    assert not d.promote and d.criterion == "collapse"
    d = gate(m("1", validator=0.011, diversity=0.2, classes=10), recorded=flat)  # spread over two classes or so: judged on
    assert d.promote and d.criterion == "first", d.reason
    # a source model that shows more than two classes keeps its own bar (the 3-of-28-class target above)
    three = prediction_diversity([0, 1, 2] * 20, 28)
    d = gate(m("1", diversity=three, classes=28), recorded=Recorded(0.8, 0.6, 99.5, source_only_diversity=three))
    assert d.promote, d.reason
    d = gate(m("1", diversity=0.0, classes=2), recorded=Recorded(0.8, 0.6, 99.5, source_only_diversity=0.0))  # two classes: 0.5
    assert not d.promote and "< 0.5 x 1.000 = 0.500" in d.reason


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


def test_a_challenger_recorded_with_swapped_classes_is_refused_unless_a_val_split_decides():
    """shift.class_swaps flagged a pair at evaluation: no label-free score would see it, so the gate refuses the
    version, first or not. Accuracy on a labelled target val split sees a swap itself: there it decides."""
    swapped = Recorded(0.8, 0.6, 99.5, class_swaps=(("2", "7"),))
    d = gate(m("1"), recorded=swapped)
    assert not d.promote and d.criterion == "class_swap" and d.reason.startswith("classes look swapped: 2<->7 (")
    assert ("class swaps at evaluation", "-", "2<->7") in d.rows
    d = gate(m("2", validator=0.9), m("1", validator=0.1), recorded=Recorded(0.9, 0.1, 99.0, class_swaps=(("a", "b"), ("c", "d"))))
    assert not d.promote and "a<->b, c<->d" in d.reason
    # a labelled val split decides: the first version on its recorded val accuracy, a later one on both versions' now
    on_val = Recorded(0.8, 0.6, 99.5, target_val_acc=90.0, source_only_target_val_acc=60.0, class_swaps=(("2", "7"),))
    assert gate(m("1", target_val=90.0), recorded=on_val).promote
    d = gate(m("2", target_val=81.0), m("1", target_val=80.0), recorded=Recorded(0.9, 0.1, 99.0, class_swaps=(("2", "7"),)))
    assert d.promote and d.criterion == "target_val_acc"
    # a val split now, none recorded at evaluation: the validator would decide, so the flag still refuses
    assert gate(m("1", target_val=90.0), recorded=swapped).criterion == "class_swap"
    # nothing flagged, or not recorded (a version from before the check): the rule as before
    clean = gate(m("1"), recorded=Recorded(0.8, 0.6, 99.5, class_swaps=()))
    assert clean.promote and ("class swaps at evaluation", "-", "none") in clean.rows
    assert gate(m("1"), recorded=GOOD_FIRST).promote and all(r[0] != "class swaps at evaluation" for r in gate(m("1"), recorded=GOOD_FIRST).rows)
