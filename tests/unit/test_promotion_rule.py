"""The promotion gate's rule on hand-made candidates."""

from udaflow.promotion import Candidate, decide


def c(version, target_acc=None, validator=None, source=99.0):
    return Candidate(version, target_acc, validator, source)


def test_no_champion_is_a_first_promotion():
    d = decide(c("1", 80.0), None, "im", 1.0)
    assert d.promote and d.criterion == "first"


def test_labelled_holdout_decides_when_both_have_it():
    assert decide(c("2", 81.0, validator=0.1), c("1", 80.0, validator=0.9), "im", 1.0).promote
    d = decide(c("2", 79.0, validator=0.9), c("1", 80.0, validator=0.1), "im", 1.0)
    assert not d.promote and d.criterion == "target_acc" and "79" in d.reason


def test_validator_decides_without_target_labels():
    d = decide(c("2", validator=0.7), c("1", validator=0.6), "im", 1.0)
    assert d.promote and d.criterion == "validator.im"
    assert not decide(c("2", validator=0.5), c("1", validator=0.6), "im", 1.0).promote


def test_source_accuracy_drop_beyond_tolerance_blocks():
    d = decide(c("2", 90.0, source=97.5), c("1", 80.0, source=99.0), "im", 1.0)
    assert not d.promote and "dropped 1.50" in d.reason
    assert decide(c("2", 90.0, source=98.5), c("1", 80.0, source=99.0), "im", 1.0).promote


def test_same_version_is_not_promoted_again():
    d = decide(c("3", 90.0), c("3", 90.0), "im", 1.0)
    assert not d.promote and d.criterion == "same"


def test_nothing_comparable_is_not_promoted():
    d = decide(c("2"), c("1"), "im", 1.0)
    assert not d.promote and "cannot compare" in d.reason
