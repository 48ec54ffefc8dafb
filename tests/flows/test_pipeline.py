"""The pipeline flow end to end on tiny data: real Prefect (test harness), real MLflow (temp
SQLite), real DVC (temp git repo), real GX. One project per module; runs are shared by the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from udaflow import tracking, versioning
from udaflow.config import load_config
from udaflow.data.datasets import Domain, decode_image
from udaflow.data.domains import build_domain
from udaflow.data.ingest import ingest_folder

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def project(tmp_path_factory, new_shift_project) -> Path:
    return new_shift_project(tmp_path_factory.mktemp("pipeline"), tmp_path_factory.mktemp("fonts-b"), 80)


def _cfg(project: Path, **sets):
    overrides = ["source=synth", "target=fonts-b", *(f"{k}={v}" for k, v in sets.items())]
    cfg = load_config(project / "params.yaml", None, overrides)
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    return cfg


@pytest.fixture(scope="module")
def first_run(project: Path):
    from flows.pipeline import adaptation_pipeline

    cfg = _cfg(project, method="dann")
    return cfg, adaptation_pipeline(cfg, str(project / "params.yaml"))


def test_registered_challenger_reproduces_the_logged_target_accuracy(project: Path, first_run):
    cfg, result = first_run
    assert result["model"] == "udaflow-synth-to-fonts-b" and result["version"] == "1" and result["alias"] == "challenger"
    model = tracking.load_model("models:/udaflow-synth-to-fonts-b@challenger")
    test = Domain.open(cfg.data.root, "fonts-b")
    rows = test.select("test")
    classes = Domain.open(cfg.data.root, "synth").classes
    images = torch.from_numpy(np.stack([decode_image(test.root / r.path, 32) for r in rows])).float() / 255.0
    labels = torch.tensor([classes.index(r.label) for r in rows])
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean().item() * 100
    logged = mlflow.MlflowClient().get_run(result["run_id"]).data.metrics["target_acc_selected"]
    assert abs(acc - logged) < 0.1
    assert logged == pytest.approx(result["metrics"]["target_acc_selected"])
    assert model.classes == list(classes)


def test_run_records_lineage_metrics_and_artifacts(project: Path, first_run):
    cfg, result = first_run
    client = mlflow.MlflowClient()
    run = client.get_run(result["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "udaflow/synth-to-fonts-b"
    tags = run.data.tags
    source_md5 = versioning.dataset_version(project / "data/raw/synth").md5
    target_md5 = versioning.dataset_version(project / "data/raw/fonts-b").md5
    assert tags["dvc.source.md5"] == source_md5 and tags["dvc.target.md5"] == target_md5
    assert tags["data.revision"].startswith("synth:") or "fonts-b:" in tags["data.revision"]
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["prefect.flow_run_id"] and tags["version.torch"].startswith("2.14")
    from udaflow import costs

    # the hardware the bits came from: `udaflow reproduce` names it when a re-run's machine differs
    assert tags["hardware.cpu"] == costs.cpu_name() and tags["hardware.cpu"] != "unknown"
    assert tags["hardware.cpu_capability"] == torch.backends.cpu.get_cpu_capability() and tags["hardware.gpu"] == "none"
    assert tags["registry.version"] == "1"
    metrics = run.data.metrics
    for key in ("target_acc_selected", "target_acc_last", "source_val_acc_selected", "validator_selected.im", "validator_selected.snd",
                "validator_last.im", "validator_source_only.im", "shift.pad_before", "shift.pad_after", "shift.mmd_after",
                "target_acc_selected.class_0", "seconds.adapt"):
        assert key in metrics, key
    assert 0 <= metrics["shift.pad_before"] <= 2
    assert run.data.params["method"] == "dann" and run.data.params["train.adapt_steps"] == "12"

    artifacts = {f.path for folder in ("figures", "validation", "params", "metrics") for f in client.list_artifacts(run.info.run_id, folder)}
    for name in ("figures/confusion_matrix.png", "figures/feature_map.png", "figures/loss_pretrain.png", "figures/loss_adapt.png",
                 "validation/gx_result.json", "validation/data_docs", "params/params.resolved.yaml", "params/params.yaml",
                 "metrics/metrics.json"):
        assert name in artifacts, name

    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {"synth": source_md5, "fonts-b": target_md5}

    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.data.tags["udaflow.stage"] for c in children} == {"validate", "pretrain", "adapt", "evaluate", "register"}
    adapt = next(c for c in children if c.data.tags["udaflow.stage"] == "adapt")
    history = client.get_metric_history(adapt.info.run_id, "loss.loss")
    assert [m.step for m in history] == [6, 12]  # one point per evaluation interval
    assert adapt.data.metrics["steps"] == 12 and metrics["adapt.steps"] == 12 and metrics["pretrain.steps"] == 30

    version = client.get_model_version("udaflow-synth-to-fonts-b", "1")
    assert version.tags["method"] == "dann" and version.tags["backbone"] == "udaflow_vit_micro"
    assert version.tags["data.source.md5"] == source_md5 and float(version.tags["target_acc_selected"]) == pytest.approx(metrics["target_acc_selected"])
    assert versioning.status(project) == {}  # nothing changed in DVC's view

    # what the MLflow UI shows: a model-development experiment; the run's logged model, linked to its
    # metrics and the datasets they were measured on, registered, and an input of `evaluate`
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == run.info.run_id and version.source == f"models:/{model.model_id}"
    assert {"name": "udaflow-synth-to-fonts-b", "version": 1} in json.loads(model.tags["mlflow.modelVersions"])
    on = {m.key: (m.dataset_name, m.dataset_digest, m.value) for m in model.metrics if m.dataset_name}
    assert on["target_acc_selected"] == ("fonts-b", target_md5, pytest.approx(metrics["target_acc_selected"]))
    assert on["source_val_acc_selected"][:2] == ("synth", source_md5)
    evaluate = next(c for c in children if c.data.tags["udaflow.stage"] == "evaluate")
    assert [m.model_id for m in client.get_run(evaluate.info.run_id).inputs.model_inputs] == [model.model_id]


def test_one_name_per_figure_in_metrics_mlflow_registry_and_bench(project: Path, first_run):
    """The pipeline and the bench share one evaluation: the same run's figures carry the same names
    and the same values in metrics.json, MLflow, the registry tags and a bench row. (Runs before the
    tests that change the target's data.)"""
    import json

    from udaflow.bench import run_bench

    cfg, result = first_run
    metrics = json.loads((Path(cfg.work_dir) / "synth-to-fonts-b/dann/metrics.json").read_text())
    assert "target_acc" not in metrics and "validators" not in metrics and "source_val_acc" not in metrics
    client = mlflow.MlflowClient()
    logged = client.get_run(result["run_id"]).data.metrics
    tags = client.get_model_version("udaflow-synth-to-fonts-b", result["version"]).tags
    [row] = run_bench(cfg, [("synth", "fonts-b")], ["dann"], protocol="holdout")
    for key in ("target_acc_selected", "target_acc_last", "source_val_acc_selected"):
        assert row[key] == pytest.approx(metrics[key], abs=1e-9) and logged[key] == pytest.approx(metrics[key]), key
    assert float(tags["target_acc_selected"]) == pytest.approx(metrics["target_acc_selected"])
    # the source model's spread on the pool, which the gate's collapse bar scales with (promotion.py)
    spread = metrics["source_only_prediction_diversity"]
    assert 0 < spread <= 1 and float(tags["source_only_prediction_diversity"]) == spread and logged["source_only_prediction_diversity"] == spread
    # the class-swap check read the registered weights' labels in the source model's features: JSON pairs on the version
    assert json.loads(tags["class_swaps"]) == metrics["class_swaps"] and logged["class_swaps_flagged"] == len(metrics["class_swaps"])
    for name, value in metrics["validators_selected"].items():
        assert row["validators_selected"][name] == pytest.approx(value, abs=1e-6), name
        assert logged[f"validator_selected.{name}"] == pytest.approx(value, abs=1e-6)


def test_a_target_with_a_labelled_val_split_judges_its_first_version_there(project: Path, first_run, tmp_path):
    """`data ingest --val-fraction`: evaluation scores the registered weights and their source-only model on
    the user's `val` split, and the first version's gate compares those two, not the label-free validator."""
    from flows.pipeline import adaptation_pipeline
    from udaflow.data.ingest import ingest_domain

    folder = tmp_path / "fonts-v"
    shutil.copytree(project / "data/raw/fonts-b", folder, ignore=shutil.ignore_patterns("manifest.csv"))
    ingest_domain(folder, "fonts-v", project / "data/raw", source="synth", val_fraction=0.25, report_dir=tmp_path / "report")
    cfg = _cfg(project, method="dann", target="fonts-v")
    result = adaptation_pipeline(cfg, str(project / "params.yaml"))
    metrics = json.loads((Path(cfg.work_dir) / "synth-to-fonts-v/dann/metrics.json").read_text())
    assert metrics["target_val_images"] == 20  # round(8 per class x 0.25) x 10 classes
    client = mlflow.MlflowClient()
    tags = client.get_model_version("udaflow-synth-to-fonts-v", result["version"]).tags
    new, old = metrics["target_val_acc_selected"], metrics["source_only_target_val_acc"]
    assert float(tags["target_val_acc_selected"]) == pytest.approx(new) and float(tags["source_only_target_val_acc"]) == pytest.approx(old)
    assert tags["gate.criterion"] == "first" and "accuracy on target 'fonts-v' val split (20 labelled images)" in tags["gate.data"]
    rows = {r[0]: r[1:] for r in yaml.safe_load(tags["gate.table"])}
    assert rows["target_val_acc at evaluation (source-only | adapted)"] == [f"{old:.4g}", f"{new:.4g}"]
    assert "validator.im at evaluation (source-only | adapted)" not in rows  # the val split decided, not the validator
    if new < old:
        assert tags["gate.reason"] == f"first version: target_val_acc {new:.4g} does not reach its source-only model's {old:.4g} on the target's val split"


def test_second_method_reuses_the_cached_source_model_and_registers_version_2(project: Path, first_run):
    from flows.pipeline import adaptation_pipeline

    cfg = _cfg(project, method="mcc")
    cached = {p: p.stat().st_mtime_ns for p in (Path(cfg.work_dir) / "cache").glob("source-*.pt")}
    result = adaptation_pipeline(cfg, str(project / "params.yaml"))
    assert result["prefect_task_cached"] is True and result["source_cached"] is True
    assert result["version"] == "2"
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("udaflow-synth-to-fonts-b", "challenger").version) == "2"
    # nothing trained again: the one cached source model is the file the first run wrote, untouched
    # (not timed: a cache lookup on a slow host took 2.3 s, the first run's 30-step pretraining 1.0-2.0 s)
    assert len(cached) == 1 and {p: p.stat().st_mtime_ns for p in (Path(cfg.work_dir) / "cache").glob("source-*.pt")} == cached


def test_a_run_that_fails_after_adapting_resumes_at_the_last_step(project: Path, first_run, monkeypatch):
    """The adaptation's last checkpoint stays until its model is registered: a run that dies while it
    evaluates or registers trains no step again when re-run, and writes the same model file."""
    import flows.pipeline
    from udaflow.steps import run_paths

    cfg = _cfg(project, method="mcc")
    paths = run_paths(cfg)

    def dies(*args, **kwargs):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr(flows.pipeline, "evaluate_model", dies)
    with pytest.raises(RuntimeError, match="killed while evaluating"):
        flows.pipeline.adaptation_pipeline(cfg, str(project / "params.yaml"))
    monkeypatch.undo()
    adapted = paths.model.read_bytes()
    assert paths.checkpoint.exists()  # the resume point, at the final step
    result = flows.pipeline.adaptation_pipeline(cfg, str(project / "params.yaml"))
    assert result["version"] and not paths.checkpoint.exists()  # registered: nothing left to resume
    timing = json.loads(paths.model.with_suffix(".timing.json").read_text())
    assert timing["resumed_from"] == cfg.train.adapt_steps  # no step trained again
    assert paths.model.read_bytes() == adapted  # the same stage, byte for byte (where it resumed is beside it)


def test_a_truncated_cached_source_model_is_trained_again(project: Path, first_run):
    """The Prefect cache points at a file; one that no longer reads as a stage (a disk filled, a copy cut
    short) is retrained, not handed to adaptation with an error that re-running cannot fix."""
    from flows.pipeline import adaptation_pipeline

    cfg = _cfg(project, method="mcc")
    [cached] = (Path(cfg.work_dir) / "cache").glob("source-*.pt")
    whole = cached.read_bytes()
    cached.write_bytes(whole[: len(whole) // 3])
    result = adaptation_pipeline(cfg, str(project / "params.yaml"))
    assert result["prefect_task_cached"] is False and result["source_cached"] is False and result["version"]
    assert cached.read_bytes() == whole  # trained again to the same bits (deterministic)


@pytest.mark.parametrize("damage", ["truncated", "added"])
def test_corrupt_target_in_data_stops_before_training_and_registers_nothing(project: Path, first_run, damage):
    """A listed file truncated, or a file put in the folder by hand (a probe's notes.txt: only listed files were
    read, and the run versioned it into a new DVC version and registered a model)."""
    from flows.pipeline import DataValidationError, adaptation_pipeline

    target = project / "data/raw/fonts-b"
    backup = project / "fonts-b.bak"
    shutil.copytree(target, backup)
    pointer = (project / "data/raw/fonts-b.dvc").read_text()
    versions_before = len(tracking.latest_versions("udaflow-synth-to-fonts-b"))
    victim = next(p for p in sorted(target.rglob("*.png")))
    if damage == "added":
        victim = victim.with_name("notes.txt")
    victim.write_bytes(b"\x89PNG truncated")
    try:
        cfg = _cfg(project, method="dann")
        with pytest.raises(DataValidationError, match=victim.name) as caught:
            adaptation_pipeline(cfg, str(project / "params.yaml"))
        # the data's way out, not the run's params hint, with the project's data root for the placeholder it printed
        assert caught.value.hint == (f"nothing was trained, versioned or registered; `dvc checkout {cfg.data.root}/<name>` restores a domain's "
                                     "versioned files, `udaflow data ingest DIR --name NAME --replace` makes a corrected folder its new version")
        if damage == "added":
            assert f"{victim} is not in the manifest of domain 'fonts-b'" in str(caught.value)
        assert len(tracking.latest_versions("udaflow-synth-to-fonts-b")) == versions_before
        assert (project / "data/raw/fonts-b.dvc").read_text() == pointer  # no new DVC version
        failed = mlflow.search_runs(
            experiment_names=["udaflow/synth-to-fonts-b"], filter_string="tags.`validation.success` = 'false'", output_format="list"
        )
        assert failed and failed[0].info.status == "FAILED"
        assert "validation/gx_result.json" in {f.path for f in mlflow.MlflowClient().list_artifacts(failed[0].info.run_id, "validation")}
    finally:
        shutil.rmtree(target)
        shutil.copytree(backup, target)
        shutil.rmtree(backup)


def test_reproduce_restores_the_old_data_revision_and_matches_exactly(project: Path, first_run, tmp_path_factory):
    """After the target changes (a new DVC version), reproducing the first run restores its data."""
    from typer.testing import CliRunner

    from udaflow.cli import app

    cfg, result = first_run
    old_md5 = versioning.dataset_version(project / "data/raw/fonts-b").md5
    # new target content: a re-ingest with a different holdout split is a new DVC version
    newer = tmp_path_factory.mktemp("fonts-b-v2")
    build_domain("synth", newer, seed=9, synth_size=80)
    (newer / "synth/manifest.csv").unlink()
    ingest_folder(newer / "synth", "fonts-b", project / "data/raw", 0.25, 0)
    assert versioning.version_dataset(project / "data/raw/fonts-b").md5 != old_md5
    today = (project / "data/raw/fonts-b/manifest.csv").read_bytes()

    if not torch.cuda.is_available():  # a GPU asked for and absent: refused before any data is restored
        out = CliRunner().invoke(app, ["reproduce", result["run_id"], "--device", "cuda", "--params", str(project / "params.yaml")])
        assert out.exit_code == 2 and "no CUDA GPU is visible" in out.output, out.output
        assert f"hint: --device names a GPU this machine does not have: re-run on the CPU with `udaflow reproduce {result['run_id']} " \
               "--device cpu`" in " ".join(out.output.split()), out.output  # not the hint about where run ids are
        assert not (project / "runs/reproduce" / result["run_id"]).exists()
    out = CliRunner().invoke(app, ["reproduce", result["run_id"], "--device", "cpu", "--params", str(project / "params.yaml")])
    assert out.exit_code == 0, out.output
    assert "identical metrics" in out.output
    restored = project / "runs/reproduce" / result["run_id"] / "data/raw/fonts-b"
    assert versioning.dataset_version(project / "data/raw/fonts-b").md5 != old_md5  # today's data untouched
    assert (project / "data/raw/fonts-b/manifest.csv").read_bytes() == today
    assert restored.is_dir() and (restored / "manifest.csv").read_bytes() != today

    assert "other hardware" not in out.output  # the same machine: no warning

    unknown = CliRunner().invoke(app, ["reproduce", "0" * 32, "--params", str(project / "params.yaml")])
    assert unknown.exit_code == 2 and "does not exist" in unknown.output


def test_reproduce_on_other_hardware_names_both_machines(project: Path, first_run, monkeypatch):
    """A run recorded on another CPU model: its bits are not expected to repeat here, and the report
    says so, naming both CPUs, beside the differing metrics (exit 1 still: they are not identical)."""
    from typer.testing import CliRunner

    import flows.reproduce
    from udaflow import costs
    from udaflow.cli import app

    cfg, result = first_run
    recorded = mlflow.MlflowClient().get_run(result["run_id"]).data.tags
    other = {**recorded, "hardware.cpu": "AMD EPYC 9R14 (AuthenticAMD, family 25, model 17)"}
    # the columns round to 2 decimals: a difference they hide is written out, a validator's float noise is none
    rows = [("target_acc_selected", 72.9, 67.78, False), ("target_acc_last", 97.304, 97.296, False), ("validator_selected.im", 1.5, 1.5 + 1e-9, True)]

    def replayed(*args, **kwargs):  # the flow itself is tested above; here, what the command makes of its result
        return {"same": False, "rows": rows, "validation": True, "commit": recorded["git.commit"], "workspace": "ws",
                "device": "cpu", "tags": other}

    monkeypatch.setattr(flows.reproduce, "reproduce_run", replayed)
    out = CliRunner().invoke(app, ["reproduce", result["run_id"], "--params", str(project / "params.yaml")])
    assert out.exit_code == 1, out.output
    text = " ".join(out.output.split())  # rich wraps long lines
    assert f"CPU: AMD EPYC 9R14 (AuthenticAMD, family 25, model 17) -> {costs.cpu_name()}" in text
    assert "differ from the recorded ones (expected on other hardware or torch" in text
    cells = " ".join(out.output.replace("│", " ").split())
    assert "target_acc_selected 72.90 67.78 -5.12" in cells and "target_acc_last 97.30 97.30 -0.008" in cells, cells
    assert "validator_selected.im 1.50 1.50 none" in cells, cells

    monkeypatch.setattr(flows.reproduce, "reproduce_run", lambda *a, **k: {**replayed(), "tags": recorded})
    out = CliRunner().invoke(app, ["reproduce", result["run_id"], "--params", str(project / "params.yaml")])
    assert out.exit_code == 1 and "other hardware" not in out.output  # differing on the same machine: no excuse offered
    assert "uncommitted code changes" not in out.output or recorded["git.dirty"] == "true"

    # a run made from a checkout with uncommitted code: its commit alone does not say what trained
    monkeypatch.setattr(flows.reproduce, "reproduce_run", lambda *a, **k: {**replayed(), "tags": {**recorded, "git.dirty": "true"}})
    out = CliRunner().invoke(app, ["reproduce", result["run_id"], "--params", str(project / "params.yaml")])
    assert f"warning: run {result['run_id']} was made from a checkout with uncommitted code changes (git.dirty)" in " ".join(out.output.split())


def test_a_flow_that_fails_after_validation_ends_its_runs_failed(project: Path, first_run, monkeypatch):
    """A crash in adaptation (after validation, versioning and pretraining): the parent run and any
    child run end FAILED, none is left RUNNING, and nothing is registered."""
    from flows.pipeline import adaptation_pipeline
    from udaflow import steps

    def broken(*args, **kwargs):
        raise RuntimeError("adaptation crashed")

    monkeypatch.setattr(steps, "adapt", broken)
    versions_before = len(tracking.latest_versions("udaflow-synth-to-fonts-b"))
    cfg = _cfg(project, method="dann")
    with pytest.raises(RuntimeError, match="adaptation crashed"):
        adaptation_pipeline(cfg, str(project / "params.yaml"))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("udaflow/synth-to-fonts-b").experiment_id
    parent = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=20)
    parent = next(r for r in parent if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")
    assert len(tracking.latest_versions("udaflow-synth-to-fonts-b")) == versions_before

    # nothing to reproduce: refused before its data is restored, not retrained to "differ"
    from typer.testing import CliRunner

    from udaflow.cli import app

    out = CliRunner().invoke(app, ["reproduce", parent.info.run_id, "--params", str(project / "params.yaml")])
    assert out.exit_code == 2 and f"run '{parent.info.run_id}' ended FAILED, not FINISHED" in out.output, out.output
    assert not (project / "runs/reproduce" / parent.info.run_id).exists()
    # a stage's own run id (copied from the MLflow UI) names the run to reproduce, not "not made by udaflow run"
    child = next(r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"))
    out = CliRunner().invoke(app, ["reproduce", child.info.run_id, "--params", str(project / "params.yaml")])
    assert out.exit_code == 2 and f"stage of run '{parent.info.run_id}': run `udaflow reproduce {parent.info.run_id}`" in out.output, out.output


def test_reproduce_of_a_run_that_failed_its_validation_says_it_failed(project: Path, first_run, monkeypatch):
    """A run that failed validation (a class its source lacks, in a retrain the data trigger started) has no DVC
    hashes yet: `reproduce` said "no DVC hash for its source dataset" with the hint about run ids, not that it failed."""
    from typer.testing import CliRunner

    from flows.pipeline import adaptation_pipeline
    from udaflow import steps
    from udaflow.cli import app
    from udaflow.data.manifest import DataError

    def refused(*args, **kwargs):
        raise DataError("fonts-b: class(es) ['Z'] unknown to the source")

    monkeypatch.setattr(steps, "validate_datasets", refused)
    with pytest.raises(DataError, match="unknown to the source"):
        adaptation_pipeline(_cfg(project, method="dann"), str(project / "params.yaml"))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("udaflow/synth-to-fonts-b").experiment_id
    parent = next(r for r in client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=20)
                  if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED" and "dvc.source.md5" not in parent.data.tags
    out = CliRunner().invoke(app, ["reproduce", parent.info.run_id, "--params", str(project / "params.yaml")])
    assert out.exit_code == 2 and f"run '{parent.info.run_id}' ended FAILED, not FINISHED, before its evaluation" in out.output, out.output
    assert "no DVC hash" not in out.output


def test_reproduce_refuses_a_record_it_cannot_use_before_restoring_anything(project: Path, first_run, tmp_path):
    """A finished run whose recorded params today's udaflow no longer reads (a key renamed since), and
    one whose artifacts were deleted: one error line each, naming the run and what is wrong."""
    import yaml
    from typer.testing import CliRunner

    from udaflow.cli import app

    cfg, result = first_run
    client = mlflow.MlflowClient()
    first = client.get_run(result["run_id"])
    recorded = yaml.safe_load(Path(client.download_artifacts(result["run_id"], "params/params.resolved.yaml", str(tmp_path))).read_text())
    recorded["train"]["old_knob"] = 1
    (tmp_path / "params").mkdir(exist_ok=True)
    (tmp_path / "params/params.resolved.yaml").write_text(yaml.safe_dump(recorded))
    lineage = {k: v for k, v in first.data.tags.items() if k.startswith(("dvc.", "git."))}
    runs = {}
    for kind in ("renamed", "deleted"):
        run = client.create_run(first.info.experiment_id, tags=lineage, run_name=kind)
        if kind == "renamed":
            client.log_artifact(run.info.run_id, str(tmp_path / "params/params.resolved.yaml"), "params")
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[kind] = run.info.run_id
    out = CliRunner().invoke(app, ["reproduce", runs["renamed"], "--params", str(project / "params.yaml")])
    lines = out.output[out.output.index("error:"):].splitlines()  # (MLflow's download bar when not run as `udaflow`)
    assert out.exit_code == 2 and lines[0].startswith(f"error: run '{runs['renamed']}' was made with params this udaflow no "
                                                      "longer reads: train.old_knob: unknown key (known: "), out.output
    assert lines[1].startswith(f"hint: reproduce it with the code it ran: `git checkout {lineage['git.commit'][:12]}`"), out.output
    out = CliRunner().invoke(app, ["reproduce", runs["deleted"], "--params", str(project / "params.yaml")])
    assert out.exit_code == 2 and "its params/params.resolved.yaml could not be read from" in out.output, out.output
    assert "the run's artifact store was moved or deleted" in out.output and "not made by `udaflow run`" not in out.output
    assert not any((project / "runs/reproduce" / r).exists() for r in runs.values())



def test_a_retrain_fired_by_another_model_s_shift_skips_when_its_own_model_is_unshifted(project: Path, monkeypatch):
    """The data event carries each model's own drift verdict: the retrain of a model whose champion saw no
    shift skips before anything trains or registers; a shifted (or unmeasured) one goes on."""
    from flows import retrain as retrain_flow

    _cfg(project)  # the project's MLflow store (MLflow's default would be ./mlflow.db)
    versions_before = len(tracking.latest_versions("udaflow-synth-to-fonts-b"))
    out = retrain_flow.retrain(str(project / "params.yaml"), "synth", "fonts-b",
                               drift={"udaflow-synth-to-fonts-b": "unshifted", "udaflow-mnist-to-fonts-b": "shifted"})
    assert out["skipped"] and "not shifted for udaflow-synth-to-fonts-b@champion" in out["reason"]
    assert len(tracking.latest_versions("udaflow-synth-to-fonts-b")) == versions_before

    seen = []
    monkeypatch.setattr(retrain_flow, "data_unchanged_since_champion", lambda cfg: seen.append(cfg.target) or "unchanged (test)")
    out = retrain_flow.retrain(str(project / "params.yaml"), "synth", "fonts-b", drift={"udaflow-synth-to-fonts-b": "shifted"})
    assert seen == ["fonts-b"] and out == {"skipped": True, "reason": "unchanged (test)"}  # on to the next check


def test_a_retrain_says_in_its_log_what_it_registered_and_what_the_gate_decided(project: Path, monkeypatch):
    """A worker's log showed MLflow's "Created version '2'" and "Completed()", never the version's alias,
    accuracy or the gate's decision (a probe found a rejection only in the version's tags)."""
    from flows import retrain as retrain_flow

    _cfg(project)
    result = {"run_id": "r1", "model": "udaflow-synth-to-fonts-b", "version": "2", "metrics": {"target_acc_selected": 91.25, "selected_by": "im"},
              "gate": {"promoted": False, "reason": "collapsed: prediction diversity 0.126 < 0.5", "champion_before": "1"}}
    monkeypatch.setattr(retrain_flow, "data_unchanged_since_champion", lambda cfg: None)
    monkeypatch.setattr(retrain_flow, "adaptation_pipeline", lambda cfg, params_file: result)
    summary, said = retrain_flow.retrain_summary, []
    monkeypatch.setattr(retrain_flow, "retrain_summary", lambda r: said.append(summary(r)) or said[-1])
    out = retrain_flow.retrain(str(project / "params.yaml"), "synth", "fonts-b", drift={"udaflow-synth-to-fonts-b": "shifted"})
    assert not out["skipped"] and out["version"] == "2"
    assert said == ["retrain registered udaflow-synth-to-fonts-b v2 (@challenger, MLflow run r1); target accuracy 91.25% (selected by im); "
                    "gate: not promoted: collapsed: prediction diversity 0.126 < 0.5"]
    unlabelled = {**result, "metrics": {"target_acc_selected": None}, "gate": {"promoted": True, "reason": "im 0.81 >= 0.79"}}
    assert summary(unlabelled).endswith("(@challenger, MLflow run r1); gate: promoted to @champion: im 0.81 >= 0.79")


def test_a_run_that_died_after_its_evaluation_can_be_reproduced(project: Path, first_run, monkeypatch):
    """Its metrics are whole once its `evaluate` child finished: a run killed while it registered or
    inside its gate (its version adopted by the next run) is reproducible, where one that died before
    evaluating is refused (above). Until 2026-12-04 every run not FINISHED was refused."""
    import flows.pipeline

    def dies(*args, **kwargs):
        raise RuntimeError("killed inside the gate")

    monkeypatch.setattr(flows.pipeline, "promotion_gate", dies)
    cfg = _cfg(project, method="dann", seed=3)
    with pytest.raises(RuntimeError, match="killed inside the gate"):
        flows.pipeline.adaptation_pipeline(cfg, str(project / "params.yaml"))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("udaflow/synth-to-fonts-b").experiment_id
    parent = next(r for r in client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=20)
                  if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    record = tracking.run_record(parent.info.run_id)
    assert record.metrics["target_acc_selected"] == parent.data.metrics["target_acc_selected"] and record.config["seed"] == 3


def test_a_store_that_refuses_to_end_a_stopped_run_does_not_hide_the_stop(project: Path, first_run, monkeypatch):
    """Ctrl-C while SQLite was locked: ending the MLflow run failed too, and its error replaced the
    interrupt (a traceback and exit 1, not `interrupted` and 130). The stop is what is raised; a warning
    says the run is left for the next one to end."""
    import sqlite3

    import flows.pipeline
    from udaflow import steps

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    printed = []  # the flow's print (a Prefect log line under log_prints, which the whole suite's logging may not pass on)
    monkeypatch.setattr(steps, "adapt", stopped)
    monkeypatch.setattr(tracking, "close_pipeline_run", locked)
    monkeypatch.setattr(flows.pipeline, "print", lambda *a, **k: printed.append(" ".join(map(str, a))), raising=False)
    with pytest.raises(KeyboardInterrupt):
        flows.pipeline.adaptation_pipeline(_cfg(project, method="dann", seed=4), str(project / "params.yaml"))
    out = " ".join(printed)
    assert "could not be ended (OperationalError: database is locked); the next `udaflow run` on this host ends it KILLED" in out
