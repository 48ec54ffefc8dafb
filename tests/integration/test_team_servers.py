"""udaflow on a team's servers, all real processes on 127.0.0.1: PostgreSQL, an S3 endpoint (moto),
an MLflow tracking server on PostgreSQL with its artifacts in S3, a DVC remote in S3, and a Prefect
server on the same PostgreSQL. The pipeline runs through the CLI as a user runs it; nothing but
environment variables and the DVC remote's config points it at the servers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import AWS_ENV, BIN, SECRET_KEY, S3, MlflowServer, Postgres, PrefectServer, base_env
from udaflow.data.domains import build_domain

pytestmark = pytest.mark.slow
SHIFT, MODEL = ("paint", "paint-b"), "udaflow-paint-to-paint-b"


def colour_folder(folder: Path, n: int, seed: int, shift: float = 0.0) -> Path:
    """An ImageFolder of noisy solid colours (classes a, b, c), as a user's PNGs: learnt in tens of steps."""
    from PIL import Image

    from conftest import CLASSES, colour_images

    images, labels = colour_images(n, seed, shift)
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / CLASSES[label] / f"{seed}-{i}.png")
    return folder


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    folder = tmp_path_factory.mktemp("servers")
    started = []
    try:
        clock = time.perf_counter()
        pg = Postgres.start()
        started.append(pg)
        s3 = S3.start(folder, ("mlflow-artifacts", "dvc-remote"))
        started.append(s3)
        mlflow_server = MlflowServer.start(folder, pg, s3, "mlflow-artifacts")
        started.append(mlflow_server)
        prefect = PrefectServer.start(folder, pg)
        started.append(prefect)
        print(f"servers up in {time.perf_counter() - clock:.1f} s")
        env = {**prefect.env, **AWS_ENV, "MLFLOW_TRACKING_URI": mlflow_server.uri}
        yield {"pg": pg, "s3": s3, "mlflow": mlflow_server, "prefect": prefect, "env": env, "folder": folder}
    finally:
        for server in reversed(started):
            server.stop()


def udaflow(env: dict, project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "udaflow"), *args, "--params", str(project / "params.yaml")], cwd=project, env=env,
                         capture_output=True, text=True, timeout=timeout)
    print(out.stdout[-4000:], out.stderr[-4000:])
    return out


def dvc(project: Path, *args: str) -> None:
    subprocess.run([str(BIN / "dvc"), *args], cwd=project, check=True, capture_output=True, text=True, env=base_env())


@pytest.fixture(scope="module")
def project(team, tmp_path_factory, new_project) -> Path:
    """A project whose DVC default remote is the S3 bucket: `data build` and `data ingest` push there."""
    root = new_project(tmp_path_factory.mktemp("team-project"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profiles"]["quick"]["train"] = {"pretrain_steps": 60, "adapt_steps": 24}
    params["train"]["augment"].update(invert=0.0, color=False)  # the classes are colours
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(root, "remote", "add", "-d", "-f", "s3", "s3://dvc-remote/udaflow")
    dvc(root, "remote", "modify", "s3", "endpointurl", team["s3"].endpoint)  # credentials: the environment's AWS_* only
    subprocess.run(["git", "commit", "-qam", "DVC remote: S3"], cwd=root, check=True)
    out = udaflow(team["env"], root, "data", "build", "--domains", "synth")
    assert out.returncode == 0, out.stderr
    scratch = tmp_path_factory.mktemp("user-folders")
    for name, seed, shift, source in (("paint", 0, 0.0, []), ("paint-b", 1, 20.0, ["--source", "paint"])):
        out = udaflow(team["env"], root, "data", "ingest", str(colour_folder(scratch / name, 90, seed, shift)), "--name", name, *source)
        assert out.returncode == 0, out.stderr
    return root


@pytest.fixture(scope="module")
def first_run(team, project) -> dict:
    clock = time.perf_counter()
    out = udaflow(team["env"], project, "run", "--source", SHIFT[0], "--target", SHIFT[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=team["mlflow"].uri, registry_uri=team["mlflow"].uri)
    runs = client.search_runs([client.get_experiment_by_name("udaflow/paint-to-paint-b").experiment_id],
                              "attributes.run_name LIKE '%:paint-to-paint-b'")
    assert len(runs) == 1
    return {"run": runs[0], "client": client, "seconds": time.perf_counter() - clock}


def test_pipeline_on_the_servers_then_reproduce_from_the_s3_remote(team, project: Path, first_run):
    s3, client, run = team["s3"], first_run["client"], first_run["run"]
    print(f"udaflow run against the servers: {first_run['seconds']:.1f} s")
    # the datasets went to the S3 remote, the run's artifacts and model to the S3 artifact store
    assert len(s3.keys("dvc-remote", "udaflow/files/md5/")) >= 120 + 90 + 90  # synth (data build), paint, paint-b
    artifacts = s3.keys("mlflow-artifacts")
    assert any(k.endswith("MLmodel") for k in artifacts) and any(k.endswith("weights.safetensors") for k in artifacts)
    assert any(k.endswith("params.resolved.yaml") for k in artifacts)
    assert run.data.tags["dvc.target.name"] == "paint-b" and run.data.metrics["target_acc_selected"] > 80
    datasets = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert datasets == {"paint": run.data.tags["dvc.source.md5"], "paint-b": run.data.tags["dvc.target.md5"]}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's S3, not a local folder

    out = udaflow(team["env"], project, "promote", "--model", MODEL)
    assert out.returncode == 0
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == run.info.run_id

    # the secret only ever lived in the environment
    texts = [json.dumps(r.data.params) + json.dumps(r.data.tags) for r in client.search_runs([run.info.experiment_id])]
    texts += [json.dumps(v.tags) for v in client.search_model_versions(f"name='{MODEL}'")]
    tracked = subprocess.run(["git", "grep", "-I", "-l", SECRET_KEY], cwd=project, capture_output=True, text=True)
    assert tracked.stdout == "" and not any(SECRET_KEY in t for t in texts)
    assert SECRET_KEY not in (project / ".dvc/config").read_text()

    # nothing of the data is left on this machine but the working copy: reproduce pulls from S3
    shutil.rmtree(project / ".dvc/cache")
    out = udaflow(team["env"], project, "reproduce", run.info.run_id)
    assert out.returncode == 0 and "identical metrics" in out.stdout
    assert (project / ".dvc/cache").is_dir()  # refilled from the remote
