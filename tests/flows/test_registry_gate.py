"""The promotion gate, promote and rollback against a real MLflow registry (temp SQLite) and real
data (a tiny synth -> fonts-b project), through the CLI and flows. Models are a briefly trained
micro ViT and variants of it, registered in udaflow's packaged format."""

from __future__ import annotations

import contextlib
import copy
import csv
import multiprocessing
import pickle
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

from udaflow import steps, tracking
from udaflow.cli import app
from udaflow.config import load_config
from udaflow.models import ImageClassifier, packaged

pytestmark = pytest.mark.usefixtures("prefect_harness")
NAME = "udaflow-synth-to-fonts-b"
runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory, new_shift_project) -> Path:
    root = new_shift_project(tmp_path_factory.mktemp("gate"), tmp_path_factory.mktemp("fonts-b"), 60)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(source="synth", target="fonts-b")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def trained(project: Path) -> ImageClassifier:
    """The source model of the tiny project (30 steps): predictions spread over the classes."""
    cfg = _cfg(project, "train.pretrain_steps=150")
    outcome = steps.pretrain(cfg)
    stage, classes = steps._load(cfg, Path(outcome.path))
    return ImageClassifier(stage.classifier, classes).eval()


@pytest.fixture
def registry(project: Path, tmp_path: Path) -> Path:
    """A fresh, empty MLflow store for each test; the project's data and params otherwise."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "artifacts")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tracking.configure(params["tracking"]["uri"], tmp_path / "artifacts")
    return tmp_path


def _cfg(root: Path, *overrides: str):
    return load_config(root / "params.yaml", None, list(overrides))


def variant(model: ImageClassifier, seed: int, noise: float = 0.0, collapse: bool = False) -> ImageClassifier:
    """A copy of `model` with noise on its head (`noise` x the weights' std: a different, still spread-out model), or collapsed
    onto class 0 (every image predicted as one class)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = out.classifier.head
        head.weight.add_(noise * head.weight.std() * torch.randn(head.weight.shape, generator=g))  # relative to the weights
        if collapse:
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = 10.0
    return out


def add_version(registry: Path, model: ImageClassifier, recorded_im: float = 0.8, source_only_im: float = 0.5,
                source_only_val: float = 0.0, **claimed) -> str:
    """Register `model` as challenger with the tags a pipeline run writes (`claimed` adds any)."""
    cfg = _cfg(registry)
    exp = tracking.experiment_id(cfg.source, cfg.target)
    run = tracking.PipelineRun(exp, tracking.start_run(exp, "test", {}), cfg.source, cfg.target)
    package = packaged.save(model, Path(tempfile.mkdtemp(dir=registry)), cfg.model.backbone, cfg.model.backbone_args, cfg.data.image_size)
    metrics = {"source_val_acc_selected": 99.0, "source_only_source_val_acc": source_only_val, "selected_by": "im",
               "validators_selected": {"im": recorded_im}, "validators_source_only": {"im": source_only_im}, **claimed}
    example = steps.serving_example(cfg)
    return tracking.register_challenger(run, package, example, metrics, {"method": "test"}).version


def champion() -> str | None:
    v = tracking._alias_version(NAME, "champion")
    return None if v is None else str(v.version)


def cli(args, root):
    return runner.invoke(app, [*args, "--params", str(root / "params.yaml")])


def measured(registry: Path, version: str):
    cfg = _cfg(registry)
    return steps.measure_for_gate(tracking.load_model(f"models:/{NAME}/{version}"), steps.load_gate_data(cfg), "im", "cpu")


def test_first_version_needs_a_sanity_check_then_the_gate_measures_both_now(registry: Path, trained):
    add_version(registry, variant(trained, 0), recorded_im=0.4, source_only_im=0.5)  # worse than its own source-only
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and "not promoted" in result.output and "does not beat its source-only" in result.output
    assert champion() is None
    assert "validator 'im' on target 'fonts-b' train pool" in result.output  # which data decided

    add_version(registry, variant(trained, 1), recorded_im=0.6, source_only_im=0.5)
    result = cli(["promote", "--model", NAME, "--dry-run"], registry)
    assert "[dry run] would promote" in result.output and champion() is None  # a dry run changes nothing, and says so
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and "first version" in result.output and champion() == "2"

    # the challenger claims far better numbers in its tags; the gate ignores them and measures both
    v3 = add_version(registry, variant(trained, 3, noise=0.3), recorded_im=9.9, target_acc_selected=100.0)
    new, old = measured(registry, v3), measured(registry, "2")
    result = cli(["promote", "--model", NAME], registry)
    assert (champion() == "3") == (new.validator >= old.validator and old.source_val_acc - new.source_val_acc <= 1.0), result.output
    tags = mlflow.MlflowClient().get_model_version(NAME, "3").tags
    assert tags["gate.compared_with"] == "2" and tags["gate.criterion"] in ("validator.im", "collapse")
    assert "source val accuracy on 'synth' test split" in tags["gate.data"]
    rows = {r[0]: r[1:] for r in yaml.safe_load(tags["gate.table"])}
    assert rows["validator.im"] == [f"{old.validator:.4g}", f"{new.validator:.4g}"]


def test_collapsed_challenger_is_refused(registry: Path, trained):
    add_version(registry, variant(trained, 0, collapse=True), recorded_im=0.9, source_only_im=0.1)
    result = cli(["promote", "--model", NAME], registry)
    assert "not promoted" in result.output and "collapsed: prediction diversity 0.000" in result.output and champion() is None


def test_the_collapse_bar_is_read_from_the_version_s_own_record(registry: Path, trained):
    """The bar is min_diversity x the source-only model's diversity that the pipeline tagged on the version at
    evaluation; a version without that tag (registered by an older udaflow) is held to min_diversity itself."""
    add_version(registry, variant(trained, 0, collapse=True), recorded_im=0.9, source_only_im=0.1, source_only_prediction_diversity=0.9)
    result = cli(["promote", "--model", NAME], registry)
    assert "collapsed: prediction diversity 0.000 < 0.5 x its source-only model's 0.900 = 0.450 on the target pool" in result.output, result.output
    add_version(registry, variant(trained, 1), recorded_im=0.9, source_only_im=0.1, source_only_prediction_diversity=1.0)
    spread = measured(registry, "2").diversity
    result = cli(["promote", "--model", NAME, "--dry-run"], registry)  # a spread-out model against a bar of 0.5 x 1.0
    assert (spread >= 0.5) == ("would promote" in result.output), result.output


def test_a_version_recorded_with_swapped_classes_is_refused_and_says_why(registry: Path, trained):
    """Evaluation tagged the version with the pairs shift.class_swaps flagged (JSON): the gate refuses it, first
    version or not, and its table shows the pairs; a version whose record flags none passes the same way as before."""
    add_version(registry, variant(trained, 1), recorded_im=0.9, source_only_im=0.1, class_swaps=[["A", "B"]])
    assert mlflow.MlflowClient().get_model_version(NAME, "1").tags["class_swaps"] == '[["A", "B"]]'
    result = cli(["promote", "--model", NAME], registry)
    assert "not promoted" in result.output and "classes look swapped: A<->B" in result.output and champion() is None, result.output
    tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
    assert tags["gate.criterion"] == "class_swap" and ["class swaps at evaluation", "-", "A<->B"] in yaml.safe_load(tags["gate.table"])
    add_version(registry, variant(trained, 2, noise=0.01), recorded_im=0.9, source_only_im=0.1, class_swaps=[])
    result = cli(["promote", "--model", NAME], registry)
    assert champion() == "2", result.output


def test_a_model_of_another_version_of_its_source_is_refused_with_the_way_back(project: Path, trained):
    """A probe replaced a source with two classes fewer: `promote` refused with the classes, and a hint to list
    models in the UI. The hint now says the source's version changed and how to bring one back."""
    from udaflow.data.manifest import DataError

    other = copy.deepcopy(trained)
    other.classes = list(reversed(trained.classes))
    with pytest.raises(DataError, match="^the model's classes .* are not the source's") as err:
        steps.measure_for_gate(other, steps.load_gate_data(_cfg(project)), "im", "cpu")
    assert "trained on another version of 'synth'" in err.value.hint and "git log -p -- data/raw/synth.dvc" in err.value.hint


def test_labelled_target_val_split_decides_and_test_is_never_read(registry: Path, trained, project: Path):
    """A target with a labelled `val` split: the gate compares accuracy there. Its `test` files are
    made unreadable for the test: the gate must not touch them."""
    domain = project / "data/raw/fonts-b"
    manifest = domain / "manifest.csv"
    original = manifest.read_text()
    rows = list(csv.DictReader(original.splitlines()))
    train = [r for r in rows if r["split"] == "train"]
    for r in train[: len(train) // 2]:
        r["split"] = "val"
    tests = [domain / r["path"] for r in rows if r["split"] == "test"]
    saved = {p: p.read_bytes() for p in tests}
    try:
        with manifest.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        for p in tests:
            p.write_bytes(b"not an image")
        add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
        cli(["promote", "--model", NAME], registry)
        assert champion() == "1"
        v2 = add_version(registry, variant(trained, 5, noise=0.3))
        new, old = measured(registry, v2), measured(registry, "1")
        assert new.target_val_acc is not None
        result = cli(["promote", "--model", NAME], registry)
        assert "accuracy on target 'fonts-b' val split" in result.output, result.output
        tags = mlflow.MlflowClient().get_model_version(NAME, v2).tags
        expected = "target_val_acc" if new.diversity >= 0.5 else "collapse"
        assert tags["gate.criterion"] == expected
        if expected == "target_val_acc":
            assert (champion() == v2) == (new.target_val_acc >= old.target_val_acc and old.source_val_acc - new.source_val_acc <= 1.0)
    finally:
        manifest.write_text(original)
        for p, data in saved.items():
            p.write_bytes(data)


def test_rollback_and_a_promotion_cut_short_between_its_two_writes(registry: Path, trained):
    for i in range(3):
        add_version(registry, variant(trained, 0), recorded_im=0.6 + i, source_only_im=0.5)
        if i == 0:
            cli(["promote", "--model", NAME], registry)
    client = mlflow.MlflowClient()
    # versions 2 and 3 equal version 1's weights: each ties and is promoted in turn
    for _ in range(2):
        client.set_registered_model_alias(NAME, "challenger", str(int(champion()) + 1))
        assert "promoted" in cli(["promote", "--model", NAME], registry).output
    assert champion() == "3" and client.get_registered_model(NAME).tags[tracking.HISTORY_TAG] == "1,2,3"

    # a promote killed after writing the history but before moving the alias: history is ahead
    client.set_registered_model_tag(NAME, tracking.HISTORY_TAG, "1,2,3,4")
    client.set_model_version_tag(NAME, "2", "gate.decision", "promoting")  # and a decision it left pending
    result = cli(["rollback", "--model", NAME, "--dry-run"], registry)  # says where it would go, writes nothing
    assert result.exit_code == 0 and f"{NAME}: champion [dry run] would roll back from v3 to v2" in result.output, result.output
    assert champion() == "3" and client.get_registered_model(NAME).tags[tracking.HISTORY_TAG] == "1,2,3,4"
    assert "gate.rolled_back_at" not in client.get_model_version(NAME, "3").tags
    assert client.get_model_version(NAME, "2").tags["gate.decision"] == "promoting"  # left for the real one to settle
    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 0 and f"{NAME}: champion rolled back from v3 to v2" in result.output and champion() == "2"
    assert client.get_model_version(NAME, "2").tags["gate.decision"] == "interrupted"  # settled first, v3 still champion then
    # a rollback killed after moving the alias but before trimming the history
    client.set_registered_model_alias(NAME, "champion", "1")
    for dry in (["--dry-run"], []):  # the dry run refuses as the rollback does
        result = cli(["rollback", "--model", NAME, *dry], registry)
        assert result.exit_code == 2 and "no previous champion" in result.output and champion() == "1"
        assert "(champion history: v1)" in result.output, result.output  # not a Python list's repr
    assert tracking._history(NAME, tracking._alias_version(NAME, "champion")) == ["1"]


def test_registration_cut_short_is_incomplete_and_never_aliased(registry: Path, trained):
    add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    client = mlflow.MlflowClient()
    # what a kill between `register_model` and the complete mark leaves: a version without it
    source = client.get_model_version(NAME, "1").source
    partial = client.create_model_version(NAME, source, run_id=client.get_model_version(NAME, "1").run_id)
    assert tracking.incomplete_versions(NAME) == [str(partial.version)]
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    result = cli(["promote", "--model", NAME], registry)
    assert champion() == "1" and f"incomplete: v{partial.version}" in result.output


def test_registered_version_links_to_the_run_with_the_metrics(registry: Path, trained):
    add_version(registry, variant(trained, 0))
    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    run = mlflow.MlflowClient().get_run(version.run_id)
    assert run.info.run_name == "test" and "mlflow.parentRunId" not in run.data.tags  # the pipeline run, not `register`
    assert version.tags[tracking.COMPLETE_TAG] == "true"
    # registering leaves the run RUNNING: the gate and the run's close come after, and a kill before
    # them must leave a run the next one marks KILLED, not a finished-looking one
    assert run.info.status == "RUNNING" and mlflow.active_run() is None
    [output] = run.outputs.model_outputs  # the model is logged in it, and stored with the run's experiment
    logged = mlflow.MlflowClient().get_logged_model(output.model_id)
    assert logged.experiment_id == run.info.experiment_id and logged.artifact_location.startswith((registry / "artifacts").as_uri())


def test_pickles_are_refused_where_a_model_is_loaded(registry: Path, trained, tmp_path: Path):
    """A pickle in place of the weights, and a model logged in MLflow's pickle format, are both
    refused without being unpickled (the payload would write a file if it ran)."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    add_version(registry, variant(trained, 0))
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "dl")))
    weights = next(folder.rglob(packaged.WEIGHTS))
    weights.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(packaged.PackageError, match="not a safetensors file"):
        packaged.load(weights.parent)

    from mlflow import pytorch as mlflow_pytorch

    with mlflow.start_run(experiment_id=tracking.experiment_id("synth", "fonts-b")):  # artifacts in the test's store
        info = mlflow_pytorch.log_model(Payload2(), name="legacy", serialization_format="pickle", input_example=torch.zeros(1, 2).numpy())
    with pytest.raises(LookupError, match="refusing to load it"):
        tracking.load_model(info.model_uri)
    assert not marker.exists()


class Payload2(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 2)


def test_unknown_model_is_one_line(registry: Path):
    result = cli(["promote", "--model", "udaflow-nope"], registry)
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def test_a_runs_gate_judges_the_version_it_registered_not_a_newer_challenger(registry: Path, trained, monkeypatch):
    """A team probe: the pipeline's gate read `@challenger` and judged whatever it pointed at, so a version another
    machine registered between this run's registration and its gate (two holds of the lock; a shared MLflow store
    without a Prefect server has no lock across machines) was promoted under this run's number, and this run's own
    version never got a gate tag. A run's gate now judges only its own version, and says when it was superseded."""
    cfg = _cfg(registry)
    first = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    second = add_version(registry, variant(trained, 1, noise=0.05), recorded_im=0.6, source_only_im=0.5)  # registered elsewhere since
    decision, judged, previous = steps.gate(cfg, NAME, version=first)
    assert not decision.promote and decision.criterion == "superseded" and (judged, previous) == (first, None)
    assert decision.reason == f"version {first} is no longer the challenger (v{second} is: registered since, and gated by its own run)"
    assert champion() is None
    tags = mlflow.MlflowClient().get_model_version(NAME, first).tags
    assert tags["gate.decision"] == "superseded" and "gate.decision" not in mlflow.MlflowClient().get_model_version(NAME, second).tags
    # its own version while it is the challenger: judged as before
    decision, judged, _ = steps.gate(cfg, NAME, version=second)
    assert decision.promote and decision.criterion == "first" and judged == second and champion() == second

    # registered elsewhere while this gate measured: nothing moves, this version says why
    third = add_version(registry, variant(trained, 2, noise=0.05), recorded_im=0.6, source_only_im=0.5)
    measure = steps.measure_for_gate

    def measure_while_another_registers(*args, **kwargs):
        if tracking._alias_version(NAME, "challenger").version == int(third):
            with monkeypatch.context() as elsewhere:  # another machine: this machine's lock file does not hold it
                elsewhere.setattr(tracking, "registry_lock", lambda name: contextlib.nullcontext())
                add_version(registry, variant(trained, 3, noise=0.05), recorded_im=0.6, source_only_im=0.5)
        return measure(*args, **kwargs)

    monkeypatch.setattr(steps, "measure_for_gate", measure_while_another_registers)
    decision, judged, previous = steps.gate(cfg, NAME, version=third)
    assert not decision.promote and decision.criterion == "superseded" and (judged, previous) == (third, second)
    assert champion() == second and mlflow.MlflowClient().get_model_version(NAME, third).tags["gate.decision"] == "superseded"
    assert mlflow.MlflowClient().get_registered_model(NAME).tags[tracking.HISTORY_TAG] == second


def _promote_in_process(params: str, queue) -> None:
    cfg = load_config(Path(params), None, [])
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    decision, challenger, _ = steps.gate(cfg, NAME)
    queue.put((decision.promote, decision.criterion, challenger))


def test_concurrent_promotions_leave_one_consistent_champion(registry: Path, trained):
    add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_promote_in_process, args=(str(registry / "params.yaml"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    outcomes = sorted(queue.get(timeout=5) for _ in procs)
    # exactly one promoted; the other found the challenger already champion
    assert [o[0] for o in outcomes] == [False, True] and {o[1] for o in outcomes} == {"first", "same"}
    assert champion() == "1"
    assert mlflow.MlflowClient().get_registered_model(NAME).tags[tracking.HISTORY_TAG] == "1"


def test_the_gate_scores_each_version_on_its_own_input(registry: Path, trained):
    """params.yaml's input changed after the champion was registered (here 32 -> 48 px, as for a new
    backbone on bigger photos): the gate decodes the champion's images at its own 32 px, not today's
    48 (on which its 4x4 position embedding cannot run), and the challenger's at 48."""
    add_version(registry, variant(trained, 1), recorded_im=0.6, source_only_im=0.5)
    assert cli(["promote", "--model", NAME], registry).exit_code == 0 and champion() == "1"
    before = measured(registry, "1")
    params = yaml.safe_load((registry / "params.yaml").read_text())
    params["data"]["image_size"] = 48
    params["model"]["backbone_args"] = {"img_size": 48}
    (registry / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = _cfg(registry)
    torch.manual_seed(0)
    v2 = add_version(registry, ImageClassifier(steps.new_classifier(cfg, len(trained.classes)), trained.classes).eval())
    assert measured(registry, "1") == before  # the champion on its own input, whatever params.yaml says now
    data = steps.load_gate_data(cfg)
    pool, _, _ = data.at(packaged.input_spec(tracking.load_model(f"models:/{NAME}/{v2}").package_config))
    assert tuple(pool.shape[-2:]) == (48, 48)  # the challenger's input: today's
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    tags = mlflow.MlflowClient().get_model_version(NAME, v2).tags
    assert tags["gate.compared_with"] == "1"


def test_a_rolled_back_version_is_not_promoted_again_and_deleted_versions_leave_the_history_usable(registry: Path, trained):
    """A rollback is a person's decision: the next `promote` does not measure the rolled-back challenger
    again (and likely promote it back). Versions deleted by hand in the MLflow UI: a rollback skips them,
    and a promotion after the champion's own version was deleted keeps the earlier champions."""
    client = mlflow.MlflowClient()
    for i in range(4):
        add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)  # equal weights: each ties, is promoted
        assert "promoted" in cli(["promote", "--model", NAME], registry).output and champion() == str(i + 1)
    assert client.get_registered_model(NAME).tags[tracking.HISTORY_TAG] == "1,2,3,4"

    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 0 and "from v4 to v3" in result.output and champion() == "3"
    result = cli(["promote", "--model", NAME], registry)  # v4 is still @challenger
    assert result.exit_code == 0 and "not promoted: version 4 was rolled back at " in result.output, result.output
    assert champion() == "3" and "gate.decision" in client.get_model_version(NAME, "4").tags  # its first gate's tags kept

    client.delete_model_version(NAME, "2")  # the previous champion, deleted in the UI
    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 0 and "from v3 to v1" in result.output and champion() == "1", result.output

    client.set_registered_model_alias(NAME, "champion", "3")
    client.set_registered_model_tag(NAME, tracking.HISTORY_TAG, "1,3")
    client.delete_model_version(NAME, "3")  # the champion itself: MLflow drops its aliases with it
    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 2 and "has no champion to roll back from (its last champion, v3, was deleted)" in result.output
    add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    assert "promoted" in cli(["promote", "--model", NAME], registry).output and champion() == "5"
    assert client.get_registered_model(NAME).tags[tracking.HISTORY_TAG] == "1,5"  # v1 is still there to roll back to
    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 0 and "from v5 to v1" in result.output and champion() == "1"


def test_a_run_killed_between_registration_and_its_gate_leaves_no_copy_behind(registry: Path, trained):
    """The run after a kill computes the same weights (it resumes, or repeats the bits); it points
    `challenger` at the killed run's ungated version for the gate instead of registering a copy.
    Other weights, or a version whose run is still going or was adopted by one that is, get a version of their own."""
    client = mlflow.MlflowClient()
    first = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    killed_run = client.get_model_version(NAME, first).run_id
    live = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    assert live == "2"  # the first run has not ended: its version is no orphan (yet)
    client.set_terminated(killed_run, "KILLED")  # as the next run marks a run whose process is gone
    client.set_terminated(client.get_model_version(NAME, live).run_id, "FINISHED")
    other = add_version(registry, variant(trained, 9, noise=0.3))
    assert other == "3"  # other weights: a new version
    again = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    assert again == first and len(client.search_model_versions(f"name = '{NAME}'")) == 3
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == first
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`registry.adopted_from_run` = '{killed_run}'", output_format="list")
    [adopter] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the run, not its `register` step
    assert adopter.data.tags["registry.version"] == first
    assert client.get_model_version(NAME, first).tags["adopted_by_run"] == adopter.info.run_id
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and champion() == first, result.output
    # adopted by a run still going (or one that finished): the same weights again are a deliberate re-run
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == "4"


def test_a_run_killed_inside_its_gate_or_before_dropping_its_checkpoint_leaves_no_copy_behind(registry: Path, trained):
    """The gate's tags are written one by one, then the alias moves, then the checkpoint goes: a kill
    anywhere in there leaves a version the next run (the same weights: it resumes) adopts instead of
    registering a copy (until 2026-12-03 only a version no gate had touched was adopted). The gate then
    decides again, or finds that version the champion already."""
    client = mlflow.MlflowClient()
    cut = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    for key, value in {"gate.decision": "promoting", "gate.reason": "first version"}.items():  # killed mid-gate, alias not moved
        client.set_model_version_tag(NAME, cut, key, value)
    client.set_terminated(client.get_model_version(NAME, cut).run_id, "KILLED")
    assert champion() is None
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == cut
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and "first version" in result.output and champion() == cut, result.output
    assert client.get_registered_model(NAME).tags[tracking.HISTORY_TAG] == cut
    adopter = client.get_model_version(NAME, cut).tags["adopted_by_run"]

    client.set_terminated(adopter, "KILLED")  # the adopter killed after its gate, its checkpoint still there
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == cut
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and f"version {cut} is already the champion" in result.output, result.output
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    assert client.get_registered_model(NAME).tags[tracking.HISTORY_TAG] == cut  # no second entry for one promotion

    second = client.get_model_version(NAME, cut).tags["adopted_by_run"]
    client.set_terminated(second, "FINISHED")  # a run that went to its end adopted it: the same weights again are a re-run
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == "2"
    client.set_terminated(client.get_model_version(NAME, "2").run_id, "FAILED")  # a failed run's version is not adopted
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == "3"


# where a kill lands in the gate and rollback: the CLI takes the KeyboardInterrupt as Ctrl-C (exit 130)
# and the registry keeps the writes made before it
AT_THE_CHAMPION_ALIAS = ("set_registered_model_alias", lambda name, alias, version: alias == "champion")
AT_THE_LAST_WRITE = ("set_model_version_tag", lambda name, version, key, value: key == "gate.decision" and value in ("promoted", "rejected"))


def cli_killed(args, root, at) -> int:
    """Run the CLI killed at the first MlflowClient call `at` = (method, which call) picks; its exit code."""
    method, when = at
    real = getattr(mlflow.MlflowClient, method)

    def killed(self, *call):
        if when(*call):
            raise KeyboardInterrupt
        return real(self, *call)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlflow.MlflowClient, method, killed)
        return cli(args, root).exit_code


def test_a_promotion_killed_around_its_alias_never_leaves_promoted_on_a_version_that_is_not_champion(registry: Path, trained):
    """The decision reads `promoting` until the champion alias has moved, `promoted` after. Killed
    before the alias: the version never became champion, and the next gate marks it `interrupted`
    (until 2026-12-04 it said `promoted` beside another champion for good). Killed after the alias:
    the next gate, whatever it decides, settles it to `promoted`. A dry run writes nothing."""
    client = mlflow.MlflowClient()
    first = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    assert cli_killed(["promote", "--model", NAME], registry, AT_THE_CHAMPION_ALIAS) == 130
    assert champion() is None and client.get_model_version(NAME, first).tags["gate.decision"] == "promoting"
    assert cli(["promote", "--model", NAME, "--dry-run"], registry).exit_code == 0
    assert client.get_model_version(NAME, first).tags["gate.decision"] == "promoting"  # a dry run writes nothing

    second = add_version(registry, variant(trained, 1), recorded_im=0.6, source_only_im=0.5)  # a new run's other weights
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and champion() == second, result.output
    cut = client.get_model_version(NAME, first).tags
    assert cut["gate.decision"] == "interrupted" and cut["gate.reason"].startswith("the gate was cut short before its decision took effect")
    assert client.get_model_version(NAME, second).tags["gate.decision"] == "promoted"

    # killed after the alias moved, before the decision's last write
    third = add_version(registry, variant(trained, 1), recorded_im=0.6, source_only_im=0.5)  # the champion's weights: a tie, promoted
    assert cli_killed(["promote", "--model", NAME], registry, AT_THE_LAST_WRITE) == 130
    assert champion() == third and client.get_model_version(NAME, third).tags["gate.decision"] == "promoting"
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and f"version {third} is already the champion" in result.output, result.output
    assert client.get_model_version(NAME, third).tags["gate.decision"] == "promoted"
    assert [v.tags.get("gate.decision") for v in tracking.latest_versions(NAME)].count("promoting") == 0


def test_a_rollback_or_a_rejection_killed_half_way_leaves_no_false_tag(registry: Path, trained):
    """A rollback writes its mark on the demoted version before it moves the alias (until 2026-12-04 the
    mark came last, so a kill after the alias let the next gate promote that version again); killed
    before the alias, the mark on the still-champion goes at the next gate. A rollback settles a
    promotion whose last write was cut short, so that version says `promoted`, not `interrupted`.
    A rejection cut short says `interrupted`, not `rejected` beside an earlier gate's reason."""
    client = mlflow.MlflowClient()
    for seed in (0, 0):  # equal weights: the second ties the first and is promoted
        add_version(registry, variant(trained, seed), recorded_im=0.6, source_only_im=0.5)
        assert "promoted" in cli(["promote", "--model", NAME], registry).output
    assert champion() == "2"

    assert cli_killed(["rollback", "--model", NAME], registry, AT_THE_CHAMPION_ALIAS) == 130
    assert champion() == "2" and "gate.rolled_back_at" in client.get_model_version(NAME, "2").tags  # the mark, not the move
    result = cli(["promote", "--model", NAME], registry)  # v2 is the challenger and the champion
    assert result.exit_code == 0 and "version 2 is already the champion" in result.output, result.output
    assert "decided on" not in result.output  # nothing was measured: no empty table, no data it did not decide on
    assert "gate.rolled_back_at" not in client.get_model_version(NAME, "2").tags  # it was never rolled back

    # a promotion killed after its alias, before its last write; then a rollback
    add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    assert cli_killed(["promote", "--model", NAME], registry, AT_THE_LAST_WRITE) == 130
    assert champion() == "3" and client.get_model_version(NAME, "3").tags["gate.decision"] == "promoting"
    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 0 and "from v3 to v2" in result.output, result.output
    v3 = client.get_model_version(NAME, "3").tags
    assert v3["gate.decision"] == "promoted" and "gate.rolled_back_at" in v3  # it was champion, then rolled back

    # a rejection killed before its last write
    add_version(registry, variant(trained, 0, collapse=True), recorded_im=0.9, source_only_im=0.1)
    assert cli_killed(["promote", "--model", NAME], registry, AT_THE_LAST_WRITE) == 130
    assert client.get_model_version(NAME, "4").tags["gate.decision"] == "rejecting"
    result = cli(["promote", "--model", NAME], registry)  # decides again: collapsed
    assert result.exit_code == 0 and "collapsed" in result.output and champion() == "2", result.output
    assert client.get_model_version(NAME, "4").tags["gate.decision"] == "rejected"


def test_a_retrain_on_unchanged_data_skips_only_past_a_gate_that_decided(registry: Path, trained):
    """A scheduled retrain skips when source and target equal the champion's data, or the challenger's
    once a gate decided on it. A challenger whose run was killed before its gate decided does not
    count (until 2026-12-04 it did, so every retrain skipped and that version stayed ungated for good)."""
    from tasks.lineage import data_unchanged_since_champion
    from udaflow import versioning

    cfg = _cfg(registry)
    client = mlflow.MlflowClient()
    v = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    for role, domain in (("source", cfg.source), ("target", cfg.target)):  # what a pipeline run tags
        client.set_model_version_tag(NAME, v, f"data.{role}.md5", versioning.dataset_version(Path(cfg.data.root) / domain).md5)
    assert data_unchanged_since_champion.fn(cfg) is None  # ungated: the retrain runs (and adopts it)
    client.set_model_version_tag(NAME, v, "gate.decision", "promoting")  # killed inside its gate
    assert data_unchanged_since_champion.fn(cfg) is None
    client.set_model_version_tag(NAME, v, "gate.decision", "rejected")
    assert "equal the challenger's" in data_unchanged_since_champion.fn(cfg)


def test_a_run_killed_right_after_its_version_was_created_has_it_adopted_not_copied(registry: Path, trained, monkeypatch):
    """The version is created with every tag and the `complete` mark in one registry call: a kill right
    after it (MLflow has printed "Created version") leaves a whole version without an alias, and the next
    run with the same weights adopts it. Until 2026-12-04 the tags came one call at a time after it, and
    a kill in that gap left a version without even its weights tag, which no run could adopt."""
    client = mlflow.MlflowClient()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill leaves in the registry: everything written before it

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", killed)
    with pytest.raises(KeyboardInterrupt):
        add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    monkeypatch.undo()
    cut = client.get_model_version(NAME, "1")
    assert cut.tags[tracking.COMPLETE_TAG] == "true" and cut.tags["validator_selected.im"] == "0.6" and cut.tags[tracking.WEIGHTS_TAG]
    assert tracking._alias_version(NAME, "challenger") is None
    client.set_terminated(cut.run_id, "KILLED")
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    assert client.get_model_version(NAME, "1").tags["adopted_by_run"] != cut.run_id


def test_a_version_an_older_udaflow_cut_short_inside_its_tags_is_completed_not_copied(registry: Path, trained, monkeypatch):
    """What the tag-by-tag registration before 2026-12-04 could leave: the version holds the weights (its
    first tag says which) but no `complete` mark. The next run, with the same weights, finishes that
    registration instead of leaving it incomplete beside a copy. A version without its weights tag
    cannot say what it holds: it stays incomplete, and a new one is registered."""
    client = mlflow.MlflowClient()
    real = mlflow.register_model

    def cut_short(uri, name, *args, tags, **kwargs):  # the first two tags written, then killed
        real(uri, name, *args, tags=dict(list(tags.items())[:2]), **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow, "register_model", cut_short)
    with pytest.raises(KeyboardInterrupt):
        add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    monkeypatch.undo()
    cut = client.get_model_version(NAME, "1")
    assert cut.tags[tracking.WEIGHTS_TAG] and tracking.COMPLETE_TAG not in cut.tags and tracking.incomplete_versions(NAME) == ["1"]
    client.set_terminated(cut.run_id, "KILLED")
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == "1"
    done = client.get_model_version(NAME, "1")
    assert done.tags[tracking.COMPLETE_TAG] == "true" and done.tags["run_id"] == cut.run_id and done.tags["method"] == "test"
    assert done.tags["validator_selected.im"] == "0.6" and tracking.incomplete_versions(NAME) == []
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and champion() == "1", result.output

    bare = client.create_model_version(NAME, done.source, run_id=cut.run_id)  # a kill before the first tag
    assert add_version(registry, variant(trained, 3, noise=0.3)) == str(int(bare.version) + 1)
    assert tracking.incomplete_versions(NAME) == [str(bare.version)]


def test_a_run_killed_on_another_machine_is_ended_once_its_heartbeat_stops_and_its_version_adopted(registry: Path, trained, monkeypatch):
    """A team's machines share one store. A run left RUNNING by a machine that crashed (or a process
    killed outright there) cannot be checked by pid from here: its heartbeat, rewritten every
    HEARTBEAT_S while its process lives, decides. Until 2026-12-04 only the run's own host ended it,
    so another machine's retrain registered a copy of the weights beside the orphan for good."""
    import time

    client = mlflow.MlflowClient()
    cfg = _cfg(registry)
    exp = tracking.experiment_id(cfg.source, cfg.target)

    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.05)
    run = tracking.open_pipeline_run(cfg.model_dump(mode="json"), registry / "params.yaml", "flow-run")
    started = int(client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG])
    assert abs(started - time.time()) < 60
    client.set_tag(run.run_id, tracking.HEARTBEAT_TAG, "0")  # the thread writes over it while the process lives
    deadline = time.time() + 30
    while client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG] == "0" and time.time() < deadline:
        time.sleep(0.05)
    assert int(client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG]) >= started
    tracking.close_pipeline_run(run, {})
    client.set_tag(run.run_id, tracking.HEARTBEAT_TAG, "1")
    time.sleep(0.5)
    assert client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG] == "1"  # an ended run beats no more

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # a run that fails before the caller has it to close ends itself
        m.setattr(tracking, "log_artifact", no_room)
        with pytest.raises(OSError):
            tracking.open_pipeline_run(cfg.model_dump(mode="json"), registry / "params.yaml", "flow-run")
    [failed] = mlflow.search_runs([exp], "attributes.status = 'FAILED'", output_format="list")
    assert failed.info.run_id not in tracking._heartbeats

    first = add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    crashed = client.get_model_version(NAME, first).run_id
    child = tracking.start_run(exp, "adapt", {}, crashed)
    beat = time.time() - 60
    client.set_tag(crashed, "udaflow.host", "another-machine")
    client.set_tag(crashed, "udaflow.pid", "1")  # a pid alive here, and meaningless: it is another machine's
    client.set_tag(crashed, tracking.HEARTBEAT_TAG, str(int(beat)))
    silent = tracking.start_run(exp, "older", {"udaflow.host": "another-machine", "udaflow.pid": "1"})  # no heartbeat: not judged
    assert tracking.end_runs_of_dead_processes(exp) == []  # beating a minute ago: alive
    client.set_tag(crashed, tracking.HEARTBEAT_TAG, str(int(time.time() - tracking.STALE_S - 1)))
    assert tracking.end_runs_of_dead_processes(exp) == [crashed]
    assert client.get_run(crashed).info.status == "KILLED" and client.get_run(child).info.status == "KILLED"
    assert client.get_run(silent).info.status == "RUNNING"
    # this machine's next run, with the same weights, adopts the orphan's version instead of a copy
    assert add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5) == first
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1


def _move_files_away(version: str, to: Path) -> tuple[Path, Path]:
    """Move a version's logged-model folder out of the artifact store, as a person cleaning disk would."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    location = ModelsArtifactRepository.get_underlying_uri(f"models:/{NAME}/{version}")
    folder = Path(location.removeprefix("file://"))
    assert (folder / "MLmodel").is_file(), location
    return Path(folder.rename(to / f"v{version}-files")), folder


def test_a_version_whose_files_are_gone_is_one_line_and_moves_nothing(registry: Path, trained):
    """A registered version whose model files were deleted: rollback to it, a gate against it as the champion,
    a registration that the gate would then fail on, and serving it each end in one line, exit 2, with the
    registry as it was (before, the gate and serve ended in MLflow's traceback, the next run registered a
    copy, and rollback made an unloadable version the champion)."""
    client = mlflow.MlflowClient()
    add_version(registry, variant(trained, 0), recorded_im=0.6, source_only_im=0.5)
    add_version(registry, variant(trained, 0), recorded_im=0.7, source_only_im=0.5)
    client.set_registered_model_alias(NAME, "challenger", "1")
    assert cli(["promote", "--model", NAME], registry).exit_code == 0 and champion() == "1"
    client.set_registered_model_alias(NAME, "challenger", "2")
    assert "promoted" in cli(["promote", "--model", NAME], registry).output and champion() == "2"  # the same weights: a tie

    aside, home = _move_files_away("1", registry)
    for dry in (["--dry-run"], []):
        result = cli(["rollback", "--model", NAME, *dry], registry)
        lines = result.output.splitlines()
        assert result.exit_code == 2 and lines[0].startswith(
            f"error: {NAME} v1 (the previous champion, the rollback's target): its model files cannot be read ("), result.output
        assert "No such artifact" in lines[0] and lines[1].startswith("hint: nothing changed; restore v1's files"), result.output
        assert champion() == "2" and "gate.rolled_back_at" not in client.get_model_version(NAME, "2").tags
    assert client.get_registered_model(NAME).tags[tracking.HISTORY_TAG] == "1,2"

    aside.rename(home)
    _move_files_away("2", registry)
    with pytest.raises(tracking.ModelUnreadable, match=f"^{NAME} champion v2: its model files cannot be read"):
        add_version(registry, variant(trained, 5), recorded_im=0.8, source_only_im=0.5)  # a run's registration
    assert [v.version for v in tracking.latest_versions(NAME)] and len(tracking.latest_versions(NAME)) == 2  # nothing registered

    client.set_registered_model_alias(NAME, "challenger", "1")
    decided = client.get_model_version(NAME, "1").tags["gate.decision"]
    result = cli(["promote", "--model", NAME], registry)
    lines = result.output.splitlines()
    assert result.exit_code == 2 and lines[0].startswith(f"error: {NAME} champion v2: its model files cannot be read ("), result.output
    assert "udaflow rollback" in lines[1] and "Traceback" not in result.output, result.output
    assert champion() == "2" and client.get_model_version(NAME, "1").tags["gate.decision"] == decided  # nothing decided

    result = cli(["serve", "--model", NAME], registry)  # refused before MLflow's scoring server starts
    assert result.exit_code == 2 and result.output.startswith(f"error: {NAME} @champion (v2): its model files cannot be read ("), result.output


def test_a_run_whose_pid_another_process_holds_now_is_ended(registry: Path):
    """A killed run's pid, alive again as another process (a container's pid 1 after a restart, a reboot,
    plain reuse): the process's start time and boot id tell it apart; without them (a run tagged before),
    its stale heartbeat does. Before, `os.kill(pid, 0)` alone kept such a run RUNNING for good, and every
    later run registered a copy of its version."""
    import os
    import socket
    import time

    client = mlflow.MlflowClient()
    cfg = _cfg(registry)
    exp = tracking.experiment_id(cfg.source, cfg.target)
    me = tracking.process_identity(os.getpid())
    assert me and me.count(":") == 1  # Linux: /proc says it
    here = {"udaflow.host": socket.gethostname(), "udaflow.pid": str(os.getpid())}
    fresh, stale = str(int(time.time())), str(int(time.time() - tracking.STALE_S - 1))
    alive = tracking.start_run(exp, "alive", {**here, tracking.PROCESS_TAG: me, tracking.HEARTBEAT_TAG: stale})
    reused = tracking.start_run(exp, "reused", {**here, tracking.PROCESS_TAG: "another-boot:12345", tracking.HEARTBEAT_TAG: fresh})
    older_beating = tracking.start_run(exp, "older, beating", {**here, tracking.HEARTBEAT_TAG: fresh})
    older_silent = tracking.start_run(exp, "older, silent", {**here, tracking.HEARTBEAT_TAG: stale})
    assert sorted(tracking.end_runs_of_dead_processes(exp)) == sorted([reused, older_silent])
    status = {r: client.get_run(r).info.status for r in (alive, reused, older_beating, older_silent)}
    assert status == {alive: "RUNNING", reused: "KILLED", older_beating: "RUNNING", older_silent: "KILLED"}
    for run_id in (alive, older_beating):
        tracking.end_run(run_id)
