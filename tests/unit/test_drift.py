"""Drift of new target data: the MMD permutation test and the retrain decision."""

from __future__ import annotations

import os

import pytest
import torch

from udaflow import drift
from udaflow.shift import mmd, mmd_test
from udaflow.validators import information_maximization


def _features(n: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)) + offset


def test_mmd_test_matches_a_plain_permutation_loop():
    s, t = _features(30, 0), _features(25, 1, 0.3)
    observed, p = mmd_test(s, t, permutations=60, seed=3, scales=(1.0,))
    assert abs(observed - mmd(s, t)) < 1e-12  # one scale: the evaluation's MMD
    # the same shuffles, one at a time, with the plain estimator on the pooled rows
    import numpy as np

    rng = np.random.default_rng(3)
    z = torch.cat([s, t])
    order = np.argsort(rng.random((60, 55)), axis=1)
    d2 = torch.cdist(z.double(), z.double()).pow(2)
    k = torch.exp(-d2 / d2[d2 > 0].median())
    count = 0
    for row in order:
        a, b = row[:30], row[30:]
        value = k[a][:, a].mean() + k[b][:, b].mean() - 2 * k[a][:, b].mean()
        count += int(value >= observed - 1e-12)
    assert p == (1 + count) / 61


def test_same_distribution_is_not_significant_and_a_shift_is():
    same = mmd_test(_features(200, 0), _features(200, 1), permutations=200)
    moved = mmd_test(_features(200, 0), _features(200, 1, 0.5), permutations=200)
    assert same[1] > 0.05
    assert moved[1] == 1 / 201  # no shuffle comes near the observed MMD
    assert moved[0] > 5 * same[0]


def _logits(n: int, seed: int, confident: bool) -> torch.Tensor:
    labels = torch.arange(n) % 4
    scale = 8.0 if confident else 0.5
    return torch.nn.functional.one_hot(labels, 4).float() * scale + 0.1 * torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


def _decide(new_features, new_logits):
    reference = (_features(200, 0), _logits(200, 0, True))
    return drift.measure(reference, (new_features, new_logits), information_maximization, "im",
                         alpha=0.01, min_pad=0.2, validator_drop=0.05, permutations=200)


def test_retrain_only_on_a_significant_shift_or_a_validator_drop():
    unshifted = _decide(_features(200, 1), _logits(200, 1, True))
    assert not unshifted.retrain and not unshifted.significant and not unshifted.validator_dropped
    assert unshifted.reason.startswith("no shift") and unshifted.pad < 0.2

    shifted = _decide(_features(200, 1, 1.0), _logits(200, 1, True))
    assert shifted.retrain and shifted.significant and shifted.pad >= 0.2 and shifted.mmd_p_value < 0.01
    assert shifted.reason.startswith("shift:") and shifted.pad_p_value < 1e-6 < 0.05 < unshifted.pad_p_value

    unsure = _decide(_features(200, 1), _logits(200, 1, False))  # same features, the champion lost its confidence
    assert unsure.retrain and not unsure.significant and unsure.validator_dropped
    assert unsure.validator_drop > 0.05 and "fell" in unsure.reason and unsure.validator_p_value == 1 / 201
    assert unsure.figures()["drift.validator_p_value"] == 1 / 201 and unshifted.validator_p_value == 1.0
    assert unsure.figures()["drift.retrain"] == 1.0 and unshifted.figures()["drift.retrain"] == 0.0


def test_samples_of_unequal_size_from_one_distribution_are_not_a_shift():
    """A small reference against a larger new sample: the domain classifier must not win by size alone."""
    for n_ref in (40, 120, 300):
        report = drift.measure((_features(n_ref, 0), _logits(n_ref, 0, True)), (_features(500, 1), _logits(500, 1, True)),
                               information_maximization, "im", alpha=0.01, min_pad=0.2, validator_drop=0.05, permutations=200)
        assert not report.retrain and report.n_reference == report.n_new == n_ref, report.reason
        assert report.pad_p_value > 0.005


def _mixed_logits(n: int, seed: int, k: int = 4) -> torch.Tensor:
    """A champion's logits on n images of one distribution: a random class each, confidence varying by image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    scale = 0.5 + 7.5 * torch.rand(n, 1, generator=g)
    return torch.nn.functional.one_hot(labels, k).float() * scale + 0.3 * torch.randn(n, k, generator=g)


def test_a_validator_drop_within_chance_on_small_samples_is_no_retrain():
    """IM on 40 images moves by chance (its marginal entropy with the sample's class mix): new samples of
    the same distribution fell by more than validator_drop in a third of these draws, each a retrain before
    the drop was tested. Now none is; the reason says the drop was within chance."""
    reference = (_features(40, 0), _mixed_logits(40, 0))
    over_threshold = 0
    for seed in range(1, 31):
        # the same features on both sides: only the validator can call for a retrain here
        report = drift.measure(reference, (_features(40, 0), _mixed_logits(40, seed)), information_maximization, "im",
                               alpha=0.01, min_pad=0.2, validator_drop=0.05, permutations=200)
        if report.validator_drop > 0.05:
            over_threshold += 1
            assert 0.005 <= report.validator_p_value <= 1 and "within chance" in report.reason, report.reason
        assert not report.validator_dropped and not report.retrain, report.reason
    assert over_threshold >= 6


def test_the_validator_drop_test_on_known_samples():
    same = _mixed_logits(60, 1)
    # a sample against itself: the observed drop is 0, and about half the random splits fall at least as far
    assert 0.3 < drift.validator_drop_test(same, same.clone(), information_maximization, permutations=200) < 0.7
    # confident against unsure: no random split of the pool comes near, so p is the smallest a test of 200 gives
    confident, unsure = _logits(200, 0, True), _logits(200, 1, False)
    assert drift.validator_drop_test(confident, unsure, information_maximization, permutations=200) == 1 / 201
    # one-sided: the new sample more confident than the reference is no drop
    assert drift.validator_drop_test(unsure, confident, information_maximization, permutations=200) == 1.0
    # seeded: the same splits each time
    a, b = _mixed_logits(40, 2), _mixed_logits(40, 3)
    assert drift.validator_drop_test(a, b, information_maximization, permutations=100, seed=4) == \
        drift.validator_drop_test(a, b, information_maximization, permutations=100, seed=4)


def test_too_few_permutations_for_alpha_is_a_config_error():
    import pytest

    from udaflow.config import DriftConfig

    with pytest.raises(ValueError, match="cannot give a p-value under alpha / 2"):
        DriftConfig(permutations=100, alpha=0.01)
    assert DriftConfig(permutations=200, alpha=0.01).permutations == 200


def test_an_unreachable_registry_during_ingest_still_announces_the_new_data(tmp_path, monkeypatch, capsys):
    """`udaflow data ingest` has versioned and pushed the data when it measures drift: a registry it
    cannot read (a server down, a run garbage-collected) is a warning and an 'unmeasured' verdict, which
    retrains, not a traceback that loses the data trigger (a re-ingest of the same folder is 'unchanged')."""
    from mlflow.exceptions import MlflowException

    from udaflow import cli, tracking
    from udaflow.config import Config

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")
    cfg = Config.model_validate({"tracking": {"uri": f"sqlite:///{store}", "artifact_root": str(tmp_path / "artifacts")}})

    def unreachable(target):
        raise MlflowException("API request to http://mlflow:5000 failed: connection refused")

    monkeypatch.setattr(tracking, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "models_for_target", unreachable)
    assert cli._drift(cfg, "my-camera", "0" * 32) == ("unmeasured", {}, {})
    assert "warning: the models targeting 'my-camera' could not be listed" in capsys.readouterr().err

    def log_fails(*args, **kwargs):
        raise MlflowException("run deleted")

    monkeypatch.setattr(tracking, "models_for_target", lambda target: ["synth"])
    monkeypatch.setattr("udaflow.steps.drift", lambda cfg: type("R", (), {"figures": lambda self: {}, "as_dict": lambda self: {}})())
    monkeypatch.setattr(tracking, "log_drift", log_fails)
    assert cli._drift(cfg, "my-camera", "0" * 32) == ("unmeasured", {}, {"udaflow-synth-to-my-camera": "unmeasured"})
    assert "warning: drift vs udaflow-synth-to-my-camera not measured (MlflowException: run deleted)" in capsys.readouterr().err


def test_each_model_targeting_new_data_gets_its_own_verdict(tmp_path, monkeypatch):
    """Two sources adapted to one target: the new data is shifted for one model's champion and not for the
    other's. The event fires (one shifted), and carries each model's verdict, so the unshifted one's retrain
    skips (flows/retrain.py) instead of registering a challenger its own drift check said was not needed."""
    from udaflow import cli, tracking
    from udaflow.config import Config

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")
    cfg = Config.model_validate({"tracking": {"uri": f"sqlite:///{store}", "artifact_root": str(tmp_path / "artifacts")}})

    class Report:
        def __init__(self, retrain):
            self.retrain, self.reason = retrain, "shifted" if retrain else "same distribution"
            self.n_reference = self.n_new = 100
            self.pad = self.mmd = self.mmd_p_value = self.validator_reference = self.validator_new = 0.5
            self.validator = "im"

        def figures(self):
            return {"drift.pad": self.pad}

        def as_dict(self):
            return {}

    monkeypatch.setattr(tracking, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "models_for_target", lambda target: ["mnist", "synth"])
    monkeypatch.setattr("udaflow.steps.drift", lambda shift_cfg: Report(shift_cfg.source == "synth"))
    monkeypatch.setattr(tracking, "log_drift", lambda *a, **k: "run-id")
    verdict, figures, per_model = cli._drift(cfg, "my-camera", "0" * 32)
    assert verdict == "shifted" and set(figures) == {"udaflow-mnist-to-my-camera", "udaflow-synth-to-my-camera"}
    assert per_model == {"udaflow-mnist-to-my-camera": "unshifted", "udaflow-synth-to-my-camera": "shifted"}
    # what the ingest prints: not "its scheduled retrains will run" when one of them skips on its own verdict
    assert cli._retrain_outlook(verdict, per_model) == ("the scheduled retrains of udaflow-synth-to-my-camera (shifted) will run; "
                                                        "udaflow-mnist-to-my-camera saw no shift: theirs skip")
    assert cli._retrain_outlook("no-champion", {"a": "no-champion", "b": "unshifted"}) == \
        "the scheduled retrains of a (no-champion) will run; b saw no shift: theirs skip"
    assert cli._retrain_outlook("shifted", {"a": "shifted"}) == "its scheduled retrains will run"
    assert cli._retrain_outlook("unshifted", {"a": "unshifted"}) == "no shift: its scheduled retrains stay idle"


def test_a_new_target_version_with_a_class_its_source_lacks_is_named_per_model(tmp_path, monkeypatch, capsys):
    """A target replaced without --source is validated alone: a class the source lacks went through, and
    the retrain this ingest triggers then refused the target. The ingest now warns, naming the class,
    the source and the model, for each model targeting it (its version stays: the user may extend the source next)."""
    from udaflow import cli, tracking
    from udaflow.config import Config
    from udaflow.data.manifest import ManifestRow, write_manifest

    root = tmp_path / "raw"
    for domain, classes in (("synth", "0123"), ("mnist", "012"), ("cam", "0123x")):
        (root / domain).mkdir(parents=True)
        write_manifest(root / domain, [ManifestRow(f"{c}/{i}.png", c, "train", f"{domain}{c}{i}", 8, 8, "L", True)
                                       for c in classes for i in range(2)])
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")
    cfg = Config.model_validate({"data": {"root": str(root)},
                                 "tracking": {"uri": f"sqlite:///{store}", "artifact_root": str(tmp_path / "artifacts")}})
    monkeypatch.setattr(tracking, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "models_for_target", lambda target: ["mnist", "synth"])
    monkeypatch.setattr("udaflow.steps.drift", lambda shift_cfg: None)
    cli._drift(cfg, "cam", "0" * 32)
    err = " ".join(capsys.readouterr().err.split())
    assert "class(es) '3', 'x' of 'cam' are not among source 'mnist''s classes: udaflow-mnist-to-cam's retrains will refuse" in err
    assert "class(es) 'x' of 'cam' are not among source 'synth''s classes: udaflow-synth-to-cam's" in err
    assert "--source synth" in err and err.count("warning:") == 2
    write_manifest(root / "cam", [ManifestRow(f"{c}/0.png", c, "train", f"cam{c}", 8, 8, "L", True) for c in "012"])
    cli._drift(cfg, "cam", "0" * 32)
    assert "warning" not in capsys.readouterr().err  # every class known to both sources: nothing to say


def test_a_drift_run_cut_short_claims_no_decision_and_can_be_ended_killed(tmp_path, monkeypatch):
    """log_drift writes the decision last and tags host and pid: a drift run killed while it logs its
    report says no decision, and the next run on the host ends it KILLED (until 2026-12-04 it held
    `drift.decision` from its first write and stayed RUNNING for good)."""
    import mlflow

    from udaflow import tracking

    tracking.configure(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts")  # keeps os.environ as it was
    report = {"retrain": True, "reason": "shifted"}
    done = mlflow.get_run(tracking.log_drift("synth", "cam", "1" * 32, {"drift.pad": 0.4}, report))
    assert done.info.status == "FINISHED" and done.data.tags["drift.decision"] == "retrain"
    assert done.data.tags["udaflow.pid"] == str(os.getpid()) and done.data.metrics["drift.pad"] == 0.4

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "log_artifact", killed)
    with pytest.raises(KeyboardInterrupt):
        tracking.log_drift("synth", "cam", "2" * 32, {"drift.pad": 0.5}, report)
    [cut] = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`dvc.target.md5` = '" + "2" * 32 + "'", output_format="list")
    assert cut.info.status == "RUNNING" and "drift.decision" not in cut.data.tags
    client = mlflow.MlflowClient()
    client.set_tag(cut.info.run_id, "udaflow.pid", "999999999")  # its process gone
    assert tracking.end_runs_of_dead_processes(cut.info.experiment_id) == [cut.info.run_id]
    assert client.get_run(cut.info.run_id).info.status == "KILLED"
