"""Scheduled and data-triggered retrains against a real `prefect server start` and a process worker."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from udaflow.data.domains import build_domain

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    # a clean environment: the session's prefect_test_harness exports its own PREFECT_* settings
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env = {
        **base,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "False",
    }
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    api = env["PREFECT_API_URL"]
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
    yield env
    _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: a graceful Prefect shutdown can outlast 30 s on a loaded 2-core box,
    and by teardown the test has asserted everything it needed from the process."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def project(tmp_path_factory, new_shift_project) -> Path:
    return new_shift_project(tmp_path_factory.mktemp("scheduled"), tmp_path_factory.mktemp("fonts"), 60)


def udaflow(env, project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "udaflow"), *args, "--params", str(project / "params.yaml")], env=env, capture_output=True, text=True, timeout=600)


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    """Runs of the deployment other than the cron's own future ones (auto_scheduled)."""
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return [r for r in _post(f"{api}/flow_runs/filter", body).json() if not r.get("auto_scheduled")]


def _post(url: str, body: dict) -> httpx.Response:
    """POST as Prefect's own client does: a 503 (what the server answers when its SQLite database is
    locked by another writer, "errors clients can retry on") or a 429 / 502 is tried again, up to 30 s."""
    for _ in range(30):
        response = httpx.post(url, json=body, timeout=30)
        if response.status_code not in (429, 502, 503):
            return response
        time.sleep(1)
    return response


def _wait_completed(api: str, deployment_id: str, count: int, timeout: float = 420) -> list[dict]:
    deadline = time.time() + timeout
    runs: list[dict] = []
    while time.time() < deadline:
        runs = _flow_runs(api, deployment_id)
        states = [r["state"]["type"] for r in runs]
        if any(s in ("FAILED", "CRASHED") for s in states):
            pytest.fail(f"a retrain failed: {[(r['name'], r['state']) for r in runs]}")
        if len(runs) >= count and all(s == "COMPLETED" for s in states):
            return runs
        time.sleep(3)
    pytest.fail(f"retrains did not complete in time: {[(r['name'], r['state']['type']) for r in runs]}")


def _create_run(api: str, deployment_id: str) -> dict:
    """A run of the deployment, started now (as the UI's "Quick run"); the server's own answer if it refuses."""
    response = _post(f"{api}/deployments/{deployment_id}/create_flow_run", {})
    assert response.is_success, f"create_flow_run: {response.status_code} {response.text[:2000]}"
    return response.json()


def _describe(api: str, deployment_id: str) -> str:
    return str([(r["name"], r["state"]["type"], r.get("created_by"), r.get("parameters")) for r in _flow_runs(api, deployment_id)])


def _versions(project: Path) -> int:
    uri = yaml.safe_load((project / "params.yaml").read_text())["tracking"]["uri"]
    # explicit URIs: other tests in the session point MLflow's global registry URI elsewhere
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return len(client.search_model_versions("name='udaflow-synth-to-fonts-b'"))


def test_schedule_then_run_then_data_trigger(server, project: Path, tmp_path: Path):
    env, api = server, server["PREFECT_API_URL"]
    bad = udaflow(env, project, "schedule", "--source", "synth", "--target", "fonts-b", "--cron", "every day")
    assert bad.returncode == 2 and "not a valid cron" in bad.stderr
    # the server is up: a bad cron's hint is about the cron, not about starting a server
    assert 'hint: cron has five fields: minute hour day month weekday, e.g. "0 3 * * *"' in bad.stderr, bad.stderr
    assert "prefect server start" not in bad.stderr, bad.stderr
    # Prefect reads a sixth field as seconds: "0 3 * * * *" queued 60 retrains a night, 03:00:00 to 03:00:59
    bad = udaflow(env, project, "schedule", "--source", "synth", "--target", "fonts-b", "--cron", "0 3 * * * *")
    assert bad.returncode == 2 and "--cron '0 3 * * * *' has 6 fields, not five" in bad.stderr, bad.stderr
    # 30 February: Prefect accepts it, and its scheduler then fails on it at every pass; no retrain ever runs
    bad = udaflow(env, project, "schedule", "--source", "synth", "--target", "fonts-b", "--cron", "0 4 30 2 *")
    assert bad.returncode == 2 and "--cron '0 4 30 2 *' never fires" in bad.stderr and "hint: a day the month never has" in bad.stderr, bad.stderr
    # a work pool name Prefect refuses: it came as a pydantic traceback (exit 1) from the deploy
    bad = udaflow(env, project, "schedule", "--source", "synth", "--target", "fonts-b", "--cron", "0 3 * * *", "--pool", "team/a")
    assert bad.returncode == 2 and "--pool 'team/a': not a work pool name" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert httpx.get(f"{api}/deployments/name/udaflow-retrain/synth-to-fonts-b", timeout=10).status_code == 404
    # a domain's error gets the data hint, not the Prefect server's
    bad = udaflow(env, project, "schedule", "--source", "synth", "--target", "nosuch", "--cron", "0 3 * * *")
    assert bad.returncode == 2 and "domain 'nosuch' not found" in bad.stderr and "hint: built-in domains" in bad.stderr, bad.stderr

    out = udaflow(env, project, "schedule", "--source", "synth", "--target", "fonts-b", "--cron", "0 3 * * *")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^next scheduled retrain: \d{4}-\d\d-\d\d 03:00 UTC$", out.stdout, re.M), out.stdout
    deployment = httpx.get(f"{api}/deployments/name/udaflow-retrain/synth-to-fonts-b", timeout=10).json()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["work_pool_name"] == "udaflow"

    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "udaflow", "--type", "process", "--limit", "1"],
        env=env, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    try:
        # a scheduled run, started now instead of at 03:00
        _create_run(api, deployment["id"])
        _wait_completed(api, deployment["id"], 1)
        assert _versions(project) == 1, _describe(api, deployment["id"])  # the gate then ran its first-version check

        # a retrain on unchanged data (same hashes as the champion's or the challenger's run) is skipped with a message
        run = _create_run(api, deployment["id"])
        _wait_completed(api, deployment["id"], 2)
        assert _versions(project) == 1
        skipped = False
        for _ in range(20):  # run logs reach the API in batches, shortly after the run ends
            logs = _post(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
            skipped = any("retrain skipped" in log["message"] for log in logs)
            if skipped:
                break
            time.sleep(2)
        assert skipped, [log["message"][:200] for log in logs]

        # new target content -> new DVC version -> event -> a retrain
        changed = tmp_path / "fonts-v2"
        build_domain("synth", changed, seed=11, synth_size=60)
        (changed / "synth/manifest.csv").unlink()
        out = udaflow(env, project, "data", "ingest", str(changed / "synth"), "--name", "fonts-b", "--source", "synth", "--replace")
        assert out.returncode == 0, out.stdout + out.stderr
        # no champion yet (the tiny first version failed its sanity check) or a shifted batch: a retrain
        assert "(drift: no-champion) emitted" in out.stdout or "(drift: shifted) emitted" in out.stdout, out.stdout
        _wait_completed(api, deployment["id"], 3)
        assert _versions(project) == 2
        # the trigger handed the event's per-model verdicts to the run (a model whose own verdict is
        # `unshifted` skips: tests/flows/test_pipeline.py)
        triggered = [r["parameters"]["drift"] for r in _flow_runs(api, deployment["id"]) if r["parameters"].get("drift")]
        assert triggered in ([{"udaflow-synth-to-fonts-b": "no-champion"}], [{"udaflow-synth-to-fonts-b": "shifted"}]), \
            _describe(api, deployment["id"])

        # the same content again: no new DVC version, no event, no retrain
        out = udaflow(env, project, "data", "ingest", str(changed / "synth"), "--name", "fonts-b", "--source", "synth")
        assert out.returncode == 0 and "no retrain triggered" in out.stdout
        time.sleep(15)
        assert len(_flow_runs(api, deployment["id"])) == 3

    finally:
        _stop(worker)
        print((tmp_path / "worker.log").read_text()[-3000:])


@pytest.mark.parametrize("named_by", ["environment", "prefect profile"])
def test_a_server_that_is_down_is_one_line_however_it_was_named(project: Path, tmp_path: Path, named_by: str):
    """`udaflow schedule` reads the Prefect server as Prefect does: PREFECT_API_URL, or the active
    profile's (`prefect config set`; until 2026-12-03 udaflow read the environment only and said "no
    Prefect server"). One that does not answer is one line and exit 2 (it was a 300-line traceback)."""
    dead = f"http://127.0.0.1:{_free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "UDAFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if named_by == "environment":
        env["PREFECT_API_URL"] = dead
    else:
        subprocess.run([str(BIN / "prefect"), "config", "set", f"PREFECT_API_URL={dead}"], env=env, check=True, capture_output=True)
    out = udaflow(env, project, "schedule", "--source", "synth", "--target", "fonts-b", "--cron", "0 3 * * *")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot reach {dead.removesuffix('/api')}: ") and lines[1].startswith("hint: is it running"), out.stderr


def _dataset_events(api: str, name: str) -> list[dict]:
    body = {"filter": {"event": {"name": ["udaflow.dataset.updated"]}, "resource": {"id": [f"udaflow.dataset.{name}"]}}, "limit": 50}
    return _post(f"{api}/events/filter", body).json()["events"]


def test_an_ingest_that_cannot_reach_its_server_says_so_and_the_next_one_announces(server, project: Path, tmp_path: Path):
    """Prefect's `emit_event` queues an event for a background worker that drops it when the server does
    not answer: an ingest printed "emitted", exited 0 and recorded the announcement, so the shifted
    data never started a retrain and the same ingest again said "no retrain triggered". Now it is an
    error, nothing is recorded as announced, and the same command announces the version once the
    server answers."""
    folder = tmp_path / "fonts-d"
    build_domain("synth", folder, seed=13, synth_size=60)
    (folder / "synth/manifest.csv").unlink()
    down = {**server, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}
    args = ("data", "ingest", str(folder / "synth"), "--name", "fonts-d", "--source", "synth")
    out = udaflow(down, project, *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout + out.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot reach {down['PREFECT_API_URL'].removesuffix('/api')}"), out.stderr
    assert lines[1].startswith("hint: the new version is recorded, its announcement (drift, retrain trigger) is not"), out.stderr
    assert "(new version;" in out.stdout and "emitted" not in out.stdout, out.stdout
    work_dir = Path(yaml.safe_load((project / "params.yaml").read_text())["work_dir"])
    assert not (work_dir / "ingest/fonts-d/announced.json").exists()

    out = udaflow(server, project, *args)  # the server answers: the recorded version is announced now
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "announcing it now" in out.stdout and "(drift: no-champion) emitted for 'fonts-d'" in out.stdout, out.stdout
    for _ in range(30):  # the server stores events shortly after it takes them
        if events := _dataset_events(server["PREFECT_API_URL"], "fonts-d"):
            break
        time.sleep(1)
    assert [e["resource"]["udaflow.drift"] for e in events] == ["no-champion"], events
    assert (work_dir / "ingest/fonts-d/announced.json").exists()
    out = udaflow(server, project, *args)
    assert out.returncode == 0 and "same content as the recorded version: no retrain triggered" in out.stdout, out.stdout
