"""MLflow: runs, metrics, artifacts, dataset inputs, model logging and registry aliases.

The one module that imports MLflow. A pipeline run is a parent run in experiment
`udaflow/<source>-to-<target>` with one child run per stage; every call names its run id, so
nothing depends on MLflow's thread-local "active run". Default store: `sqlite:///mlflow/mlflow.db`
with artifacts under `mlflow/artifacts` (both set in params.yaml `tracking:`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import numbers
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

PACKAGES = ("udaflow", "torch", "torchvision", "timm", "mlflow", "prefect", "dvc", "great_expectations", "numpy")
CHALLENGER, CHAMPION = "challenger", "champion"
# the MLflow UI opens an experiment of this kind on its training-runs view (not the GenAI traces overview)
KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"


def model_name(source: str, target: str) -> str:
    return f"udaflow-{source}-to-{target}"


def experiment_name(source: str, target: str) -> str:
    return f"udaflow/{source}-to-{target}"


def configure(tracking_uri: str, artifact_root: Path) -> None:
    """Point MLflow at the store; a sqlite file's folder is created. Call from entry points only."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    Path(artifact_root).mkdir(parents=True, exist_ok=True)
    if tracking_uri.startswith("sqlite:///"):
        _create_sqlite_store(tracking_uri, artifact_root)
    # MLflow also exports both URIs to os.environ for child processes; udaflow passes its store
    # explicitly, and keeps MLFLOW_TRACKING_URI what the user set (it overrides params.yaml)
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.environ["UDAFLOW_ARTIFACT_ROOT"] = str(Path(artifact_root).resolve())
    if is_server(tracking_uri):
        _check_answers(tracking_uri)


_ANSWERED: set[str] = set()  # tracking servers this process has had an answer from


def _check_answers(uri: str) -> None:
    """Raise requests' ConnectionError now when the tracking server at `uri` refuses the connection or its
    name does not resolve (down, or misnamed): MLflow's client retried each call for about 4 minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES 7, backoff factor 2), printing nothing, before the same error. Any
    HTTP answer will do; a slow one (a timeout) and a TLS error, which MLflow's own settings
    (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS) may resolve, are left to MLflow."""
    if uri in _ANSWERED:
        return
    import requests

    error = _health_error(uri, timeout=(5, 30))
    if isinstance(error, (requests.exceptions.Timeout, requests.exceptions.SSLError)):
        return
    if error is not None:
        raise error
    _ANSWERED.add(uri)


def _health_error(uri: str, timeout: tuple[float, float]) -> Exception | None:
    """What asking the server's /health once, without MLflow's retries, raised (None: it answered, any HTTP status)."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.exceptions.RequestException as exc:
        return exc
    return None


def _create_sqlite_store(uri: str, artifact_root: Path) -> None:
    """Create a SQLite store's tables (MLflow's migrations) under a file lock beside it, once.

    Two processes opening a store that does not exist yet (two `udaflow run`s on other shifts, the
    first in a new project) both ran MLflow's migrations on it: one failed with `table
    _alembic_tmp_latest_metrics already exists`, or both did, and the store was left half-migrated,
    every later command failing the same way. The second now waits, then finds the tables made."""
    from udaflow.locks import exclusive

    db = Path(uri.removeprefix("sqlite:///"))
    with exclusive(db.with_name(db.name + ".init.lock")):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(uri, str(Path(artifact_root).resolve())).engine.dispose()  # makes the tables when none exist


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def experiment_id(source: str, target: str) -> str:
    client = _client()
    name = experiment_name(source, target)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(KIND_TAG) != MODEL_DEVELOPMENT:  # made before udaflow tagged its experiments
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, MODEL_DEVELOPMENT)
        return exp.experiment_id
    location = None  # a tracking server puts artifacts where its --artifacts-destination says
    if not is_server(mlflow_uri()):
        root = Path(os.environ.get("UDAFLOW_ARTIFACT_ROOT", "mlflow/artifacts")).resolve()
        location = (root / f"{source}-to-{target}").as_uri()
    return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: MODEL_DEVELOPMENT})


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def is_server(uri: str) -> bool:
    """A tracking server (http[s]://), as opposed to a database or folder this process writes itself."""
    return uri.startswith(("http://", "https://"))


CODE_DIRS = ("src/", "flows/", "tasks/")  # the package and the flows; with any .py file and pyproject.toml's pins: the code a run used
NOT_RUN_DIRS = ("tests/",)  # the suite's .py files: no run imports them


def _is_code(path: str) -> bool:
    """A path of `git status --porcelain` (from the repository root; quoted when odd; `old -> new` for a rename)."""
    path = path.split(" -> ")[-1].strip('"')
    if path.startswith(NOT_RUN_DIRS):
        return False
    return path.endswith(".py") or path.startswith(CODE_DIRS) or path == "pyproject.toml"


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the code this run used ('unknown' outside a git checkout): dirty when a
    code file (any .py outside tests/, anything under src/, flows/ or tasks/, pyproject.toml) differs from the commit or
    is new and not ignored. A new method in src/udaflow/methods/ trains, and run_fingerprint hashes it, before
    it is committed. What a run records otherwise is not code: params.yaml (the run logs its resolved
    parameters), dvc.lock (runs write it) and data pointers (`data ingest` writes them; the run logs
    their hashes). Counting those called nearly every run after an ingest "uncommitted code changes"."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=all").splitlines()
        dirty = any(_is_code(line[3:]) for line in status)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def code_changes_since(commit: str, cwd: Path | None = None) -> list[str] | None:
    """The code files (as `git_state` counts code) that differ between `commit` and HEAD; None when this checkout
    does not hold `commit`, or is no git checkout."""
    try:
        out = subprocess.run(["git", "diff", "--name-only", commit, "HEAD", "--"], cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return [path for path in out.splitlines() if _is_code(path)]


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[f"version.{pkg}"] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def start_run(experiment: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    tags = dict(tags)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return _client().create_run(experiment, run_name=name, tags=tags).info.run_id


def end_run(run_id: str, failed: bool = False, killed: bool = False) -> None:
    _stop_heartbeat(run_id)
    _client().set_terminated(run_id, "KILLED" if killed else "FAILED" if failed else "FINISHED")


# A pipeline run's process rewrites its heartbeat tag (unix seconds) every HEARTBEAT_S while it lives.
# Another machine sharing the store cannot ask this one whether the process is alive: it ends the run
# KILLED once the heartbeat is STALE_S old (a crashed machine, a process killed outright), which also
# lets its next run adopt the version that run registered. Clocks of a team's machines may differ by
# a few seconds, not by minutes.
HEARTBEAT_TAG = "udaflow.heartbeat"
HEARTBEAT_S = 60.0
STALE_S = 15 * 60.0
_heartbeats: dict[str, tuple[threading.Event, threading.Thread]] = {}


PROCESS_TAG = "udaflow.process"  # "<boot id>:<start time>" of the run's process (Linux): its pid alone may be another's by now


def process_identity(pid: int) -> str | None:
    """The boot id and the process's start time since boot (clock ticks, /proc/<pid>/stat field 22): one
    process in the machine's life. None where /proc does not tell (not Linux) or no such process is running.

    A pid is reused: after a reboot or a container restart, a killed run's pid 1 (a container whose entrypoint
    is `udaflow run`) is the next run's own pid, and any pid may be another program's by then."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the command name may hold spaces
        return f"{boot}:{fields[19]}"  # fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def _beat_tags() -> dict[str, str]:
    identity = process_identity(os.getpid())
    return {"udaflow.host": socket.gethostname(), "udaflow.pid": str(os.getpid()), HEARTBEAT_TAG: str(int(time.time())),
            **({PROCESS_TAG: identity} if identity else {})}


def _answers_now(uri: str) -> bool:
    """Whether the tracking server at `uri` answers its /health within seconds (any HTTP answer), asked once.
    A TLS error counts as an answer: MLflow's own settings (MLFLOW_TRACKING_SERVER_CERT_PATH, ...) may
    resolve what plain requests cannot, as in `_check_answers`."""
    import requests

    error = _health_error(uri, timeout=(3, 10))
    return error is None or isinstance(error, requests.exceptions.SSLError)


def _start_heartbeat(run_id: str) -> None:
    stop, client = threading.Event(), _client()  # the store the run is in, whatever the process points at later
    uri = mlflow_uri()

    def beat() -> None:
        down = False
        while not stop.wait(HEARTBEAT_S):
            # a server that does not answer: the beat is skipped, where MLflow's client retried it for about 4
            # minutes, printing urllib3's retry warnings into the progress lines (a team probe counted 18)
            if is_server(uri) and not _answers_now(uri):
                if not down:
                    print(f"warning: the tracking server {uri} does not answer ({time.strftime('%H:%M:%S')}); training goes on, "
                          "and the run's next MLflow call waits for it (MLflow retries for about 4 minutes)", file=sys.stderr, flush=True)
                down = True
                continue
            if down:
                print(f"the tracking server {uri} answers again ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
                down = False
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception:  # noqa: BLE001 - a missed beat only delays another machine's clean-up
                pass

    thread = threading.Thread(target=beat, name=f"udaflow-heartbeat-{run_id[:8]}", daemon=True)
    _heartbeats[run_id] = (stop, thread)
    thread.start()


def _stop_heartbeat(run_id: str) -> None:
    """Stop the run's heartbeat and wait out a beat already being written, so none lands after its end."""
    stop, thread = _heartbeats.pop(run_id, (None, None))
    if stop is not None:
        stop.set()
        thread.join(timeout=10)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = flatten(params)
    items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):
        _client().log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items()) if v is not None]
    for i in range(0, len(items), 500):
        _client().log_batch(run_id, metrics=items[i : i + 500])


def log_history(run_id: str, rows: Iterable[dict[str, float]], prefix: str) -> None:
    """Per-interval rows {'step': s, name: value, ...} -> metrics `<prefix>.<name>` at step s."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(f"{prefix}.{k}", float(v), now, int(row["step"])) for row in rows for k, v in row.items() if k != "step"]
    for i in range(0, len(items), 500):
        _client().log_batch(run_id, metrics=items[i : i + 500])


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        _client().log_artifacts(run_id, str(path), artifact_path)
    elif path.exists():
        _client().log_artifact(run_id, str(path), artifact_path)


def log_dataset(run_id: str, manifest: Path, name: str, digest: str, context: str) -> None:
    """Record a dataset input with the DVC hash as its digest (MLflow's own hashes only 10k rows)."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    import warnings

    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": it is a local path
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=str(Path(manifest).parent.resolve()), name=name, digest=digest)
    tags = [InputTag("mlflow.data.context", context)]
    _client().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str
    model_uri: str
    model_id: str = ""  # the MLflow 3 LoggedModel behind the version
    adopted_from_run: str | None = None  # the version was registered by this earlier run, killed before its gate


COMPLETE_TAG = "udaflow.complete"  # set last on a version: its tags are all there and it may take an alias


def register_model(
    run_id: str, package: Path, input_example: Any, name: str, tags: dict[str, Any], alias: str = CHALLENGER
) -> Registered:
    """Log a packaged model (safetensors + config.json, see udaflow.models.packaged) as a pyfunc model
    in run `run_id` and register it as a new version of `name`.

    Order, so that a kill between any two calls leaves nothing a later run or the gate misreads:
    model logged -> version created with all its tags and the `complete` mark (one registry
    transaction: a kill right after MLflow printed "Created version" left a version without even
    its weights tag until 2026-12-04, which no later run could adopt) -> the alias. A version
    without the mark (cut short by an older udaflow, or made by hand) never gets an alias;
    `incomplete_versions` lists it.
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model
    client = _client()
    requirements = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "timm", "safetensors", "numpy")]
    with registry_lock(name):
        # Model.log with run_id, not pyfunc.log_model in `with mlflow.start_run(run_id)`: leaving that
        # block ends the run FINISHED, before the gate runs, and a kill then left a finished-looking run.
        # The logged model goes to the fluent experiment (the Default one, ./mlruns, unless set): the run's
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        info = Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, loader_module="udaflow.models.packaged", data_path=str(package),
            input_example=input_example, signature=_signature(), pip_requirements=requirements,
        )
        version = mlflow.register_model(info.model_uri, name, await_registration_for=60,
                                        tags={**{key: str(value) for key, value in tags.items()}, COMPLETE_TAG: "true"})
        client.set_registered_model_alias(name, alias, version.version)
    return Registered(name, str(version.version), alias, f"models:/{name}@{alias}", info.model_id or "")


def _signature():
    """In: one column `image`, any JSON value (base64 image file or uint8 pixel rows of any size: the
    model checks each). Out: `class` and `probabilities`.

    The column is optional to MLflow so that the model itself refuses a request without it, in one
    line: MLflow's own refusal of a missing required column came back as `Failed to predict data
    '<the whole request>'` (777 KB for a 359 KB request with a column named `Image`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    from udaflow.models.packaged import IMAGE

    return ModelSignature(Schema([ColSpec(AnyType(), IMAGE, required=False)]), Schema([ColSpec(DataType.string, "class"), ColSpec(AnyType(), "probabilities")]))


def bad_request(message: str) -> Exception:
    """An error the MLflow scoring server answers with 400 and this message (not a 500)."""
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return _bad_request_type()(message, error_code=INVALID_PARAMETER_VALUE)


@functools.cache
def _bad_request_type() -> type:
    """An MlflowException that keeps the message it was made with. The scoring server rewrites a
    predict error's message to `Failed to predict data '<the whole request>'. Error: ...`: it sent a
    client every pixel it posted back (12 MB for a 12 MB request), udaflow's line at the very end."""
    from mlflow.exceptions import MlflowException

    class BadRequest(MlflowException):
        @property
        def message(self) -> str:
            return self.__dict__["_message"]

        @message.setter
        def message(self, value: str) -> None:
            self.__dict__.setdefault("_message", value)  # the first: MlflowException.__init__'s

    return BadRequest


class ModelUnreadable(LookupError):
    """A registered version whose model files cannot be read back from the artifact store (moved or
    deleted by hand, a bucket emptied): the registry still lists it, nothing can load it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint or ("restore the version's files in the artifact store (the MLflow UI's model page names where), "
                             "or point its alias at a version that loads (`udaflow rollback`, or the MLflow UI)")


def load_model(uri: str):
    """The registered ImageClassifier behind `uri` (models:/NAME@ALIAS or /VERSION), loaded from its
    safetensors weights; a version logged in any other format is refused (nothing is unpickled).
    A version the registry lists whose files are gone or unreadable: ModelUnreadable, one line."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from udaflow.models.packaged import PackageError

    _registry_version(uri)  # a name, alias or version the registry lacks stays MLflow's own error
    try:
        loader = get_model_info(uri).flavors.get("python_function", {}).get("loader_module")  # reads MLmodel (YAML) only
        if loader != "udaflow.models.packaged":
            raise LookupError(f"{uri}: not a udaflow packaged model (pyfunc loader {loader!r}); refusing to load it")
        return mlflow.pyfunc.load_model(uri).get_raw_model()
    except (MlflowException, OSError, PackageError) as exc:  # MLmodel missing ("No such artifact"), the weights or config missing or cut short
        why = " ".join(str(getattr(exc, "message", None) or exc).split())[:200]
        raise ModelUnreadable(f"{uri}: its model files cannot be read ({why})") from exc


def _registry_version(uri: str):
    """The registry's entry for models:/NAME/VERSION or models:/NAME@ALIAS (MLflow's error when it has none)."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return _client().get_model_version_by_alias(name, alias)
    name, _, version = body.rpartition("/")
    return _client().get_model_version(name, version) if name and version.isdigit() else None


def check_loadable(name: str, version: str | int, role: str, hint: str | None = None) -> None:
    """Raise ModelUnreadable naming `role` ("champion v3") when the version's model cannot be loaded."""
    try:
        load_model(f"models:/{name}/{version}")
    except ModelUnreadable as exc:
        raise ModelUnreadable(f"{name} {role}: {str(exc).split(': ', 1)[1]}", hint or exc.hint) from exc.__cause__


def incomplete_versions(name: str) -> list[str]:
    """Versions of `name` whose registration was cut short (no `complete` mark): never aliased."""
    return [str(v.version) for v in latest_versions(name) if v.tags.get(COMPLETE_TAG) != "true"]


def model_shift(name: str) -> tuple[str, str]:
    """(source, target) a registered model adapts between: the tags of the run behind its newest
    version (a domain name may itself contain '-to-', so the model's name alone can be ambiguous)."""
    from mlflow.exceptions import MlflowException

    for version in reversed(latest_versions(name)):
        if version.run_id:
            try:
                tags = _client().get_run(version.run_id).data.tags
            except MlflowException:  # its run deleted for good (`mlflow gc`): an older version's run, else the name
                continue
            if tags.get("udaflow.source") and tags.get("udaflow.target"):
                return tags["udaflow.source"], tags["udaflow.target"]
    source, _, target = name.removeprefix("udaflow-").partition("-to-")
    return source, target


def get_run(run_id: str):
    return _client().get_run(run_id)


def latest_versions(name: str) -> list:
    return sorted(_client().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def model_aliases(name: str) -> dict[str, str]:
    """Registered model `name`'s aliases: {alias: version}."""
    return dict(_client().get_registered_model(name).aliases)


# --- the pipeline's records: one call per pipeline step (the Prefect tasks wrap these) ---


@dataclass(frozen=True)
class PipelineRun:
    experiment_id: str
    run_id: str
    source: str
    target: str


def open_pipeline_run(config: dict[str, Any], params_file: Path, flow_run_id: str, project: Path | None = None) -> PipelineRun:
    """The parent run: resolved params, the params file, code and package versions, flow-run id."""
    from udaflow.models.backbone import weights_digest

    source, target, method = config["source"], config["target"], config["method"]
    exp = experiment_id(source, target)
    tags = {
        **git_state(project), **package_versions(),
        "prefect.flow_run_id": flow_run_id, "udaflow.method": method, "udaflow.source": source, "udaflow.target": target,
    }
    if digest := weights_digest((config.get("model") or {}).get("pretrained")):  # params hold the path; this, what was in it
        tags[PRETRAINED_TAG] = digest
    ended = end_runs_of_dead_processes(exp)
    run_id = start_run(exp, f"{method}:{source}-to-{target}", {**tags, **_beat_tags()})
    _start_heartbeat(run_id)
    try:  # the caller gets no run to close until this returns: a failure here ends it (and its heartbeat)
        for killed in ended:  # which run found it dead (and, under the same settings, resumed its checkpoint)
            _client().set_tag(killed, ENDED_BY_TAG, run_id)
        config = redacted(config)
        log_params(run_id, config)
        with _tempdir() as tmp:
            import yaml

            resolved = Path(tmp) / "params.resolved.yaml"
            resolved.write_text(yaml.safe_dump(config, sort_keys=False))
            log_artifact(run_id, resolved, "params")
            if Path(params_file).exists():
                log_artifact(run_id, Path(params_file), "params")
    except BaseException as exc:
        end_run(run_id, failed=True, killed=isinstance(exc, KeyboardInterrupt))
        raise
    return PipelineRun(exp, run_id, source, target)


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The config with any user:password in tracking.uri removed (it is logged, and shown to the team)."""
    from urllib.parse import urlsplit, urlunsplit

    uri = str(config.get("tracking", {}).get("uri", ""))
    parts = urlsplit(uri)
    if not parts.password and not parts.username:
        return config
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return {**config, "tracking": {**config["tracking"], "uri": urlunsplit(parts._replace(netloc=netloc))}}


PRETRAINED_TAG = "udaflow.pretrained_sha256"  # the model.pretrained file's bytes, when the run started from one
ENDED_BY_TAG = "udaflow.ended_by"  # on a run ended KILLED by the next run: that run's id


def end_runs_of_dead_processes(experiment: str) -> list[str]:
    """Mark KILLED the runs a killed `udaflow run` or drift check left RUNNING, with their child runs;
    returns their ids. On this host: those whose process is gone: no process has its pid, or the one that
    has it started at another time or boot (`process_identity`; a run tagged before it: a heartbeat over
    STALE_S old says the same). From another host: those whose heartbeat is over STALE_S old (a run without
    one is left alone). A live run is left alone."""
    client = _client()
    host, ended, now = socket.gethostname(), [], time.time()
    for run in client.search_runs([experiment], "attributes.status = 'RUNNING' and tags.`udaflow.host` LIKE '%'"):
        tags = run.data.tags
        if tags.get("udaflow.host") != host:
            try:
                if now - float(tags[HEARTBEAT_TAG]) < STALE_S:
                    continue  # beating, or too recent to judge
            except (KeyError, ValueError):
                continue
        else:
            try:
                pid = int(tags.get("udaflow.pid", "0"))
                os.kill(pid, 0)
                recorded, now_there = tags.get(PROCESS_TAG), process_identity(pid)
                if recorded and now_there:
                    if recorded == now_there:
                        continue  # that very process, still running
                else:  # tagged before the process identity was: a live process beats its heartbeat
                    try:
                        if now - float(tags[HEARTBEAT_TAG]) < STALE_S:
                            continue
                    except (KeyError, ValueError):
                        continue
            except ProcessLookupError:
                pass
            except (PermissionError, ValueError):
                continue
        for child in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'"):
            client.set_terminated(child.info.run_id, "KILLED")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def _tempdir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="udaflow-mlflow-")


def log_validation(run: PipelineRun, success: bool, statistics: dict[str, Any], result_json: Path | None, data_docs: Path | None, error: str | None) -> str:
    """Child run `validate`: the GX result JSON and Data Docs HTML, pass/fail and counts."""
    child = start_run(run.experiment_id, "validate", {"udaflow.stage": "validate"}, run.run_id)
    log_metrics(child, {"validation.success": float(success), **{f"validation.{k}": v for k, v in statistics.items() if isinstance(v, (int, float))}})
    for path, folder in ((result_json, "validation"), (data_docs.parent if data_docs else None, "validation/data_docs")):
        if path:
            log_artifact(child, path, folder)
            log_artifact(run.run_id, path, folder)
    set_tags(run.run_id, {"validation.success": str(success).lower(), **({"validation.error": error[:4000]} if error else {})})
    end_run(child, failed=not success)
    return child


def log_datasets(run: PipelineRun, datasets: dict[str, dict[str, str]]) -> None:
    """datasets: role -> {name, md5, manifest, pointer}. Logged as inputs with digest = DVC hash."""
    tags = {}
    for role, d in datasets.items():
        log_dataset(run.run_id, Path(d["manifest"]), d["name"], d["md5"], "training" if role == "source" else f"adaptation ({role})")
        tags[f"dvc.{role}.name"] = d["name"]
        tags[f"dvc.{role}.md5"] = d["md5"]
        tags[f"dvc.{role}.pointer"] = d["pointer"]
    revision = "+".join(f"{d['name']}:{d['md5'].removesuffix('.dir')[:12]}" for _, d in sorted(datasets.items()))
    tags["data.revision"] = revision
    set_tags(run.run_id, tags)


def log_training(run: PipelineRun, stage: str, metrics: dict[str, float], loss_history: list[dict], validator_history: list[dict], tags: dict[str, Any]) -> str:
    """Child run for a training stage with its per-interval losses and validator scores."""
    child = start_run(run.experiment_id, stage, {"udaflow.stage": stage, **{k: str(v) for k, v in tags.items()}}, run.run_id)
    log_metrics(child, metrics)
    log_history(child, loss_history, "loss")
    log_history(child, validator_history, "validator")
    log_metrics(run.run_id, {f"{stage}.{k}": v for k, v in metrics.items()})
    end_run(child)
    return child


def _numeric(prefix: str, d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
    return out


def log_evaluation(run: PipelineRun, metrics: dict[str, Any], figures: Iterable[Path], metrics_file: Path,
                   hardware: dict[str, str] | None = None) -> str:
    """Child run `evaluate`; the headline metrics also go on the parent run, with the hardware they
    were computed on (`costs.machine`: the bits repeat only on the same)."""
    child = start_run(run.experiment_id, "evaluate", {"udaflow.stage": "evaluate"}, run.run_id)
    flat = {
        **_numeric("", {k: v for k, v in metrics.items() if k not in ("seed", "selected_step")}),
        **_numeric("validator_selected.", metrics.get("validators_selected", {})),
        **_numeric("validator_last.", metrics.get("validators_last", {})),
        **_numeric("validator_source_only.", metrics.get("validators_source_only", {})),
        **_numeric("shift.", metrics.get("shift", {})),
        **_numeric("target_acc_selected.class_", {k: v for k, v in (metrics.get("target_per_class_acc_selected") or {}).items() if v is not None}),
    }
    for run_id in (child, run.run_id):
        log_metrics(run_id, flat)
        for fig in figures:
            log_artifact(run_id, fig, "figures")
        log_artifact(run_id, metrics_file, "metrics")
    set_tags(run.run_id, {"udaflow.selected_by": metrics.get("selected_by"), "udaflow.selected_step": metrics.get("selected_step"), **(hardware or {})})
    end_run(child)
    return child


WEIGHTS_TAG = "udaflow.weights_md5"  # the packaged model's bytes: the same weights again are the same model


def package_digest(package: Path) -> str:
    """md5 over a packaged model's files (safetensors weights, config.json), names and bytes, in name order."""
    digest = hashlib.md5()
    for f in sorted(p for p in Path(package).rglob("*") if p.is_file()):
        digest.update(f.relative_to(package).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def version_of_a_dead_run(name: str, weights_md5: str, tags: dict[str, Any]):
    """The newest version of `name` holding exactly these weights and `tags` (method, data hashes, ...)
    whose run was KILLED before it ended: inside its registration (a version without the `complete`
    mark, whose weights tag, written first, says what it holds; the tags it has must match), between
    registration and the gate, inside the gate, or after it, before the checkpoint was dropped (the
    next run resumes there and computes those same weights). None when there is none. A FAILED run's
    version is left alone (what failed may have been the gate reading that very version), and so is
    one that a run still going, or one that finished, adopted already: the same weights again after
    that are a deliberate re-run."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None

    def killed(run_id: str | None) -> bool:
        try:
            info = client.get_run(run_id).info
        except MlflowException:  # its run is gone from the store
            return False
        return info.status == "KILLED" and info.lifecycle_stage != "deleted"

    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        t = version.tags
        if t.get(WEIGHTS_TAG) != weights_md5:
            continue
        complete = t.get(COMPLETE_TAG) == "true"
        if any(t.get(key) != str(value) for key, value in tags.items() if complete or key in t):
            continue
        if killed(version.run_id) and ("adopted_by_run" not in t or killed(t["adopted_by_run"])):
            return version
    return None


def register_challenger(run: PipelineRun, package: Path, input_example: Any, metrics: dict[str, Any], tags: dict[str, Any]) -> Registered:
    """Log the packaged model in the pipeline run (the run that holds the metrics, params and
    datasets), register a new version, point `challenger` at it. A `register` child run marks the step.

    A run killed inside its registration, after it, before its gate, inside it or before its
    checkpoint was dropped, left a version; the next run computes the same weights (it resumes, or
    repeats the bits). With the same weights and tags (method, backbone, seed, data hashes) it
    registers no copy: it completes that version's tags when they were cut short, points `challenger`
    at it for the gate (which decides again, or finds it the champion already), and both the run and
    the version say so (`registry.adopted_from_run`, `adopted_by_run`)."""
    name, weights = model_name(run.source, run.target), package_digest(package)
    check_champion(name)  # else a version is registered, the gate fails on the champion, and the next run registers another
    child = start_run(run.experiment_id, "register", {"udaflow.stage": "register"}, run.run_id)

    def version_tags(registered_by: str) -> dict[str, Any]:
        return {  # the weights first: a version cut short after this tag still says what it holds
            WEIGHTS_TAG: weights,
            **tags,
            "run_id": registered_by,
            **{k: metrics[k] for k in ("target_acc_selected", "target_acc_last", "source_val_acc_selected", "source_only_source_val_acc", "selected_by",
                                       "target_val_acc_selected", "source_only_target_val_acc", "source_only_prediction_diversity")
               if metrics.get(k) is not None},
            **{f"validator_selected.{k}": round(v, 6) for k, v in metrics.get("validators_selected", {}).items()},
            **{f"validator_source_only.{k}": round(v, 6) for k, v in metrics.get("validators_source_only", {}).items()},
            **({"class_swaps": json.dumps(metrics["class_swaps"])} if metrics.get("class_swaps") is not None else {}),
        }

    with registry_lock(name):
        earlier = version_of_a_dead_run(name, weights, tags)
        if earlier is not None:
            client = _client()
            if earlier.tags.get(COMPLETE_TAG) != "true":  # its registration was cut short: finish it, the same way
                for key, value in version_tags(earlier.run_id).items():
                    client.set_model_version_tag(name, earlier.version, key, str(value))
                client.set_model_version_tag(name, earlier.version, COMPLETE_TAG, "true")
            client.set_model_version_tag(name, earlier.version, "adopted_by_run", run.run_id)
            client.set_registered_model_alias(name, CHALLENGER, earlier.version)
    if earlier is not None:
        adopted = {"registry.model": name, "registry.version": str(earlier.version), "registry.alias": CHALLENGER,
                   "registry.adopted_from_run": earlier.run_id}
        set_tags(run.run_id, adopted)
        set_tags(child, adopted)
        end_run(child)
        return Registered(name, str(earlier.version), CHALLENGER, f"models:/{name}@{CHALLENGER}",
                          getattr(earlier, "model_id", None) or "", adopted_from_run=earlier.run_id)
    registered = register_model(run.run_id, package, input_example, name, version_tags(run.run_id))
    link_model(run, registered.model_id, metrics)
    set_tags(run.run_id, {"registry.model": registered.name, "registry.version": registered.version, "registry.alias": registered.alias})
    set_tags(child, {"registry.model": registered.name, "registry.version": registered.version})
    end_run(child)
    return registered


def check_champion(name: str) -> None:
    """ModelUnreadable when `name` has a champion whose model files cannot be loaded (the gate could not
    compare a challenger with it); nothing when there is no such model or champion."""
    champion = _alias_version(name, CHAMPION)
    if champion is not None:
        check_loadable(name, champion.version, f"champion v{champion.version}", UNREADABLE_HINTS[CHAMPION])


HEADLINE = ("target_acc_selected", "target_acc_last", "source_val_acc_selected", "source_val_acc_last", "median_last5_target_acc")


def link_model(run: PipelineRun, model_id: str, metrics: dict[str, Any]) -> None:
    """Tie the LoggedModel to what measured it, as the MLflow UI reads it: the headline metrics on the
    model, each with the dataset it was measured on (the DVC-hashed input), and the model as an input
    of the `evaluate` child run. (log_model already made it an output of the pipeline run.)"""
    from mlflow.entities import LoggedModelInput, Metric

    if not model_id:
        return
    client = _client()
    tags = client.get_run(run.run_id).data.tags
    now = int(time.time() * 1000)
    on = {key: ("source", tags.get("dvc.source.name"), tags.get("dvc.source.md5")) if key.startswith("source")
          else ("target", tags.get("dvc.target.name"), tags.get("dvc.target.md5")) for key in HEADLINE}
    items = [Metric(k, float(metrics[k]), now, 0, model_id=model_id, dataset_name=on[k][1], dataset_digest=on[k][2])
             for k in HEADLINE if isinstance(metrics.get(k), numbers.Real) and math.isfinite(metrics[k]) and on[k][1] and on[k][2]]
    if items:
        client.log_batch(run.run_id, metrics=items)
    for child in client.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}' and tags.`udaflow.stage` = 'evaluate'"):
        client.log_inputs(child.info.run_id, models=[LoggedModelInput(model_id)])


def close_pipeline_run(run: PipelineRun, stage_seconds: dict[str, float], failed: bool = False, killed: bool = False) -> None:
    """End the pipeline run; when it failed (or was stopped: KILLED, as MLflow calls a run a user ended),
    its child runs still open end with it."""
    log_metrics(run.run_id, {f"seconds.{k}": v for k, v in stage_seconds.items()})
    if failed or killed:
        children = _client().search_runs(
            [run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}' and attributes.status = 'RUNNING'",
        )
        for child in children:
            end_run(child.info.run_id, failed=True, killed=killed)
    end_run(run.run_id, failed, killed)


# --- the registry's promotion gate and rollback (decisions in udaflow.promotion) ---

HISTORY_TAG = "udaflow.champion_history"


@contextmanager
def registry_lock(name: str):
    """Serialise promotions of one model across processes: an exclusive lock file by the store. A second
    process says whom it waits for (a registration, promote or rollback of the same model), not a silent hang."""
    from udaflow.locks import exclusive

    lock = Path(os.environ.get("UDAFLOW_ARTIFACT_ROOT", "mlflow/artifacts")) / f".{name}.promotion.lock"
    with exclusive(lock, f"another udaflow process registering, promoting or rolling back '{name}'"):
        yield


def _alias_version(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _recorded(version, validator: str):
    """The figures the pipeline tagged on a version at evaluation (for the first-version check)."""
    from udaflow.promotion import Recorded

    def num(key):
        try:
            return float(version.tags[key])
        except (KeyError, ValueError):
            return None

    def pairs(key):  # a JSON list of [a, b] class-name pairs; None when not recorded (a version from before the check)
        try:
            return tuple((str(a), str(b)) for a, b in json.loads(version.tags[key]))
        except (KeyError, ValueError, TypeError):
            return None

    return Recorded(num(f"validator_selected.{validator}"), num(f"validator_source_only.{validator}"), num("source_only_source_val_acc"),
                    num("target_val_acc_selected"), num("source_only_target_val_acc"), num("source_only_prediction_diversity"),
                    pairs("class_swaps"))


def promote(name: str, measure: Callable[[str], Any], validator: str, source_tolerance: float, min_diversity: float,
            data: str, dry_run: bool = False, version: str | None = None):
    """Run the gate for model `name`; move `champion` to `challenger` when it passes (unless dry_run).

    `measure(model_uri)` scores one version on the gate's data (a promotion.Measurement); both
    versions are measured now, under the registry lock, so they are compared on the same data.
    `version`: the version a pipeline run registered, gated only while `challenger` points at it: a run
    on another machine that registered a newer one since (registration and gate are two holds of the
    lock, and without a Prefect server a shared MLflow store has no lock across machines) has its own
    gate, and this one must not judge that version under its own number.
    Returns (decision, challenger version, previous champion version or None).
    """
    from dataclasses import replace

    from mlflow.exceptions import MlflowException

    from udaflow.promotion import decide

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise LookupError(f"registered model '{name}' does not exist (models are registered by `udaflow run`)") from None
    with registry_lock(name):
        if not dry_run:
            _settle_cut_short_writes(name)
        challenger = _alias_version(name, CHALLENGER)
        if challenger is None:
            raise LookupError(f"model '{name}' has no '{CHALLENGER}' alias: run `udaflow run` first")
        if challenger.tags.get(COMPLETE_TAG) != "true":  # pragma: no cover - register_model aliases complete versions only
            raise LookupError(f"model '{name}' v{challenger.version} is incomplete (its registration was cut short)")
        champion = _alias_version(name, CHAMPION)
        if version is not None and (superseded := _superseded(name, str(version), challenger, champion, data, dry_run)):
            return superseded
        history = _history(name, champion)
        rolled_back = challenger.tags.get("gate.rolled_back_at")
        if rolled_back and (champion is None or str(champion.version) != str(challenger.version)):
            from udaflow.promotion import Decision

            # a person rolled this version back; the gate measuring it again would likely undo that
            reason = (f"version {challenger.version} was rolled back at {rolled_back}: a new version (`udaflow run`) "
                      "is the next challenger")
            return Decision(False, reason, "rolled-back", data=data), str(challenger.version), (
                None if champion is None else str(champion.version))
        if champion is not None and str(champion.version) == str(challenger.version):
            measured_champion = measured_challenger = None
        else:
            measured_challenger = replace(_measure(measure, name, challenger, "challenger"), version=str(challenger.version))
            measured_champion = None if champion is None else replace(_measure(measure, name, champion, "champion"), version=str(champion.version))
        if measured_challenger is None:
            from udaflow.promotion import Decision

            decision = Decision(False, f"version {challenger.version} is already the champion", "same", data=data)
        else:
            decision = decide(measured_challenger, measured_champion, validator, source_tolerance, min_diversity,
                              _recorded(challenger, validator), data)
        previous = None if champion is None else str(champion.version)
        if dry_run or decision.criterion == "same":
            return decision, str(challenger.version), previous
        if version is not None and (superseded := _superseded(name, str(version), _alias_version(name, CHALLENGER), champion, data, dry_run)):
            return superseded  # registered elsewhere while both were measured
        # the decision says "promoting" / "rejecting" until its last write (for a promotion, the alias's): a
        # kill in between leaves a pending decision the next gate or rollback settles, never a final one
        # beside another gate's reason or a champion alias that did not move
        tags = {
            "gate.decision": PROMOTING if decision.promote else REJECTING,
            "gate.reason": decision.reason,
            "gate.criterion": decision.criterion,
            "gate.compared_with": previous or "none",
            "gate.data": decision.data,
            "gate.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "gate.table": json.dumps(decision.rows),
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, challenger.version, key, value)
        if decision.promote:
            # history first, alias second: a kill in between leaves a history one entry ahead of the
            # alias, which _history() trims back to the alias on the next promote or rollback
            if history and history[-1] == str(challenger.version):  # a first promotion cut short before its alias
                history = history[:-1]
            client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*history, str(challenger.version)]))
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
        client.set_model_version_tag(name, challenger.version, "gate.decision", "promoted" if decision.promote else "rejected")
        return decision, str(challenger.version), previous


def _superseded(name: str, version: str, challenger, champion, data: str, dry_run: bool):
    """(decision, version, champion) when `challenger` no longer points at `version`: a newer version was
    registered since (its run's gate judges it), and `version` is marked superseded; None while it is the challenger."""
    from udaflow.promotion import Decision

    if challenger is not None and str(challenger.version) == version:
        return None
    now = "no version" if challenger is None else f"v{challenger.version}"
    reason = f"version {version} is no longer the challenger ({now} is: registered since, and gated by its own run)"
    if not dry_run:
        client = _client()
        for key, value in {"gate.decision": "superseded", "gate.reason": reason, "gate.criterion": "superseded",
                           "gate.data": data, "gate.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
            client.set_model_version_tag(name, version, key, value)
    return Decision(False, reason, "superseded", data=data), version, None if champion is None else str(champion.version)


# what to do when the gate cannot load a version: nothing was decided, no alias moved
UNREADABLE_HINTS = {
    CHAMPION: ("the gate compares the challenger with the champion: restore the champion's files in the artifact store, "
               "or `udaflow rollback` to the previous champion (or delete the champion alias in the MLflow UI: the next gate "
               "then judges the challenger as a first version)"),
    CHALLENGER: "restore the challenger's files in the artifact store, or register a new version with `udaflow run`",
}


def _measure(measure: Callable[[str], Any], name: str, version, role: str):
    try:
        return measure(f"models:/{name}/{version.version}")
    except ModelUnreadable as exc:
        raise ModelUnreadable(f"{name} {role} v{version.version}: {str(exc).split(': ', 1)[1]}", UNREADABLE_HINTS[role]) from exc.__cause__


PROMOTING, REJECTING = "promoting", "rejecting"
FINAL_DECISIONS = ("promoted", "rejected")


def _settle_cut_short_writes(name: str) -> None:
    """What a kill inside a gate or a rollback left, settled under the registry lock before the next one:
    - a pending decision (`promoting`, `rejecting`): `promoted` on the version `champion` points at (the
      alias had moved; a later rollback moved it on and marked it rolled back), else `interrupted`, with
      a reason saying so (its other gate tags may be half this gate's, half an earlier one's); the gate
      decides again when that version is the challenger next;
    - a `gate.rolled_back_at` mark on the champion itself: a rollback cut short before its alias moved;
      the mark goes (the version is still the champion; `udaflow rollback` again rolls it back)."""
    client = _client()
    champion = _alias_version(name, CHAMPION)
    current = None if champion is None else str(champion.version)
    for version in latest_versions(name):
        tags, v = version.tags, str(version.version)
        if v == current and "gate.rolled_back_at" in tags:
            client.delete_model_version_tag(name, v, "gate.rolled_back_at")
        if tags.get("gate.decision") not in (PROMOTING, REJECTING):
            continue
        if tags["gate.decision"] == PROMOTING and (v == current or "gate.rolled_back_at" in tags):
            client.set_model_version_tag(name, v, "gate.decision", "promoted")
            continue
        client.set_model_version_tag(name, v, "gate.reason", "the gate was cut short before its decision took effect; "
                                     "the next gate of this version decides again")
        client.set_model_version_tag(name, v, "gate.decision", "interrupted")


def _history(name: str, champion=None) -> list[str]:
    """Champion versions, oldest first, ending at the current champion; versions deleted since (in
    the MLflow UI) are left out.

    Entries after the alias's version are a promote or rollback cut short between its two writes:
    they are dropped, so the history always ends where `champion` points. With no champion (never
    promoted, or its version deleted, which takes its aliases with it) the earlier champions that
    still exist are kept, so a rollback can go back to them after the next promotion.
    """
    tags = _client().get_registered_model(name).tags
    history = [v for v in tags.get(HISTORY_TAG, "").split(",") if v]
    if champion is not None:
        current = str(champion.version)
        history = history[: len(history) - history[::-1].index(current)] if current in history else [*history, current]
    existing = {str(v.version) for v in latest_versions(name)}
    return [v for v in history if v in existing]


def rollback(name: str, dry_run: bool = False) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from_version, to_version). `dry_run`: the
    same answer (or the same refusal), nothing written, not even what a kill left to settle.

    The rolled-back mark first (the next gate must not promote that version again, even after a kill
    right after the alias moved), the alias second, the history third: a kill before the alias leaves
    the mark on the champion, which the next gate or rollback removes; one before the history leaves
    it one entry ahead of the alias, which _history() trims.
    """
    client = _client()
    with registry_lock(name):
        if not dry_run:
            _settle_cut_short_writes(name)  # tags only: neither the alias nor the history it reads below
        champion = _alias_version(name, CHAMPION)
        history = _history(name, champion)
        if champion is None:
            recorded = [v for v in client.get_registered_model(name).tags.get(HISTORY_TAG, "").split(",") if v]
            gone = f" (its last champion, v{recorded[-1]}, was deleted)" if recorded and recorded[-1] not in history else ""
            raise LookupError(f"model '{name}' has no champion to roll back from{gone}; `udaflow promote` makes one")
        if len(history) < 2:
            raise LookupError(f"model '{name}' has no previous champion to roll back to (champion history: {', '.join(f'v{v}' for v in history) or 'empty'})")
        current, previous = history[-1], history[-2]
        # a champion nothing can load is worse than the one rolled back from (and that one is then barred from the gate)
        check_loadable(name, previous, f"v{previous} (the previous champion, the rollback's target)",
                       f"nothing changed; restore v{previous}'s files in the artifact store, then roll back again")
        if dry_run:
            return current, previous
        client.set_model_version_tag(name, current, "gate.rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
        return current, previous


# --- reading a past run back, for reproduction ---


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: dict[str, Any]  # the resolved params the run used
    tags: dict[str, str]
    metrics: dict[str, float]
    datasets: dict[str, dict[str, str]]  # role -> {name, md5}


def _evaluated(client, run) -> bool:
    """Whether a pipeline run's `evaluate` child finished: it ends after every metric is on the parent too,
    so a run killed later (registering, inside its gate: its version adopted by the next run) holds a
    whole record to reproduce."""
    done = f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`udaflow.stage` = 'evaluate' and attributes.status = 'FINISHED'"
    return bool(client.search_runs([run.info.experiment_id], done, max_results=1))


def run_record(run_id: str) -> RunRecord:
    """Everything needed to re-run `run_id`: resolved params, tags, metrics, dataset hashes."""
    import yaml
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LookupError(f"MLflow run '{run_id}' does not exist in {os.environ.get('MLFLOW_TRACKING_URI') or 'the configured store'}") from None
    tags = dict(run.data.tags)
    if parent := tags.get("mlflow.parentRunId"):  # a stage's child run (pretrain, adapt, evaluate, ...)
        raise LookupError(f"run '{run_id}' is the '{run.info.run_name}' stage of run '{parent}': run `udaflow reproduce {parent}`")
    # a pipeline run carries its method from its start, its data hashes only once its data was validated and versioned
    pipeline = "dvc.source.md5" in tags or "udaflow.method" in tags
    if pipeline and run.info.status != "FINISHED" and not _evaluated(client, run):  # no complete metrics yet
        if run.info.status == "RUNNING":
            raise LookupError(f"run '{run_id}' is still RUNNING (or its process died without ending it; the next `udaflow run` on "
                              "its host ends it KILLED): it has no complete metrics to compare a re-run with yet")
        raise LookupError(f"run '{run_id}' ended {run.info.status}, not FINISHED, before its evaluation did: it recorded no complete "
                          "metrics to compare a re-run with; reproduce a run that finished")
    with _tempdir() as tmp:
        try:
            path = client.download_artifacts(run_id, "params/params.resolved.yaml", tmp)
        except Exception as exc:  # noqa: BLE001 - any store error means the record is incomplete
            if not pipeline:
                raise LookupError(f"run '{run_id}' has no params/params.resolved.yaml artifact: it was not made by `udaflow run`") from None
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise LookupError(f"run '{run_id}': its params/params.resolved.yaml could not be read from {run.info.artifact_uri} "
                              f"({why}); the run's artifact store was moved or deleted") from None
        config = yaml.safe_load(Path(path).read_text())
    datasets = {}
    for role in ("source", "target"):
        if f"dvc.{role}.md5" not in tags:
            raise LookupError(f"run '{run_id}' has no DVC hash for its {role} dataset (tag dvc.{role}.md5)")
        datasets[role] = {"name": tags[f"dvc.{role}.name"], "md5": tags[f"dvc.{role}.md5"]}
    return RunRecord(run_id, config, tags, dict(run.data.metrics), datasets)


def alias_data_hashes(name: str, alias: str = CHAMPION, gated: bool = False) -> dict[str, str] | None:
    """{'source': md5, 'target': md5} of the data behind the version `alias` points at, or None (also,
    with `gated`, when no gate has decided on it yet: a run killed before or inside its gate)."""
    from mlflow.exceptions import MlflowException

    try:
        version = _alias_version(name, alias)
    except MlflowException:
        return None
    if version is None or not version.run_id:
        return None
    tags = dict(version.tags)
    if gated and tags.get("gate.decision") not in FINAL_DECISIONS:
        return None
    hashes = {role: tags.get(f"data.{role}.md5") for role in ("source", "target")}
    return hashes if all(hashes.values()) else None


# --- drift of newly ingested target data (figures from udaflow.drift) ---


def models_for_target(target: str) -> list[str]:
    """Sources s with a registered model udaflow-<s>-to-<target>, sorted."""
    suffix, names, token = f"-to-{target}", [], None
    while True:
        page = _client().search_registered_models(f"name LIKE 'udaflow-%{suffix}'", max_results=200, page_token=token)
        names += [m.name for m in page if m.name.startswith("udaflow-") and m.name.endswith(suffix)]
        token = page.token
        if not token:
            break
    shifts = [model_shift(n) for n in names]  # a domain name may contain '-to-': the runs' tags decide
    return sorted(source for source, shift_target in shifts if shift_target == target)


def log_drift(source: str, target: str, md5: str, figures: dict[str, float], report: dict[str, Any]) -> str:
    """A `drift` run in the shift's experiment: the figures as metrics, the decision as tags, the
    whole report as JSON. Returns the run id."""
    # host, pid and a first heartbeat: a drift run killed half-way is ended KILLED by the next run, not left RUNNING; the
    # decision is written last, so a run without its figures and report claims none
    run_id = start_run(experiment_id(source, target), f"drift:{target}@{md5[:12]}", {
        "udaflow.stage": "drift", "udaflow.source": source, "udaflow.target": target, "dvc.target.md5": md5, **_beat_tags(),
    })
    log_metrics(run_id, figures)
    with _tempdir() as tmp:
        path = Path(tmp) / "drift.json"
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        log_artifact(run_id, path, "drift")
    set_tags(run_id, {"drift.decision": "retrain" if report["retrain"] else "no retrain", "drift.reason": report["reason"][:4000]})
    end_run(run_id)
    return run_id
