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


def test_serving_the_champion_over_http(team, project: Path, first_run, tmp_path: Path):
    """`udaflow serve` (mlflow models serve) from a shell without the venv on PATH: encoded files and
    uint8 arrays get the predictions udaflow's own evaluation makes; bad requests get a 400."""
    import base64
    import io

    import httpx
    import numpy as np
    import torch
    from PIL import Image

    from servers import free_port, stop, wait_http
    from udaflow import tracking
    from udaflow.config import load_config
    from udaflow.data.datasets import Domain
    from udaflow.engine import predict
    from udaflow.experiment import image_spec

    assert first_run["client"].get_model_version_by_alias(MODEL, "champion")  # promoted by the test before
    port, log = free_port(), tmp_path / "serve.log"
    env = {**team["env"], "PATH": "/usr/bin:/bin"}  # a fresh shell: no venv on PATH
    proc = subprocess.Popen([str(BIN / "udaflow"), "serve", "--model", MODEL, "--port", str(port), "--params", str(project / "params.yaml")],
                            cwd=project, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, 180)
        url = f"http://127.0.0.1:{port}/invocations"

        # udaflow's own evaluation of the same files: decoded as the pipeline decodes, the registered model
        cfg = load_config(project / "params.yaml", None, ["source=paint", "target=paint-b"])
        tracking.configure(team["mlflow"].uri, cfg.tracking.artifact_root)
        model = tracking.load_model(f"models:/{MODEL}@champion")
        domain = Domain.open(project / "data/raw", "paint-b")
        rows = domain.select("all")[:24]
        _, logits = predict(model.classifier, domain.pixels(rows, image_spec(cfg)))
        expected = torch.softmax(logits, 1).numpy()
        classes = list(model.classes)

        files = [(domain.root / r.path).read_bytes() for r in rows]
        encoded = {"inputs": [{"image": base64.b64encode(f).decode()} for f in files]}
        arrays = {"inputs": [{"image": np.asarray(Image.open(io.BytesIO(f))).tolist()} for f in files]}
        for body in (encoded, arrays):
            clock = time.perf_counter()
            answer = httpx.post(url, json=body, timeout=60)
            seconds = time.perf_counter() - clock
            assert answer.status_code == 200, answer.text
            predictions = answer.json()["predictions"]
            assert [p["class"] for p in predictions] == [classes[k] for k in expected.argmax(1)]
            served = np.array([[p["probabilities"][c] for c in classes] for p in predictions])
            np.testing.assert_allclose(served, expected, atol=1e-5)
            print(f"served {len(files)} images in {seconds * 1000:.0f} ms: {seconds / len(files) * 1000:.1f} ms per image")
        # a column named otherwise: one short line, not MLflow's echo of every image posted
        wrong = httpx.post(url, json={"inputs": [{"Image": base64.b64encode(f).decode()} for f in files]}, timeout=60)
        assert wrong.status_code == 400 and "no 'image' column (column names are case-sensitive; or the request held no images)" in wrong.text, wrong.text[-500:]
        assert len(wrong.text) < 500, len(wrong.text)

        # any size: a 45x70 photo-sized copy is resized by the model itself, the same whether sent as PNG or pixels
        big = Image.open(io.BytesIO(files[0])).resize((70, 45))
        png = io.BytesIO()
        big.save(png, "PNG")
        both = {"inputs": [{"image": base64.b64encode(png.getvalue()).decode()}, {"image": np.asarray(big).tolist()}]}
        answer = httpx.post(url, json=both, timeout=60).json()["predictions"]
        assert answer[0] == answer[1]

        pixels = np.asarray(Image.open(io.BytesIO(files[0])))
        bad = {
            "not JSON": b"{inputs: [",
            "not base64": {"inputs": [{"image": "not an image!"}]},
            "not an image file": {"inputs": [{"image": base64.b64encode(b"plain text").decode()}]},
            "pixels 0-255 as floats": {"inputs": [{"image": (pixels / 1.7).tolist()}]},
            "over 255": {"inputs": [{"image": (pixels.astype(int) + 300).tolist()}]},
            "no image column": {"inputs": [{"picture": "x"}]},
            "a 1-D array": {"inputs": [{"image": [1, 2, 3]}]},
        }
        for what, body in bad.items():
            answer = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60) if isinstance(body, bytes) \
                else httpx.post(url, json=body, timeout=60)
            assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text[:300])
            assert answer.json().get("message"), what
        message = httpx.post(url, json=bad["over 255"], timeout=60).json()["message"]
        assert message.startswith("image 0:") and "0-255" in message and len(message) < 200, message[:300]  # not the request echoed
    finally:
        stop(proc)


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    import httpx

    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return [r for r in httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json() if not r.get("auto_scheduled")]


def test_retrain_deployment_runs_on_a_process_worker_only_when_new_data_is_shifted(team, project: Path, first_run, tmp_path: Path):
    """prefect.yaml's retrain deployment on the Prefect server (PostgreSQL), run by a process worker:
    an unshifted new batch of the target is measured and triggers nothing; a shifted one retrains."""
    import socket

    import httpx

    from servers import stop

    env, api, client = team["env"], team["prefect"].api, first_run["client"]
    repo = Path(__file__).resolve().parents[2]

    def prefect(*args: str, cwd: Path = repo) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    # the README's steps, with prefect.yaml's deployment pointed at this project's shift
    spec = yaml.safe_load((repo / "prefect.yaml").read_text())
    [deployment] = spec["deployments"]
    deployment.update(name="paint-to-paint-b", schedules=[])
    deployment["parameters"].update(params_file=str(project / "params.yaml"), source="paint", target="paint-b")
    deployment["triggers"][0]["match"]["prefect.resource.id"] = "udaflow.dataset.paint-b"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    prefect("work-pool", "create", "udaflow", "--type", "process", "--overwrite")
    prefect("concurrency-limit", "create", f"udaflow-training@{socket.gethostname()}", "1")
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))
    made = httpx.get(f"{api}/deployments/name/udaflow-retrain/paint-to-paint-b", timeout=10).json()
    assert made["work_pool_name"] == "udaflow" and (made.get("global_concurrency_limit") or {}).get("limit") == 1, made
    limits = httpx.post(f"{api}/concurrency_limits/filter", json={}, timeout=10).json()
    assert {(c["tag"], c["concurrency_limit"]) for c in limits} >= {(f"udaflow-training@{socket.gethostname()}", 1)}

    versions = lambda: len(client.search_model_versions(f"name='{MODEL}'"))  # noqa: E731
    before = versions()
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "udaflow", "--type", "process", "--limit", "1"],
                              env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        scratch = tmp_path / "batches"
        # more of the same: new pixels (a new DVC version) from the champion's distribution
        out = udaflow(env, project, "data", "ingest", str(colour_folder(scratch / "same", 90, 7, 20.0)), "--name", "paint-b",
                      "--source", "paint", "--replace")
        assert out.returncode == 0 and "no retrain: no shift" in out.stdout, out.stdout
        assert "(drift: unshifted) emitted" in out.stdout
        time.sleep(20)
        assert _flow_runs(api, made["id"]) == [] and versions() == before

        # a shifted batch: the colours much darker than anything the champion adapted to
        out = udaflow(env, project, "data", "ingest", str(colour_folder(scratch / "dark", 90, 8, -110.0)), "--name", "paint-b",
                      "--source", "paint", "--replace")
        assert out.returncode == 0 and "retrain: shift" in out.stdout and "(drift: shifted) emitted" in out.stdout, out.stdout
        deadline = time.time() + 600
        while time.time() < deadline:
            runs = _flow_runs(api, made["id"])
            states = [r["state"]["type"] for r in runs]
            assert not {"FAILED", "CRASHED"} & set(states), log.read_text()[-3000:]
            if runs and all(s == "COMPLETED" for s in states):
                break
            time.sleep(3)
        assert len(runs) == 1 and states == ["COMPLETED"], (states, log.read_text()[-3000:])
        assert versions() == before + 1
        assert runs[0]["parameters"]["drift"] == {MODEL: "shifted"}  # prefect.yaml's trigger hands on the model's own verdict

        # the registry on the server: the retrain's gate either moved `champion` to the new version or
        # kept the old one; a promotion is undone by a rollback
        champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
        print(f"after the retrain: champion v{champion} of {versions()}")
        if champion == str(before + 1):
            out = udaflow(env, project, "rollback", "--model", MODEL)
            assert out.returncode == 0 and f"rolled back from v{before + 1} to v{before}" in out.stdout, out.stdout + out.stderr
            assert str(client.get_model_version_by_alias(MODEL, "champion").version) == str(before)

        # the figures: on the event, and as MLflow `drift` runs with the decision
        events = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"name": ["udaflow.dataset.updated"]}}}, timeout=10).json()
        shifted = [e for e in events["events"] if e["resource"].get("udaflow.drift") == "shifted"]
        assert shifted and shifted[0]["payload"]["drift"][MODEL]["pad"] >= 0.2
        drift_runs = client.search_runs([first_run["run"].info.experiment_id], "tags.`udaflow.stage` = 'drift'")
        assert sorted(r.data.tags["drift.decision"] for r in drift_runs) == ["no retrain", "retrain"]
    finally:
        stop(worker)


HOLD_THE_SLOT = """
import json, sys, time
from tasks.registry import registry_slot
asked = time.time()
with registry_slot(sys.argv[1]):
    got = time.time()
    time.sleep(float(sys.argv[2]))
    print(json.dumps([asked, got, time.time()]))
"""


def test_registry_writes_of_one_model_from_two_machines_take_turns(team):
    """Two processes with nothing in common but the Prefect server (as two workers on two machines:
    no shared file lock) each hold the registry slot of one model: the second waits for the first. A
    slot of another model is not held up. Before 2026-12-03 only a file lock by the artifact root
    serialised registration and the gate: one machine's processes, not a team's."""
    def hold(model: str, seconds: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLD_THE_SLOT, model, str(seconds)], env=team["env"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = hold(MODEL, 6)
    time.sleep(1.5)  # the first is in (or about to be): a process starts in about a second here
    second, other = hold(MODEL, 0), hold("udaflow-other-to-model", 0)
    spans = []
    for proc in (first, second, other):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        spans.append(json.loads(out.strip().splitlines()[-1]))
    (_, got1, left1), (asked2, got2, _), (_, got3, _) = spans
    assert asked2 < left1 <= got2, spans  # it asked while the first held the slot, and got it after
    assert got3 < left1, spans  # another model's registry is not held up
    import urllib.parse
    import urllib.request

    # the server's own record (this test process talks to the session's Prefect harness, not to it)
    url = f"{team['env']['PREFECT_API_URL']}/v2/concurrency_limits/{urllib.parse.quote(f'udaflow-registry:{MODEL}')}"
    with urllib.request.urlopen(url, timeout=30) as answer:
        limit = json.load(answer)
    assert limit["limit"] == 1 and limit["active_slots"] == 0  # created on first use, and free again
