"""Bad settings are refused before anything runs, naming the key; the CLI turns such known errors
into one line (+ hint) and exit 2, and keeps the traceback of anything else (a bug)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from udaflow import cli
from udaflow.config import Config, ConfigError
from udaflow.data.manifest import DataError
from udaflow.preflight import check_run_config, validate_run

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _cfg(tmp_path: Path, **update) -> Config:
    for name in ("synth", "mnist"):
        (tmp_path / name).mkdir(exist_ok=True)
    cfg = Config()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": tmp_path})})
    for key, value in update.items():
        section, _, field = key.partition(".")
        if field:
            cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={field: value})})
        else:
            cfg = cfg.model_copy(update={section: value})
    return cfg


def test_a_good_config_passes(tmp_path):
    check_run_config(_cfg(tmp_path))


@pytest.mark.parametrize("update, match", [
    ({"method": "nosuch"}, r"^method: unknown method 'nosuch'"),
    # what run, schedule and dvc repro train they register: a retrain scheduled with the oracle failed every night
    ({"method": "oracle"}, r"^method: 'oracle' trains on target labels: benchmark only \(`udaflow bench`\), never registered$"),
    ({"methods": {"dann": {"trade_off": "big"}}}, r"^methods\.dann\.trade_off: expected a number \(got 'big'\)$"),
    ({"methods": {"adamatch": {"tua": 0.9}}}, r"^methods\.adamatch\.tua: unknown key \(known: tau, "),
    ({"methods": {"adamatch": {"tau": 1.5}}}, r"^methods\.adamatch\.tau: must be <= 1 \(got 1\.5\)$"),
    ({"methods": {"cdtrans": {"refresh_every": 0}}}, r"^methods\.cdtrans\.refresh_every: must be >= 1 \(got 0\)$"),
    ({"methods": {"dann": {"trade_off": -1.0}}}, r"^methods\.dann\.trade_off: must be >= 0 \(got -1\.0\)$"),
    ({"methods": {"ssrt": {"eps": 1.5}}}, r"^methods\.ssrt\.eps: must be <= 1 \(got 1\.5\)$"),
    ({"methods": {"mcc": None}}, r"^methods\.mcc: expected a mapping \(got null\)$"),  # made in code, past the model
    ({"train.lr": -1.0}, r"^train\.lr: must be > 0 \(got -1\.0\)$"),  # model_copy skips validation: checked again
    ({"methods": {"nosuch": {}}}, r"^methods\.nosuch: unknown method"),
    ({"validator": "accuracy"}, r"^validator: unknown validator 'accuracy'"),
    ({"promotion.validator": "best"}, r"^promotion\.validator: unknown validator 'best'"),
    ({"model.backbone": "nosuch_model"}, r"^model\.backbone: unknown backbone 'nosuch_model'"),
    ({"model.backbone_args": {"stem_width": 16, "nosuch": 1}}, r"^model\.backbone_args: "),
    ({"model.backbone_args": {"input_norm": "sepia"}}, r"^model: model\.backbone_args\.input_norm: 'sepia'"),
])
def test_bad_settings_name_their_key(tmp_path, update, match):
    with pytest.raises(ConfigError, match=match):
        check_run_config(_cfg(tmp_path, **update))


def test_a_work_dir_that_cannot_be_a_writable_folder_is_refused_naming_it(tmp_path):
    """`--set work_dir=README.md` or a path under /proc failed after Prefect had started, in a traceback
    (NotADirectoryError, FileNotFoundError from the run's lock)."""
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"^work_dir: .*notes\.txt is a file, not a folder$"):
        check_run_config(_cfg(tmp_path, work_dir=tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match=r"^work_dir: .*notes\.txt/runs cannot be a writable folder \(Not a directory\)$"):
        check_run_config(_cfg(tmp_path, work_dir=tmp_path / "notes.txt" / "runs"))
    check_run_config(_cfg(tmp_path, work_dir=tmp_path / "new" / "runs"))  # a folder to make is fine, and made
    assert (tmp_path / "new" / "runs").is_dir()


@pytest.mark.parametrize("device, gpus, nproc, refused", [
    ("cuda", 1, 2, True),  # nccl refuses two ranks on one GPU; rank 1 would ask for cuda:1
    ("auto", 2, 4, True),
    ("cuda", 2, 2, False),
    ("cpu", 1, 2, False),  # gloo: ranks share the cores
    ("cuda", 0, 2, False),  # no GPU at all: resolve_device's own error says so
])
def test_more_ranks_than_gpus_is_refused_before_any_process_starts(tmp_path, monkeypatch, device, gpus, nproc, refused):
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    monkeypatch.setattr("torch.cuda.is_available", lambda: gpus > 0)
    cfg = _cfg(tmp_path, **{"train.device": device, "train.nproc": nproc, "train.batch_size": 64})
    if refused:
        with pytest.raises(ConfigError, match=rf"^train\.nproc: {nproc} processes on GPUs need a GPU each \(nccl\); {gpus} visible: "
                                              rf"--nproc {gpus} or fewer, or --device cpu \(gloo\)$"):
            check_run_config(cfg)
    else:
        check_run_config(cfg)


def test_a_missing_domain_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"target: domain 'nosuch' not found .*; ingest your images with `udaflow data ingest PATH --name nosuch`"):
        check_run_config(_cfg(tmp_path, target="nosuch"))
    (tmp_path / "gone.dvc").write_text("outs:\n- path: gone\n")  # an ingested domain whose folder is not checked out
    with pytest.raises(DataError, match=rf"target: domain 'gone' not found .*; restore it from DVC with `dvc checkout {tmp_path / 'gone.dvc'}`"):
        check_run_config(_cfg(tmp_path, target="gone"))
    with pytest.raises(DataError, match=r"source: domain 'mnistm' not found .*; build it with `udaflow data build --domains mnistm`"):
        check_run_config(_cfg(tmp_path, source="mnistm"))


def _domain(root: Path, name: str, labels: list[str]) -> None:
    from udaflow.data.manifest import ManifestRow, write_manifest

    (root / name).mkdir(parents=True, exist_ok=True)
    write_manifest(root / name, [ManifestRow(f"{i}.png", label, "train", f"{i:064x}", 32, 32, "RGB", True) for i, label in enumerate(labels)])


@pytest.mark.parametrize("labels, has", [
    (["", "", ""], "no labelled images (a flat folder)"),
    (["cat", "cat", "cat"], "one class ('cat')"),
])
def test_a_source_without_two_labelled_classes_is_refused_naming_it(tmp_path, labels, has):
    """Before GX would refuse it as 'expect_table_row_count_to_be_between' (or blame the target's labels)."""
    _domain(tmp_path, "mine", labels)
    with pytest.raises(DataError) as caught:
        check_run_config(_cfg(tmp_path, source="mine"))
    assert str(caught.value) == (f"source: domain 'mine' ({tmp_path / 'mine'}) has {has}; a source domain is labelled, a folder per class, "
                                 "with two classes or more")
    _domain(tmp_path, "mine", ["cat", "dog"])
    check_run_config(_cfg(tmp_path, source="mine"))


def test_a_target_that_is_the_source_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"^target: 'synth' is the source domain too; adaptation needs two different domains$"):
        check_run_config(_cfg(tmp_path, target="synth"))


def test_a_built_in_synth_of_another_size_is_refused_and_a_user_s_folder_is_not(tmp_path, new_project):
    """A profile or --set naming data.synth_size 50; a synth built at 40 by dvc.yaml's build stage
    cannot become that by a setting: the run stops (it trained on the old images, logging the new size)."""
    from udaflow.data.domains import build_domain

    project = new_project(tmp_path / "project")
    (project / "dvc.yaml").write_text("stages:\n  build:\n    cmd: 'true'\n    outs:\n      - data/raw/synth\n")
    raw = project / "data/raw"
    build_domain("synth", raw, seed=0, synth_size=40)
    (raw / "mnist").mkdir()
    with pytest.raises(ConfigError, match=r"data.synth_size: 50 for this run, but .*synth holds the 40 images it was built with "
                                          r"\(dvc.yaml stage 'build'\)") as caught:
        check_run_config(_cfg(raw, **{"data.synth_size": 50}))
    assert "udaflow data build --domains synth" in caught.value.hint
    check_run_config(_cfg(raw, **{"data.synth_size": 40}))
    (project / "dvc.yaml").unlink()  # a folder of the user's own under that name: its size is its own
    check_run_config(_cfg(raw, **{"data.synth_size": 50}))


def test_every_method_the_command_trains_and_every_domain_it_reads(tmp_path):
    cfg = _cfg(tmp_path, method="nosuch")
    validate_run(cfg, methods=["dann", "oracle"])  # bench: its --methods, not params.yaml's method
    with pytest.raises(ConfigError, match=r"^--methods: unknown method 'dnn' \(known: "):
        validate_run(cfg, methods=["dann", "dnn"])
    with pytest.raises(DataError, match=r"^--shifts synth:mnistm: domain 'mnistm' not found"):
        validate_run(cfg, methods=["dann"], domains=[("--shifts synth:mnistm", "synth"), ("--shifts synth:mnistm", "mnistm")])
    validate_run(_cfg(tmp_path, target="nosuch"), domains=())  # () skips the folders


def test_a_check_after_loading_names_the_file_or_the_override_that_gave_the_value(tmp_path):
    """validate_run's own checks name where the value came from, as load_config's do: the params
    file for a value written there (even beside an override of a sibling key), `--set` for an override."""
    from udaflow.config import load_config

    for name in ("synth", "mnist"):
        (tmp_path / "raw" / name).mkdir(parents=True)
    params = tmp_path / "params.yaml"
    text = REPO_PARAMS.read_text().replace("root: data/raw", f"root: {tmp_path / 'raw'}")
    params.write_text(text.replace("mcc: {trade_off: 1.0, temperature: 2.5}", "mcc: {trade_off: 1.0, temprature: 2.5}"))
    with pytest.raises(ConfigError, match=rf"^{params}: methods\.mcc\.temprature: unknown key \(known: trade_off, temperature"):
        validate_run(load_config(params, overrides=["methods.mcc.trade_off=2"]))
    params.write_text(text)
    validate_run(load_config(params))
    with pytest.raises(ConfigError, match=r"^--set methods\.mcc\.trade_off: must be >= 0 \(got -1\)$"):
        validate_run(load_config(params, overrides=["methods.mcc.trade_off=-1"]))
    with pytest.raises(ConfigError, match=rf"^{params}: promotion\.validator: unknown validator 'best'"):
        validate_run(load_config(params, overrides=["validator=im"]).model_copy(
            update={"promotion": Config().promotion.model_copy(update={"validator": "best"})}))
    with pytest.raises(ConfigError, match=r"^--set model\.backbone_args: "):
        validate_run(load_config(params, overrides=["model.backbone_args.nosuch=1"]))
    # where a value came from does not make two configs differ: a run given params.yaml's own values is its default
    assert load_config(params, overrides=["source=synth"]) == load_config(params)


# ----------------------------------------------------------------------------- the CLI's one error path
def _app() -> typer.Typer:
    """A throwaway app on the CLI's command group, with its --debug option."""
    from udaflow.bench import parse_shifts
    from udaflow.methods.cdan import multilinear_map

    app = typer.Typer(cls=cli._Commands)
    app.callback()(cli.main_options)

    @app.command("config")
    def config_error():
        raise ConfigError("methods.adamatch.tau: must be <= 1 (got 1.5)")

    @app.command("shifts")
    def udaflow_value_error():
        parse_shifts("synth-mnist")  # a ValueError udaflow raises on purpose, for the user

    @app.command("torch")
    def torch_error():
        import torch

        multilinear_map(torch.zeros(2, 3), torch.zeros(3, 4))  # a RuntimeError from inside torch: a bug

    @app.command("key")
    def key_error():
        {}["missing"]

    @app.command("disk")
    def disk_full():  # as a library re-raises what it met: the full disk is under another error
        import errno

        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/ckpt.pt")
        except OSError as exc:
            raise RuntimeError("checkpoint write failed") from exc

    return app


@pytest.mark.parametrize("command, line", [
    ("config", "error: methods.adamatch.tau: must be <= 1 (got 1.5)"),
    ("shifts", "error: --shifts: 'synth-mnist' is not SOURCE:TARGET (e.g. synth:mnist)"),
])
def test_a_known_error_is_one_line_a_hint_and_exit_2(command, line):
    result = CliRunner().invoke(_app(), [command])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert lines[0] == line and len(lines) <= 2 and "Traceback" not in result.output
    if command == "config":
        assert lines[1].startswith("hint: keys and defaults are in params.yaml")


@pytest.mark.parametrize("command, kind", [("torch", RuntimeError), ("key", KeyError)])
def test_an_unexpected_error_propagates(command, kind):
    result = CliRunner().invoke(_app(), [command])
    assert isinstance(result.exception, kind) and result.exit_code == 1
    assert "error:" not in result.output


def test_a_full_disk_under_any_error_is_one_line_naming_the_file_and_debug_keeps_its_traceback():
    result = CliRunner().invoke(_app(), ["disk"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[0] == "error: No space left on device writing /data/runs/ckpt.pt"
    assert result.output.splitlines()[1].startswith("hint: free space on that disk")
    result = CliRunner().invoke(_app(), ["--debug", "disk"])  # the traceback, then the same lines and exit code
    assert result.exit_code == 2 and "Traceback" in result.output, result.output
    assert "error: No space left on device writing /data/runs/ckpt.pt" in result.output


@pytest.mark.parametrize("args", [["--debug", "config"], ["config", "--debug"]])  # before or after the command
def test_debug_shows_a_known_errors_traceback_and_keeps_its_exit_code(args):
    """--debug adds the traceback; the error and hint lines and exit code 2 stay (it exited 1, as a bug: a CI script
    telling a data error from a crash read a debug run's data error as a crash)."""
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 2 and "Traceback" in result.output and "ConfigError" in result.output, result.output
    assert "error:" in result.output and "hint:" in result.output
    quiet = CliRunner().invoke(_app(), ["config"])
    assert quiet.exit_code == 2 and "Traceback" not in quiet.output  # and the next run without --debug is quiet again
    assert "Traceback" not in CliRunner().invoke(_app(), ["config", "--", "--debug"]).output  # after `--` it is an argument, not the flag


def test_the_real_entry_point_prints_a_bug_s_traceback():
    script = (
        "import sys\n"
        "from udaflow import cli\n"
        "@cli.app.command('boom')\n"
        "def boom():\n"
        "    {}['missing']\n"
        "sys.argv = ['udaflow', 'boom']\n"
        "cli.main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "KeyError: 'missing'" in result.stderr
    assert "error:" not in result.stderr


def test_a_lookup_in_a_store_that_does_not_exist_is_one_line_and_creates_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    store = tmp_path / "mlflow"
    params.write_text(yaml.safe_dump({"tracking": {"uri": f"sqlite:///{store}/mlflow.db", "artifact_root": str(store / "artifacts")}}))
    for args, what in ((["reproduce", "does-not-exist"], "MLflow run 'does-not-exist'"),
                       (["promote", "--model", "nosuch"], "registered model 'nosuch'"),
                       (["rollback", "--model", "nosuch"], "registered model 'nosuch'")):
        result = CliRunner().invoke(cli.app, [*args, "--params", str(params)])
        assert result.exit_code == 2, result.output
        lines = result.output.splitlines()
        assert len(lines) == 2 and lines[0] == f"error: {what} does not exist: no MLflow store at {store}/mlflow.db (tracking.uri sqlite:///{store}/mlflow.db)"
        assert lines[1].startswith("hint: run udaflow in the project folder")
    assert not store.exists()



@pytest.mark.parametrize("args, line, hint", [
    (["data", "build", "--domains", "nope"], "error: unknown built-in domain(s) 'nope'", "hint: built-in domains: `udaflow data build`"),
    # an ingest's refusal names what to fix; `data`'s hint on how to build or ingest was noise beside it
    (["data", "ingest", ".", "--name", "My Data"], "error: domain name 'My Data': use lower-case letters",
     "hint: the ingest changed nothing: fix what the error names, then run the same command again"),
    # 240 characters went into GX's and DVC's file names: OSError "File name too long", as a traceback
    (["data", "ingest", ".", "--name", "a" * 240], "error: domain name '" + "a" * 80 + "...': use lower-case letters, digits, '-' and '_', starting with a letter or digit, at most 64",
     "hint: the ingest changed nothing"),
    (["bench", "--protocol", "sometimes"], "error: --protocol 'sometimes': use transductive or holdout", "hint: e.g. `udaflow bench --shifts"),
    (["bench", "--shifts", "synth-mnist"], "error: --shifts: 'synth-mnist' is not SOURCE:TARGET", "hint: e.g. `udaflow bench --shifts"),
    # each copy trained, then the rows repeated the last one's; an empty list printed "0 rows -> bench.json" and wrote none
    (["bench", "--methods", "dann,dann"], "error: --methods: 'dann' given twice", "hint: e.g. `udaflow bench --shifts"),
    (["bench", "--shifts", "synth:mnist,synth:mnist"], "error: --shifts: 'synth:mnist' given twice", "hint: e.g. `udaflow bench --shifts"),
    (["bench", "--methods", ",,"], "error: --methods ',,': no method named", "hint: e.g. `udaflow bench --shifts"),
    (["bench", "--shifts", "synth:synth"], "error: --shifts synth:synth: source and target are both 'synth'", "hint: e.g. `udaflow bench"),
    (["schedule", "--source", "synth", "--target", "mnist", "--cron", "0 3 * * *"], "error: no Prefect server", "hint: schedules need a running Prefect server"),
    (["run", "--set", "train.lr=[0.1"], "error: --set 'train.lr=[0.1': the value is not valid YAML", "hint: keys and defaults are in params.yaml"),
    # torch's own message for a device string it cannot parse came as a traceback; the error names the
    # option the value came from, not the params file (which it named until 2026-12-03)
    (["run", "--device", "gpu"], "error: --device: train.device: use auto, cpu, cuda or cuda:N (got", "hint: keys and defaults are in params.yaml"),
    (["reproduce", "0" * 32, "--device", "gpu"], "error: --device: train.device: use auto, cpu, cuda or cuda:N (got", "hint: keys and defaults"),
    (["bench", "--device", "cuda:x"], "error: --device: train.device: use auto, cpu, cuda or cuda:N (got", "hint: keys and defaults"),
    (["run", "--set", "train.lr=abc"], "error: --set train.lr: expected a number (got 'abc')", "hint: keys and defaults are in params.yaml"),
    (["bench", "--set", "train.augment.invert=2"], "error: --set train.augment.invert: must be <= 1 (got 2)", "hint: keys and defaults"),
    (["run", "--target", "Bad Name"], "error: --target: target: not a domain name", "hint: keys and defaults"),
    # checks made after loading (a method's options, the method, a validator, a domain folder) name the
    # option too; until 2026-12-03 they named only the key, as if it were params.yaml's
    (["run", "--set", "methods.adamatch.tau=1.5"], "error: --set methods.adamatch.tau: must be <= 1 (got 1.5)", "hint: keys and defaults"),
    (["run", "--method", "dnn"], "error: --method: method: unknown method 'dnn' (known: ", "hint: keys and defaults"),
    (["run", "--method", "oracle"], "error: --method: method: 'oracle' trains on target labels: benchmark only", "hint: keys and defaults"),
    (["bench", "--set", "validator=accuracy"], "error: --set validator: unknown validator 'accuracy'", "hint: keys and defaults"),
    # the source first: a clean checkout has no data/raw/synth either
    (["run", "--source", "nosuch"], "error: --source: source: domain 'nosuch' not found", "hint: every parameter and its default"),
])
def test_every_command_s_known_error_comes_with_a_hint(monkeypatch, args, line, hint):
    """DESIGN.md: an error is one clear line plus a hint, whichever command raised it."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = CliRunner().invoke(cli.app, [*args, "--params", str(REPO_PARAMS)])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith(line) and lines[1].startswith(hint), result.output


@pytest.mark.parametrize("args, protocol", [
    ([], "transductive"),
    (["--set", "bench.protocol=holdout"], "holdout"),  # params.yaml's bench.protocol, read (until 2026-12-03 the option's default won)
    (["--set", "bench.protocol=holdout", "--protocol", "transductive"], "transductive"),  # the option wins over params
])
def test_the_bench_protocol_comes_from_params_unless_the_option_names_one(monkeypatch, tmp_path, args, protocol):
    from udaflow import bench, preflight

    seen = []
    monkeypatch.setattr(preflight, "validate_run", lambda *a, **k: None)  # no domain folders needed to see the choice
    monkeypatch.setattr(bench, "run_bench", lambda cfg, shifts, methods, seeds, chosen, *a, **k: seen.append(chosen) or [])
    result = CliRunner().invoke(cli.app, ["bench", "--shifts", "synth:mnist", "--methods", "dann", "--out", str(tmp_path / "b.json"),
                                          *args, "--params", str(REPO_PARAMS)])
    assert result.exit_code == 0 and seen == [protocol], result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_gpu_this_machine_lacks_is_refused_before_the_flow_starts(monkeypatch, device):
    """It was found at pretraining: after the flow had started, versioned the data and left a FAILED
    MLflow run per attempt, with a message that named neither --device nor train.device."""
    from udaflow import preflight

    monkeypatch.setattr(preflight, "validate_run", lambda *a, **k: None)  # no domain folders needed
    monkeypatch.setattr(cli, "_quiet_prefect", lambda: pytest.fail("the flow was started"))
    result = CliRunner().invoke(cli.app, ["run", "--device", device, "--params", str(REPO_PARAMS)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[0] == f"error: --device: train.device: '{device}' but no CUDA GPU is visible; use cpu, or auto (a GPU when there is one)"


def test_only_params_yaml_s_own_settings_are_recorded_as_dvc_yaml_s_stages(tmp_path, monkeypatch):
    """dvc.yaml's stages read params.yaml: a run of `--params other.yaml` was compared with other.yaml,
    recorded its model in dvc.lock under params.yaml's values, and `dvc status` called it up to date."""
    from udaflow.config import load_config

    monkeypatch.chdir(tmp_path)
    text = REPO_PARAMS.read_text()
    (tmp_path / "params.yaml").write_text(text)
    (tmp_path / "other.yaml").write_text(text.replace("adapt_steps: 2000", "adapt_steps: 40", 1))
    (tmp_path / "copy.yaml").write_text(text)
    assert "adapt_steps: 40" in (tmp_path / "other.yaml").read_text()
    assert cli._apart_from_project(load_config(tmp_path / "params.yaml")) == []
    assert cli._apart_from_project(load_config(tmp_path / "other.yaml")) == ["train.adapt_steps"]
    assert cli._apart_from_project(load_config(tmp_path / "copy.yaml")) == []  # the same settings: the same stages
    (tmp_path / "params.yaml").unlink()
    assert cli._apart_from_project(load_config(tmp_path / "copy.yaml")) is None  # no params.yaml here: no stages


def test_make_run_s_profile_trains_what_params_yaml_says_and_a_run_apart_from_it_says_why_dvc_lock_waits(tmp_path, monkeypatch):
    """The `quick` profile (`make run`, `make bench`, `udaflow schedule`) repeated pretrain_steps 1000 and
    adapt_steps 2000: a user who set 30 / 30 in params.yaml got them from `dvc repro` and a plain `udaflow
    run`, 1000 / 2000 from `make run` and every scheduled retrain, and `make run` then left dvc.lock
    unrecorded without a word."""
    from udaflow.config import load_config

    monkeypatch.chdir(tmp_path)
    edited = REPO_PARAMS.read_text().replace("pretrain_steps: 1000", "pretrain_steps: 30", 1).replace("adapt_steps: 2000", "adapt_steps: 30", 1)
    (tmp_path / "params.yaml").write_text(edited)
    quick = load_config(tmp_path / "params.yaml", "quick")
    assert (quick.train.pretrain_steps, quick.train.adapt_steps) == (30, 30)
    assert cli._apart_from_project(quick) == []  # so `make run` records its stages in dvc.lock
    apart = load_config(tmp_path / "params.yaml", "quick", ["train.adapt_steps=40", "target=mnistm", "model.backbone_args.depth=4"])
    assert cli._apart_from_project(apart) == ["model.backbone_args.depth", "target", "train.adapt_steps"]
    full = load_config(tmp_path / "params.yaml", "full", ["seed=3"])
    assert cli._apart_from_project(full) == ["seed", "train.adapt_steps", "train.checkpoint_every", "train.eval_every", "train.pretrain_steps"]
    (tmp_path / "params.yaml").write_text("seed: [")  # broken after the run started: no stages to record, and no error that loses its summary
    assert cli._apart_from_project(full) is None


def _summary(aliases: list[str], capsys) -> str:
    from udaflow.config import load_config

    metrics = {"selected_by": "im", "selected_step": 400, "target_acc_selected": 97.0, "target_acc_last": 97.1, "source_only_target_acc": 68.1,
               "source_val_acc_selected": 99.0, "validators_selected": {"im": 1.2}, "shift": {"pad_before": 1.5, "pad_after": 0.4}}
    result = {"metrics": metrics, "run_id": "abc", "model": "udaflow-synth-to-mnist", "version": "3", "alias": "challenger",
              "prefect_task_cached": False, "source_cached": False, "stage_seconds": {"adapt": 1.0}, "wall_seconds": 2.0,
              "gate": {"promoted": "champion" in aliases, "reason": "because", "data": "the pool"}, "aliases": aliases}
    cli._print_run_summary(load_config(REPO_PARAMS), result)
    return " ".join(capsys.readouterr().out.split())


def test_the_run_summary_names_the_aliases_the_version_holds_after_its_gate(capsys):
    """A run whose gate promoted its version printed `v1 @challenger` and a load-it line for @challenger,
    as if the version had not been promoted. The aliases are the registry's after the gate (`run`)."""
    out = _summary(["challenger", "champion"], capsys)
    assert "udaflow-synth-to-mnist v3 @challenger @champion" in out and "load_model('models:/udaflow-synth-to-mnist@champion')" in out
    out = _summary(["challenger"], capsys)
    assert "v3 @challenger │" in out and "@champion" not in out and "load_model('models:/udaflow-synth-to-mnist@challenger')" in out
    out = _summary([], capsys)  # another run sharing the store has registered since: the version itself
    assert "udaflow-synth-to-mnist v3 │" in out and "load_model('models:/udaflow-synth-to-mnist/3')" in out
