"""The benchmark's selection report and cost figures on known inputs."""

from __future__ import annotations

import pytest

from udaflow.bench import mean_regret, selection_report
from udaflow.costs import training_gflop_per_image
from udaflow.models import build_classifier


def _checkpoint(step, acc, im, ensv, selectable=True):
    return {"step": step, "target_acc": acc, "scores": {"im": im, "ensv": ensv}, "selectable": selectable}


def test_regret_and_median_of_the_last_five():
    checkpoints = [
        _checkpoint(100, 95.0, 9.0, 50.0, selectable=False),  # a warm-up checkpoint: the best, but never selectable
        _checkpoint(200, 80.0, 1.0, 60.0),
        _checkpoint(300, 90.0, 2.0, 99.0),
        _checkpoint(400, 85.0, 3.0, 70.0),
        _checkpoint(500, 70.0, 0.5, 65.0),
        _checkpoint(600, 75.0, 0.1, 80.0),
    ]
    report = selection_report(checkpoints)
    # best selectable is 90 (step 300); im picks step 400 (85), ensv picks step 300 (90)
    assert report["regret"] == {"im": 5.0, "ensv": 0.0}
    assert report["median_last5_target_acc"] == 80.0  # steps 200..600: 80 90 85 70 75
    rows = [{"shift": "a:b", "regret": {"im": 5.0, "ensv": 0.0}}, {"shift": "a:b", "regret": {"im": 1.0, "ensv": 2.0}}, {"shift": "c:d"}]
    assert mean_regret(rows, "a:b") == {"ensv": 1.0, "im": 3.0}


def test_training_flops_per_image_scale_with_width():
    small = training_gflop_per_image(build_classifier("udaflow_vit_micro", 10), 32)
    tiny = training_gflop_per_image(build_classifier("udaflow_vit_tiny", 10), 32)
    tiny2 = training_gflop_per_image(build_classifier("udaflow_vit_tiny2", 10), 32)
    assert 0 < small < tiny < tiny2
    assert tiny == pytest.approx(0.0416, rel=0.01)  # forward + backward at 32 px, the default until 2026-12-01
    assert tiny2 == pytest.approx(0.0425, rel=0.01)  # the default: a wider stem for one block fewer, ~the same FLOPs


def test_seed_summary_is_mean_and_sample_std_per_cell():
    from udaflow.bench import summarise

    rows = [
        {"shift": "a:b", "method": "dann", "seed": 0, "target_acc_last": 90.0, "seconds": 10.0},
        {"shift": "a:b", "method": "dann", "seed": 1, "target_acc_last": 92.0, "seconds": 12.0},
        {"shift": "a:b", "method": "dann", "seed": 2, "target_acc_last": 94.0, "seconds": 11.0},
        {"shift": "a:b", "method": "mcc", "seed": 0, "target_acc_last": 80.0, "seconds": 9.0},
    ]
    dann, mcc = summarise(rows)
    assert dann["seeds"] == 3 and dann["target_acc_last"] == {"mean": 92.0, "std": 2.0} and dann["seconds"]["mean"] == 11.0
    assert mcc["target_acc_last"] == {"mean": 80.0, "std": 0.0} and "median_last5_target_acc" not in mcc
