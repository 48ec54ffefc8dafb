"""params.yaml loading: profiles, --set overrides, and errors that name the file and key."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from udaflow.config import Config, ConfigError, deep_merge, load_config, parse_override, read_yaml
from udaflow.methods import create_method
from udaflow.models import build_classifier

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

PARAMS = """\
seed: 3
source: synth
target: mnist
train:
  batch_size: 32
  lr: 0.002
  augment:
    translate: 2
    color: true
methods:
  dann: {trade_off: 1.0}
profiles:
  quick:
    train: {batch_size: 8, augment: {color: false}}
    methods: {dann: {hidden: 16}}
  empty:
"""


@pytest.fixture
def params(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    return path


def test_base_values_and_defaults(params):
    cfg = load_config(params)
    assert isinstance(cfg, Config)
    assert cfg.seed == 3 and cfg.train.batch_size == 32 and cfg.train.lr == 0.002
    assert cfg.train.augment.translate == 2 and cfg.train.augment.color is True
    assert cfg.train.eval_every == 200  # not in the file: the model's default
    assert cfg.methods == {"dann": {"trade_off": 1.0}}


def test_profile_is_deep_merged(params):
    cfg = load_config(params, profile="quick")
    assert cfg.train.batch_size == 8
    assert cfg.train.lr == 0.002  # sibling kept
    assert cfg.train.augment.color is False and cfg.train.augment.translate == 2  # nested sibling kept
    assert cfg.methods == {"dann": {"trade_off": 1.0, "hidden": 16}}
    assert load_config(params, profile="empty").train.batch_size == 32  # an empty profile changes nothing


def test_overrides_are_typed_as_yaml_and_win_last(params):
    cfg = load_config(
        params, profile="quick",
        overrides=[
            "train.batch_size=4", "train.lr=0.01", "train.progress=false", "model.pretrained=null",
            "target=mnistm", "methods.dann.hidden=64", "methods.mcc.temperature=2.0", "model.backbone_args={depth: 1}",
        ],
    )
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.lr == 0.01
    assert cfg.train.progress is False
    assert cfg.model.pretrained is None
    assert cfg.target == "mnistm"
    assert cfg.methods["dann"] == {"trade_off": 1.0, "hidden": 64}  # override beats the profile
    assert cfg.methods["mcc"] == {"temperature": 2.0}  # new sections are created
    assert cfg.model.backbone_args == {"depth": 1}


def test_parse_override():
    assert parse_override("train.lr=0.001") == (["train", "lr"], 0.001)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("s=a=b") == (["s"], "a=b")  # split on the first '=' only
    # YAML 1.2 floats, as DVC reads params.yaml: PyYAML's 1.1 made '5e-1' text, which method options refused
    assert parse_override("methods.adamatch.tau=5e-1") == (["methods", "adamatch", "tau"], 0.5)
    assert parse_override("train.lr=-3E-3") == (["train", "lr"], -0.003) and parse_override("x=1e") == (["x"], "1e")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match=r"^--set 'train.lr=\[0.1': the value is not valid YAML \(expected ',' or '\]'"):
        parse_override("train.lr=[0.1")
    for item, message in (("=5", "no key before ="), ("train..lr=1", "an empty part in the key"), ("train.=1", "an empty part in the key")):
        with pytest.raises(ConfigError, match=f"--set '{re.escape(item)}': {message}; expected key=value"):
            parse_override(item)


@pytest.mark.parametrize("text", ["2024-06-01", "017", "0x1f", "2024", "on", "no", "true"])
def test_a_name_stays_the_text_typed_where_params_hold_text(params, text):
    """Domain and method names that YAML would read as a date, an (octal) number or a boolean: a user
    may ingest a target named 2024-06-01 and must be able to run on it."""
    assert parse_override(f"target={text}") == (["target"], text)
    assert parse_override(f"data.root=data/{text}") == (["data", "root"], f"data/{text}")
    assert parse_override(f"tracking.artifact_root={text}") == (["tracking", "artifact_root"], text)
    cfg = load_config(params, overrides=[f"source={text}", f"target={text}", f"method={text}"])
    assert (cfg.source, cfg.target, cfg.method) == (text, text, text)
    # the other fields still read YAML
    assert parse_override("seed=2024")[1] == 2024 and parse_override("train.amp=on")[1] is True
    assert parse_override("train.lr=0.5e-3")[1] == 0.0005 and parse_override("model.pretrained=null")[1] is None


def test_override_through_a_value_is_an_error(params):
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(params, overrides=["seed.x=1"])


def test_unknown_key_names_dotted_path_and_file(params):
    params.write_text(PARAMS.replace("  lr: 0.002", "  lr: 0.002\n  lrr: 0.1"))
    with pytest.raises(ConfigError) as info:
        load_config(params)
    message = str(info.value)
    assert message.startswith(f"{params}: train.lrr: unknown key (known: device, batch_size, lr, ")


def test_unknown_nested_key_from_override(params):
    with pytest.raises(ConfigError, match=r"^--set train\.augment\.flip: unknown key \(known: translate, color, invert, rotate, scale, strong_rotate, strong_shear\)$"):
        load_config(params, overrides=["train.augment.flip=true"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=many", "train.batch_size: expected an integer (got 'many')"),
    ("train.batch_size=2.5", "train.batch_size: expected an integer (got 2.5)"),
    ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0 (got -1)"),
    ("train.lr=0", "train.lr: must be > 0 (got 0)"),
    ("data.holdout_fraction=1", "data.holdout_fraction: must be < 1 (got 1)"),
    ("train.augment.invert=1.5", "train.augment.invert: must be <= 1 (got 1.5)"),
    ("train.amp=null", "train.amp: expected true or false (got null)"),
    ("bench.protocol=sometimes", "bench.protocol: must be 'transductive' or 'holdout' (got 'sometimes')"),
    ("methods.dann=5", "methods.dann: expected a mapping (got 5)"),
    ("target=Factory/B", "target: not a domain name: lower-case letters, digits, '-' and '_', starting with a letter or digit, at most 64 characters (a folder under data.root) (got 'Factory/B')"),
    ("source=..", "source: not a domain name"),
    ("target=_cam", "target: not a domain name: lower-case letters, digits, '-' and '_', starting with a letter or digit"),
    # pydantic's lax mode read these as 1, 0 and True, and a negative seed or thread count failed mid-run
    ("train.adapt_steps=true", "train.adapt_steps: expected a number (got true)"),
    ("data.synth_size=false", "data.synth_size: expected a number (got false)"),
    ("train.deterministic=1", "train.deterministic: expected true or false (got 1)"),
    ("train.num_threads=-2", "train.num_threads: must be > 0 (got -2)"),
    # an infinity passed every gt=0 bound: the run trained to NaN losses and ended in a traceback
    ("train.lr=.inf", "train.lr: must be a finite number (got inf)"),
    ("promotion.source_tolerance=.inf", "promotion.source_tolerance: must be a finite number (got inf)"),
])
def test_wrong_type_or_range_names_where_it_came_from_key_and_value(params, override, message):
    """A value given with --set is named as --set's (as the option a CLI took it from, when `flags` says
    which); the same value in the params file names the file."""
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=[override])
    assert str(info.value).startswith(f"--set {message}")
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=[override], flags={key: "--option"})
    assert str(info.value).startswith(f"--option: {message}")
    with pytest.raises(ConfigError) as info:  # another key's override does not take the blame
        load_config(params, overrides=[override, "seed=3"], flags={"seed": "--seed"})
    assert str(info.value).startswith(f"--set {message}")


def test_a_negative_seed_is_refused_before_anything_runs(params):
    """numpy's generators refuse it: a run trained all its steps, then failed at evaluation."""
    for value, message in (("-1", "--set seed: must be >= 0 (got -1)"), ("false", "--set seed: expected a number (got false)")):
        with pytest.raises(ConfigError) as info:
            load_config(params, overrides=[f"seed={value}"])
        assert str(info.value).startswith(message)


def test_a_section_s_own_check_and_the_winning_override_take_the_blame(params):
    with pytest.raises(ConfigError) as info:  # DriftConfig's validator reports at `drift`, the value came from --set
        load_config(params, overrides=["drift.alpha=0.01", "drift.permutations=60"])
    assert str(info.value).startswith("--set drift: permutations: 60 cannot give a p-value")
    with pytest.raises(ConfigError) as info:  # two overrides of one key: the last one won, and is named
        load_config(params, overrides=["train.device=tpu", "train.device=gpu"], flags={"train.device": "--device"})
    assert str(info.value).startswith("--device: train.device: use auto, cpu, cuda or cuda:N (got 'gpu')")


def test_a_wrong_value_in_the_file_names_the_file_even_beside_overrides(params):
    params.write_text(params.read_text() + "\nextra_key: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=["seed=3", "train.lr=0.1"])
    assert str(info.value).startswith(f"{params}: extra_key: unknown key")


def test_artifact_root_is_a_folder_here_and_a_store_uri_is_refused(params, tmp_path, monkeypatch):
    """`tracking.artifact_root: s3://bucket/mlflow` (as `mlflow server --default-artifact-root` takes it) was
    read as the relative path `s3:/bucket/mlflow`: a run wrote every artifact and model to that local folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(params, overrides=["tracking.artifact_root=s3://team-bucket/mlflow"])
    assert str(info.value).startswith("--set tracking.artifact_root: a folder on this machine, not a store's URI"), info.value
    assert "--artifacts-destination s3://" in str(info.value) and "(got 's3://team-bucket/mlflow')" in str(info.value)
    params.write_text(PARAMS + "tracking: {artifact_root: 'gs://bucket/x'}\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(params))}: tracking.artifact_root: a folder on this machine"):
        load_config(params)
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()
    # MLflow's spelling of a local folder is that folder; a plain path stays as written
    params.write_text(PARAMS)
    cfg = load_config(params, overrides=["tracking.artifact_root=file:///srv/ml%20store/artifacts"])
    assert cfg.tracking.artifact_root == Path("/srv/ml store/artifacts")
    assert load_config(params, overrides=["tracking.artifact_root=team/artifacts"]).tracking.artifact_root == Path("team/artifacts")


def test_a_tracking_uri_mlflow_refuses_is_a_config_error(params, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("mlruns", "./mlruns", "file:///srv/mlruns"):
        with pytest.raises(ConfigError, match="^--set tracking.uri: a folder is MLflow's file store, which MLflow 3 refuses"):
            load_config(params, overrides=[f"tracking.uri={uri}"])
    with pytest.raises(ConfigError, match="^--set tracking.uri: a SQLite store is sqlite:/// and its file"):
        load_config(params, overrides=["tracking.uri=sqlite://mlflow.db"])
    for uri in ("sqlite:///mlflow/mlflow.db", "sqlite:////srv/m.db", "postgresql://db-host/mlflow", "https://mlflow.example.org"):
        assert load_config(params, overrides=[f"tracking.uri={uri}"]).tracking.uri == uri
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out is respected
    assert load_config(params, overrides=["tracking.uri=./mlruns"]).tracking.uri == "./mlruns"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite://x.db")  # the variable wins over params.yaml, and is named
    with pytest.raises(ConfigError, match="^MLFLOW_TRACKING_URI: tracking.uri: a SQLite store is sqlite:///"):
        load_config(params)


def test_unknown_profile_lists_known(params):
    with pytest.raises(ConfigError) as info:
        load_config(params, profile="huge")
    message = str(info.value)
    assert f"--profile huge: {params} has no such profile (known: empty, quick)" in message, message
    assert "under `profiles:`" in info.value.hint, info.value.hint


def test_missing_and_malformed_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no such params file") as info:
        load_config(tmp_path / "absent.yaml")
    assert "the current folder has no params.yaml: run from the repository root" in info.value.hint, info.value.hint
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="no such params file") as info:
        load_config("absent.yaml")  # a typo'd --params beside the project's own file
    assert info.value.hint.startswith("the current folder's params.yaml is there: leave --params out to use it")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    for profiles, message in (("profiles: quick\n", "profiles: expected a mapping"),
                              ("profiles: {quick: [1]}\n", "profiles.quick: expected a mapping of parameters")):
        bad.write_text(f"seed: 1\n{profiles}")
        with pytest.raises(ConfigError, match=message):
            load_config(bad, profile="quick")
    bad.write_text("target: 2024-06-01\nmethod: 017\n")  # unquoted names YAML reads as a date and a number
    with pytest.raises(ConfigError, match=r'target: expected a string \(got datetime.date\(2024, 6, 1\): YAML read it as a date; '
                                          r'quote it: target: "2024-06-01"\)$'):
        load_config(bad)
    bad.write_text("method: 017\n")
    with pytest.raises(ConfigError, match=r'method: expected a string \(got 15: YAML read it as a number; quote it: method: "..."\)$'):
        load_config(bad)
    with pytest.raises(ConfigError, match="a folder, not a params file"):  # read_text's IsADirectoryError came as a traceback
        load_config(tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")  # it ran cdtrans at 1e-3 and other code defaults, not params.yaml's recipe
    with pytest.raises(ConfigError, match="the params file is empty"):
        load_config(empty)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listy)
    latin = tmp_path / "latin.yaml"
    for data, byte in ((b"seed: 0\n# caf\xe9\n", "0xe9 at offset 13"), ("seed: 0\n".encode("utf-16"), "0xff at offset 0")):
        latin.write_bytes(data)  # a Latin-1 byte; a copy a Windows editor saved as UTF-16: UnicodeDecodeError tracebacks
        with pytest.raises(ConfigError, match=f"latin.yaml: not UTF-8 text \\(byte {byte}\\)$"):
            load_config(latin)


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": 1}
    over = {"a": {"c": {"d": 3}}, "f": 4}
    merged = deep_merge(base, over)
    assert merged == {"a": {"b": 1, "c": {"d": 3}}, "e": 1, "f": 4}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": 1}
    merged["a"]["c"]["d"] = 99
    assert over["a"]["c"]["d"] == 3


@pytest.mark.skipif(not REPO_PARAMS.exists(), reason="no params.yaml at the repository root")
def test_repository_params_load_with_every_profile():
    import yaml

    profiles = [None, *(yaml.safe_load(REPO_PARAMS.read_text()).get("profiles") or {})]
    clf = build_classifier("udaflow_vit_micro", 3)
    base = load_config(REPO_PARAMS)
    for profile in profiles:
        cfg = load_config(REPO_PARAMS, profile=profile)
        for name, options in cfg.methods.items():  # every method option in params.yaml is a real option
            create_method(name, clf, options)
        # the built-in domains are dvc.yaml's build stages, built with params.yaml's data.*: a profile
        # naming other data settings stops every run (`--profile full` did, on a fresh checkout)
        assert cfg.data == base.data, profile



def test_a_params_file_that_leaves_out_keys_params_yaml_sets_is_told_which_and_what_fills_them(tmp_path, monkeypatch):
    """The code's defaults are the plain methods (a run recorded before a key existed re-runs as it ran),
    not params.yaml's recipe: a `--params` file of a few keys trained cdtrans at 1e-3 without the rotation
    task, and only the end of a run said that its settings were not params.yaml's."""
    from typer.testing import CliRunner

    from udaflow.cli import app
    from udaflow.config import left_to_defaults

    project = load_config(REPO_PARAMS)
    (tmp_path / "exp.yaml").write_text("source: synth\ntarget: mnist\ntrain: {adapt_steps: 10, rotation_weight: 0.5}\n"
                                       "methods: {cdtrans: {ema: 0.5}}\n")
    cfg = load_config(tmp_path / "exp.yaml", overrides=["train.adapt_lr=0.003"])
    left = {key: (ours, theirs) for key, ours, theirs in left_to_defaults(cfg, project)}
    assert left["method"] == ("cdtrans", "adamatch")
    assert left["train.pretrain_steps"] == (1500, 1000)
    assert left["train.pseudo_labels.neighbours"] == (0, 10)
    assert left["methods.adamatch.weak_target_grad"] == (True, False)  # a method's option: its Config's default
    assert left["methods.cdtrans.warmup_fraction"] == (0.0, 0.5)
    assert "methods.cdtrans.step_scale" not in left  # params.yaml's 1.0 is the code's: no news
    # what the file, its overrides or a method block in it set is the user's choice; equal defaults are no news
    assert not {"train.adapt_steps", "train.rotation_weight", "train.adapt_lr", "methods.cdtrans.ema"} & left.keys()
    assert not {"seed", "train.lr", "methods.dann.trade_off", "methods.ssrt.layers"} & left.keys()
    assert left_to_defaults(load_config(REPO_PARAMS), project) == []

    # through the CLI: one warning before anything runs, not for the folder's own params.yaml
    (tmp_path / "params.yaml").write_text(REPO_PARAMS.read_text())
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["run", "--params", "exp.yaml", "--source", "nosuch"])
    assert out.exit_code == 2 and "nosuch" in out.output
    warnings = [line for line in out.output.splitlines() if line.startswith("warning: exp.yaml leaves out")]
    assert len(warnings) == 1 and "method 'cdtrans' (params.yaml: 'adamatch')" in out.output
    assert "copy params.yaml" in out.output
    out = CliRunner().invoke(app, ["run", "--params", "params.yaml", "--source", "nosuch"])
    assert out.exit_code == 2 and "leaves out" not in out.output


@pytest.mark.parametrize("stage", ["pretrain", "adapt", "evaluate"])
def test_every_dvc_stage_checks_the_run_as_the_validate_stage_does(tmp_path, stage):
    """`dvc repro` runs adapt alone after a change to `method` or `validator` (validate's params did not
    change): the stage said "unknown method 'dnn'" without the file, the key or a hint."""
    from typer.testing import CliRunner

    from udaflow.cli import app

    text = REPO_PARAMS.read_text()
    (tmp_path / "bad.yaml").write_text(re.sub(r"(?m)^method: \w+", "method: dnn", text).replace("methods:", "methods:\n  dnn: {}", 1))
    out = CliRunner().invoke(app, ["stage", stage, "--params", str(tmp_path / "bad.yaml")])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert out.output.splitlines()[0].startswith(f"error: {tmp_path / 'bad.yaml'}: method: unknown method 'dnn' (known: ")
    assert out.output.splitlines()[1].startswith("hint: ")


@pytest.mark.parametrize("stage", ["pretrain", "adapt", "evaluate"])
def test_a_stage_stopped_with_ctrl_c_says_what_dvc_repro_and_dvc_checkout_do_next(monkeypatch, stage):
    """A SIGINT'd stage printed a bare `interrupted`: not that DVC had removed its outputs, nor how to go on."""
    import contextlib

    from typer.testing import CliRunner

    from udaflow import cli, steps

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_stage_config", lambda params: load_config(REPO_PARAMS))
    monkeypatch.setattr(steps, "domains_in_use", lambda cfg: contextlib.nullcontext())
    monkeypatch.setattr(steps, stage, stopped)
    out = CliRunner().invoke(cli.app, ["stage", stage])
    assert out.exit_code == 130 and "Traceback" not in out.output
    assert " ".join(out.output.split()) == ("interrupted: `dvc repro` runs the stage again (adaptation from its last checkpoint); "
                                            "until then its outputs are missing (`dvc checkout` brings back the ones dvc.lock records)")

def test_debug_shows_where_a_ctrl_c_landed_then_the_same_line_and_exit_code(monkeypatch):
    """Under --debug a Ctrl-C printed nothing at all and exited 130 (typer's silent exit): no traceback, no line."""
    import contextlib

    from typer.testing import CliRunner

    from udaflow import cli, steps

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_stage_config", lambda params: load_config(REPO_PARAMS))
    monkeypatch.setattr(steps, "domains_in_use", lambda cfg: contextlib.nullcontext())
    monkeypatch.setattr(steps, "adapt", stopped)
    try:
        out = CliRunner().invoke(cli.app, ["--debug", "stage", "adapt"])
    finally:
        cli._STATE["debug"] = False  # the process's flag, set by each invocation's --debug: not left on for the tests after
    assert out.exit_code == 130 and "Traceback" in out.output and "KeyboardInterrupt" in out.output, out.output
    assert "interrupted: `dvc repro` runs the stage again" in " ".join(out.output.split())


def test_an_ingest_stopped_with_ctrl_c_says_which_version_stands(monkeypatch):
    """A probe's replace, interrupted past its commit point, printed a bare `interrupted`: the new version stood unsaid."""
    from typer.testing import CliRunner

    from udaflow import cli
    from udaflow.data import ingest

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest, "ingest_domain", stopped)
    out = CliRunner().invoke(cli.app, ["data", "ingest", str(REPO_PARAMS.parent), "--name", "x", "--replace"])
    assert out.exit_code == 130 and " ".join(out.output.split()) == (
        "interrupted: an ingest stopped before DVC recorded the new version left the domain as it was; one stopped after keeps it "
        "(its pointer in `git status`), and the same command again announces it (drift, retrain trigger) if it was not yet")


def test_a_bench_ended_by_sigterm_says_where_its_rows_are_and_exits_143(monkeypatch):
    """A CI job's timeout (SIGTERM) ended a bench with exit 143 and no word (a probe), where Ctrl-C says where
    the rows done so far are. SIGTERM's own handling is back once the bench ends."""
    import contextlib
    import os
    import signal
    import time

    from typer.testing import CliRunner

    from udaflow import bench, cli, preflight, steps

    def terminated(*args, **kwargs):
        assert callable(signal.getsignal(signal.SIGTERM)), "SIGTERM not handled: it would end pytest itself"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not turned into an interruption")

    monkeypatch.setattr(steps, "recover_ingests", lambda *a: None)
    monkeypatch.setattr(preflight, "validate_run", lambda *a, **k: None)
    monkeypatch.setattr(steps, "domains_in_use", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(bench, "run_bench", terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = CliRunner().invoke(cli.app, ["bench", "--shifts", "synth:mnist", "--methods", "dann", "--params", str(REPO_PARAMS)])
    assert out.exit_code == 143 and " ".join(out.output.split()) == "terminated: the rows done so far are in --out", out.output
    assert signal.getsignal(signal.SIGTERM) is before

# ----------------------------------------------------------------------------- methods.<name> options
@pytest.mark.parametrize("name, options, message", [
    ("adamatch", {"tau": 1.5}, "methods.adamatch.tau: must be <= 1 (got 1.5)"),
    ("adamatch", {"tau": 0}, "methods.adamatch.tau: must be > 0 (got 0)"),
    ("adamatch", {"teacher_ema": 1.0}, "methods.adamatch.teacher_ema: must be < 1 (got 1.0)"),
    ("dann", {"trade_off": -1}, "methods.dann.trade_off: must be >= 0 (got -1)"),
    ("dann", {"hidden": 0}, "methods.dann.hidden: must be >= 1 (got 0)"),
    ("dann", {"hidden": 8.0}, "methods.dann.hidden: expected an integer (got 8.0)"),
    ("dann", {"trade_off": "big"}, "methods.dann.trade_off: expected a number (got 'big')"),
    ("dann", {"trade_off": float("nan")}, "methods.dann.trade_off: must be a finite number (got nan)"),
    ("cdan", {"entropy": 1}, "methods.cdan.entropy: expected true or false (got 1)"),
    ("cdan", {"label_smoothing": 1.2}, "methods.cdan.label_smoothing: must be <= 1 (got 1.2)"),
    ("cdtrans", {"refresh_every": 0}, "methods.cdtrans.refresh_every: must be >= 1 (got 0)"),
    ("cdtrans", {"warmup_fraction": 1}, "methods.cdtrans.warmup_fraction: must be < 1 (got 1)"),
    ("cdtrans", {"step_scale": 0}, "methods.cdtrans.step_scale: must be > 0 (got 0)"),
    ("mcc", {"temperature": 0}, "methods.mcc.temperature: must be > 0 (got 0)"),
    ("ssrt", {"alpha": 2}, "methods.ssrt.alpha: must be <= 1 (got 2)"),
    ("ssrt", {"period": 0}, "methods.ssrt.period: must be >= 1 (got 0)"),
    ("ssrt", {"layers": [0, -2]}, "methods.ssrt.layers[1]: must be >= 0 (got -2)"),
    ("ssrt", {"layers": 3}, "methods.ssrt.layers: expected a list (got 3)"),
    ("source_only", {"label_smoothing": -0.1}, "methods.source_only.label_smoothing: must be >= 0 (got -0.1)"),
    ("oracle", {"smoothing": 0.1}, "methods.oracle.smoothing: unknown key (known: label_smoothing)"),
])
def test_method_option_type_and_range_errors_name_the_full_key(name, options, message):
    from udaflow.methods import get_method_class
    from udaflow.methods.base import config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict(get_method_class(name).Config, options, f"methods.{name}")
    assert str(info.value) == message


def test_method_configs_keep_their_defaults_and_read_yaml_values():
    """The pydantic Configs read params.yaml as the dataclasses did: same names, same defaults."""
    from udaflow.methods import get_method_class
    from udaflow.methods.base import config_from_dict

    defaults = {
        "adamatch": {"tau": 0.9, "teacher_ema": 0.0, "unlabelled_weight": 1.0, "logit_interpolation": False,
                     "uratio": 1.0, "weak_target_grad": True, "source_views": "both"},
        "dann": {"trade_off": 1.0, "hidden": 256, "label_smoothing": 0.1},
        "ssrt": {"trade_off": 1.0, "hidden": 256, "sr_weight": 0.2, "alpha": 0.3, "layers": (), "eps": 0.4, "period": 200,
                 "levels": 4, "label_smoothing": 0.1},
    }
    for name, expected in defaults.items():
        assert get_method_class(name).Config().model_dump() == expected
    ssrt = config_from_dict(get_method_class("ssrt").Config, {"layers": [1, 2], "period": 10}, "methods.ssrt")
    assert ssrt.layers == (1, 2) and ssrt.period == 10  # a YAML list is a tuple
    mcc = config_from_dict(get_method_class("mcc").Config, {"temperature": 3}, "methods.mcc")
    assert mcc.temperature == 3.0 and isinstance(mcc.temperature, float)  # an integer is fine for a float


@pytest.mark.parametrize("override", [
    "data.image_size=28", "seed=1", "model.backbone=udaflow_vit_tiny2", "train.lr=0.001", "train.augment.translate=2",
    "methods.source_only.label_smoothing=0.2", "data.stream=false", "data.min_per_class=3", "train.progress=false",
    "train.nproc=2", "train.augment.invert=0.2", "train.num_threads=1",
])
def test_dvc_yaml_s_pretrain_stage_lists_every_param_the_source_model_depends_on(override):
    """`dvc repro` re-runs a stage only for the params it lists: one the source model depends on and the
    stage leaves out gives a stale model (data.image_size did)."""
    import yaml

    from udaflow.experiment import source_params

    stage = yaml.safe_load((REPO_PARAMS.parent / "dvc.yaml").read_text())["stages"]["pretrain"]
    listed = [str(p) for p in stage["params"]]
    base, changed = (source_params(load_config(REPO_PARAMS, None, sets), 10) for sets in ([], [override]))
    key = override.split("=")[0]
    covered = any(key == p or key.startswith(p + ".") for p in listed)
    assert covered or base == changed, f"{key} changes the source model but dvc.yaml's pretrain stage does not list it"
    if key in ("data.image_size", "seed", "model.backbone"):
        assert base != changed and covered  # the test can fail: these do change it


def test_dvc_yaml_s_training_stages_list_no_param_they_do_not_depend_on():
    """The other way round: a param a stage lists but does not depend on re-runs it for nothing. The
    whole `train` block was pretrain's until 2026-12-04, so a new adapt_steps re-ran pretraining, and
    the whole `methods` block adapt's, so a change to mcc re-ran adamatch. Pretrain lists exactly the
    `train` keys experiment.source_params keys the source model's cache on; adapt, its method's own block."""
    import yaml

    from udaflow.experiment import source_params

    def leaves(d: dict, prefix: str) -> set[str]:
        return set().union(*(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"} for k, v in d.items()))

    stages = yaml.safe_load((REPO_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    cfg = load_config(REPO_PARAMS, None, ["train.nproc=2"])  # nproc is in the key only when it is not 1
    listed = {str(p) for p in stages["pretrain"]["params"] if str(p).startswith("train")}
    assert listed == leaves(source_params(cfg, 10)["train"], "train.")
    assert "methods.${method}" in stages["adapt"]["params"] and "methods" not in stages["adapt"]["params"]
    # adapt: every train key (a section whole) but the two that cannot change its bytes
    from udaflow.config import TrainConfig

    listed = {str(p) for p in stages["adapt"]["params"] if str(p).startswith("train")}
    assert listed == {f"train.{k}" for k in TrainConfig.model_fields} - {"train.progress", "train.checkpoint_every"}


def test_dvc_lock_records_the_code_the_stages_depend_on_as_it_is():
    """dvc.lock says which code made its outputs (src/udaflow for pretrain / adapt / evaluate, expectations.py,
    domains.py). Committed with other code, a fresh clone's `dvc status` calls the stages changed and the
    README's `make run` rewrites dvc.lock (a dirty `git status`). A commit that changes src/udaflow runs
    `make run` (it records these stages with the code as it is) and commits its dvc.lock."""
    import yaml

    from udaflow.versioning import code_dependencies

    root = REPO_PARAMS.parent
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    recorded = {stage: {dep["path"]: dep["md5"] for dep in entry.get("deps", []) if dep["path"].startswith("src/")}
                for stage, entry in lock.items()}
    now = code_dependencies(root)
    assert {stage: recorded.get(stage) for stage in now} == now, (
        "dvc.lock records other code than src/ holds: `make run` records the stages with this code; commit its dvc.lock")


def test_the_training_stages_depend_on_udaflow_s_code():
    """A change to how udaflow decodes images or trains (the EXIF fix of c14392e) left `dvc repro` keeping
    the model trained before it, `dvc status` saying up to date."""
    import yaml

    stages = yaml.safe_load((REPO_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    for name in ("pretrain", "adapt", "evaluate"):
        assert "src/udaflow" in stages[name]["deps"], name


def test_a_code_change_shows_in_dvc_status_and_bytecode_does_not(tmp_path, monkeypatch):
    """The code's hash ignores `__pycache__` (.dvcignore: every import writes it) and an editor's swap
    file, and sees a changed .py until the stage runs again and is recorded."""
    import shutil

    from udaflow.versioning import code_dependencies, init_repo, record_stages, status

    monkeypatch.chdir(tmp_path)  # as the CLI runs: in the project
    init_repo(tmp_path)
    shutil.copy(REPO_PARAMS.parent / ".dvcignore", tmp_path / ".dvcignore")
    package = tmp_path / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "train.py").write_text("STEPS = 1\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  fit:\n    cmd: 'true'\n    deps:\n      - src/pkg\n")
    assert record_stages(tmp_path, ["fit"]) == ["fit"] and status(tmp_path) == {}
    before = code_dependencies(tmp_path)["fit"]["src/pkg"]

    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (package / ".train.py.swp").write_bytes(b"\x00vim")
    assert code_dependencies(tmp_path)["fit"]["src/pkg"] == before and status(tmp_path) == {}

    (package / "train.py").write_text("STEPS = 2\n")
    assert code_dependencies(tmp_path)["fit"]["src/pkg"] != before
    assert status(tmp_path) == {"fit": [{"changed deps": {"src/pkg": "modified"}}]}
    assert record_stages(tmp_path, ["fit"]) == ["fit"] and status(tmp_path) == {}  # run again: recorded



def test_an_older_revision_s_metrics_come_back_with_its_dvc_lock(tmp_path, monkeypatch):
    """runs/ is git-ignored, so dvc.yaml's metrics, plots and GX result live in DVC's cache. As `cache: false`
    (git's) they were kept by neither: `dvc exp show` showed `!`, `dvc metrics diff HEAD~1` nothing, and
    after a checkout of an older dvc.lock `dvc metrics show` printed the newer run's figures as its own."""
    import shutil
    import subprocess

    import yaml

    from udaflow.versioning import init_repo, record_stages

    monkeypatch.chdir(tmp_path)
    git = lambda *args: subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@x", *args], cwd=tmp_path, check=True,
                                       capture_output=True)
    git("init", "-q")
    init_repo(tmp_path)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):  # the real layout: the evaluate stage as it is
        shutil.copy(REPO_PARAMS.parent / name, tmp_path / name)
    (tmp_path / "src/udaflow").mkdir(parents=True)
    (tmp_path / "src/udaflow/code.py").write_text("X = 1\n")
    params = yaml.safe_load(REPO_PARAMS.read_text())
    run = tmp_path / "runs" / f"{params['source']}-to-{params['target']}" / params["method"]
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"weights")

    def evaluate(acc: float) -> None:  # what `udaflow stage evaluate` (or `udaflow run`) writes, recorded as `udaflow run` does
        (run / "metrics.json").write_text(f'{{"target_acc_selected": {acc}}}')
        for png in ("confusion_matrix.png", "feature_map.png"):
            (run / png).write_bytes(f"{png} {acc}".encode())
        assert record_stages(tmp_path, ["evaluate"]) == ["evaluate"]
        git("add", "-A")
        git("commit", "-qm", f"acc {acc}")

    evaluate(77.5)
    evaluate(76.0)
    assert git("ls-files", "runs").stdout == b""  # git keeps none of it
    dvc = str(Path(sys.executable).parent / "dvc")
    diff = subprocess.run([dvc, "metrics", "diff", "HEAD~1", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True)
    [(path, figures)] = json.loads(diff.stdout).items()
    assert figures["target_acc_selected"] == {"old": 77.5, "new": 76.0, "diff": -1.5}
    git("checkout", "-q", "HEAD~1", "--", "dvc.lock")
    subprocess.run([dvc, "checkout", "evaluate"], cwd=tmp_path, capture_output=True, check=True)
    assert json.loads((run / "metrics.json").read_text()) == {"target_acc_selected": 77.5}
    assert (run / "feature_map.png").read_bytes() == b"feature_map.png 77.5"

def test_dvc_yaml_s_stages_read_and_write_where_params_yaml_s_data_root_and_work_dir_say(tmp_path):
    """dvc.yaml wrote `data/raw/` and `runs/` itself: with another `data.root` or `work_dir` in params.yaml,
    `udaflow run` wrote one place and `dvc repro` looked for its outputs in another."""
    import shutil

    import yaml
    from dvc.repo import Repo

    from udaflow.versioning import init_repo

    init_repo(tmp_path)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO_PARAMS.parent / name, tmp_path / name)
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params.update(work_dir="scratch/udaflow", data={**params["data"], "root": "store/domains"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = f"scratch/udaflow/{params['source']}-to-{params['target']}"
    paths = {stage.name: ([str(o.def_path) for o in stage.outs],
                                sorted(str(d.def_path) for d in stage.deps if not str(d.def_path).endswith("params.yaml")))
             for stage in Repo(str(tmp_path)).index.stages}
    assert paths["build@mnistm"][0] == ["store/domains/mnistm"]
    assert paths["validate"] == ([f"{run}/validation/gx_result.json"],
                                 sorted([f"store/domains/{params['source']}", f"store/domains/{params['target']}", "src/udaflow/data/expectations.py"]))
    assert paths["pretrain"][0] == [f"{run}/source_model.pt"] and f"store/domains/{params['source']}" in paths["pretrain"][1]
    assert paths["adapt"] == ([f"{run}/{params['method']}/model.pt"],
                              sorted([f"{run}/source_model.pt", f"store/domains/{params['target']}", "src/udaflow"]))
    assert paths["evaluate"][0] == [f"{run}/{params['method']}/{name}" for name in ("metrics.json", "confusion_matrix.png", "feature_map.png")]


def test_every_param_dvc_yaml_lists_is_in_params_yaml_for_every_method():
    """DVC refuses a stage whose listed param is missing from params.yaml (`Parameters 'methods.x' are
    missing`), so params.yaml spells out every key the stages list: each `train` key pretraining
    depends on, and a block for every method `method:` may name (adapt lists `methods.${method}`)."""
    import yaml

    from udaflow.methods import list_methods

    root = REPO_PARAMS.parent
    params = yaml.safe_load(REPO_PARAMS.read_text())
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]

    def present(key: str) -> bool:
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    for method in list_methods():
        for stage, entry in stages.items():
            for key in entry.get("params", []):
                key = str(key).replace("${method}", method)
                assert present(key), f"dvc.yaml stage '{stage}' lists {key}, which params.yaml lacks"


def test_a_number_in_e_notation_is_a_number_in_the_params_file_too(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {lr: 3e-3}\nmethods:\n  adamatch: {tau: 9e-1}\n")
    cfg = load_config(path)
    assert cfg.train.lr == 0.003 and cfg.methods["adamatch"]["tau"] == 0.9
    create_method("adamatch", build_classifier("udaflow_vit_micro", 3), cfg.methods["adamatch"])  # the strict options take it


def test_a_yaml_syntax_error_is_one_line_naming_the_file_line_and_column(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 0\ntrain:\n  adapt_steps: [1, 2\n  lr: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == (f"{bad}:4:5: not valid YAML: expected ',' or ']', but got ':' "
                              "(while parsing a flow sequence at line 3)")


def test_a_key_given_twice_is_refused_as_dvc_refuses_it(tmp_path):
    """PyYAML kept the last of two `train:` blocks: the first one's keys were dropped without a word."""
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\ntrain:\n  lr: 0.5\n\ntrain:\n  adapt_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}:5:1: not valid YAML: the key 'train' is given twice (first at line 2) "
                              "(while reading a mapping at line 1)")
    with pytest.raises(ConfigError, match=r"the key 'depth' is given twice"):
        parse_override("model.backbone_args={depth: 1, depth: 2}")
    assert read_yaml("a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n") == {"a": {"b": 1}, "c": {"b": 2}}  # a merge key overrides
