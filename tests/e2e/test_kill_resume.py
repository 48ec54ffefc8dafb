"""Kill -9 in the middle of adaptation and run the same command again, the way a user meets it: a
fresh `git clone` of this repository, their own data ingested, the `udaflow` command in a subprocess.

The re-run says where it resumed and ends with exactly the metrics of a run that was never
interrupted (another fresh clone); a re-run with other parameters sets the checkpoint aside and
says why, instead of continuing another run's weights."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from udaflow.data.domains import build_domain

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

ADAPT_STEPS = 60
# the real params.yaml made small from the command line; a resume point every 5 adaptation steps,
# so a kill once the first checkpoint appears lands well inside adaptation (~0.06 s a step here)
SMALL = [
    "--set", "model.backbone=udaflow_vit_micro", "--set", "train.pretrain_steps=30", "--set", f"train.adapt_steps={ADAPT_STEPS}",
    "--set", "train.eval_every=10", "--set", "train.checkpoint_every=5", "--set", "train.warmup_steps=3",
    "--set", "train.batch_size=16", "--set", "train.num_threads=1",
]
RUN = ["run", "--source", "my-digits", "--target", "my-camera", *SMALL]
SHIFT = "my-digits-to-my-camera"


@pytest.fixture(scope="module")
def user_folders(tmp_path_factory) -> dict[str, Path]:
    """A user's labelled source and a labelled target (so the runs report target accuracy too)."""
    scratch = tmp_path_factory.mktemp("user-data")
    out = {}
    for key, seed, size in (("digits", 0, 120), ("camera", 5, 60)):
        build_domain("synth", scratch / key, seed=seed, synth_size=size)
        (scratch / key / "synth/manifest.csv").unlink()
        out[key] = scratch / key / "synth"
    return out


def fresh_clone(root: Path, user_folders: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    """`git clone` of this repository with the user's two domains ingested; its own Prefect home."""
    clone = root / "udaflow"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # each `udaflow run` starts Prefect's temporary server; keep it away from the session's harness
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true", GX_ANALYTICS_ENABLED="False")
    for folder, args in ((user_folders["digits"], ["--name", "my-digits"]), (user_folders["camera"], ["--name", "my-camera", "--source", "my-digits"])):
        out = subprocess.run([str(BIN / "udaflow"), "data", "ingest", str(folder), *args], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
    return clone, env


def start(clone: Path, env: dict, *args: str) -> subprocess.Popen:
    """`udaflow ARGS` in the clone, output to run.log, in its own process group: a kill of the group
    takes Prefect's temporary server with it, as a kill -9 of a job would."""
    with (clone / "run.log").open("w") as log:
        return subprocess.Popen([str(BIN / "udaflow"), *args], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_sigint_as_a_terminal_has_it)


def _sigint_as_a_terminal_has_it() -> None:
    # a test session started in the background (`make test &`, nohup) ignores SIGINT, and children inherit
    # that: Ctrl-C must reach the run as it does from a terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def udaflow(clone: Path, env: dict, *args: str) -> str:
    """Run `udaflow ARGS` to its end; its output (stdout and stderr)."""
    proc = start(clone, env, *args)
    try:
        proc.wait(timeout=600)
    finally:
        kill(proc)  # nothing outlives the test, even when the run hangs
    output = (clone / "run.log").read_text()
    assert proc.returncode == 0 and "Traceback" not in output and "MLflow run id" in output, output
    return output


def group_alive(pgid: int, wait: float = 30.0) -> bool:
    """Whether any process of the group is still there after `wait` s (killed children take a moment to be reaped)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def kill_mid_adaptation(clone: Path, env: dict, run: list[str] = RUN) -> Path:
    """Start the run and SIGKILL it (with its children) once the adaptation checkpoint exists; that checkpoint."""
    proc = start(clone, env, *run)
    deadline = time.monotonic() + 600
    try:
        while not (found := list((clone / "runs" / SHIFT).glob("*/checkpoint.pt"))):
            assert proc.poll() is None, f"the run ended before its first adaptation checkpoint:\n{(clone / 'run.log').read_text()}"
            assert time.monotonic() < deadline, "no adaptation checkpoint within 10 minutes"
            time.sleep(0.02)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not group_alive(proc.pid), "the killed run left processes behind"
    output = (clone / "run.log").read_text()
    assert "adapt adamatch:" in output and f"{ADAPT_STEPS}/{ADAPT_STEPS} steps" not in output, output  # killed inside adaptation
    assert found[0].exists()
    return found[0]


def uninterrupted_run(root: Path, user_folders: dict[str, Path], run: list[str] = RUN) -> tuple[str, bytes, bytes]:
    """The reference: the same command in another fresh clone, never interrupted; (output, metrics.json, model.pt)."""
    clone, env = fresh_clone(root, user_folders)
    output = udaflow(clone, env, *run)
    return output, *((clone / "runs" / SHIFT / "adamatch" / name).read_bytes() for name in ("metrics.json", "model.pt"))


def test_kill_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path, user_folders: dict[str, Path]):
    with ThreadPoolExecutor(1) as pool:  # the reference runs beside the rest: two processes, two cores
        reference = pool.submit(uninterrupted_run, tmp_path / "uninterrupted", user_folders)
        clone, env = fresh_clone(tmp_path / "killed", user_folders)

        checkpoint = kill_mid_adaptation(clone, env)
        assert checkpoint.parent.name == "adamatch"  # the default method
        assert not (checkpoint.parent / "metrics.json").exists()
        output = udaflow(clone, env, *RUN)
        where = re.escape(str(checkpoint.relative_to(clone)))
        step = int(re.search(rf"adapt adamatch: resuming from step (\d+) \({where}\)", output).group(1))
        assert 0 < step < ADAPT_STEPS and step % 5 == 0
        assert f"adapt adamatch: resumed at step {step}/{ADAPT_STEPS}" in output
        assert "source model" in output and "reused" in output  # pretraining finished before the kill: not redone
        assert not checkpoint.exists()  # a finished adaptation leaves no resume point behind

        reference_output, reference_metrics, reference_model = reference.result()
    assert "resuming" not in reference_output
    resumed = (checkpoint.parent / "metrics.json").read_bytes()
    assert json.loads(resumed) == json.loads(reference_metrics)  # a readable diff first
    assert resumed == reference_metrics  # then byte for byte
    # and the stage file dvc.lock records: where the run resumed is kept beside it, in its .timing.json
    assert (checkpoint.parent / "model.pt").read_bytes() == reference_model
    assert json.loads((checkpoint.parent / "model.timing.json").read_text())["resumed_from"] == step
    assert any(k.startswith("target_acc") and v is not None for k, v in json.loads(resumed).items())  # it covers target accuracy

    # killed again, then re-run with another adaptation learning rate: that checkpoint belongs to another run
    checkpoint = kill_mid_adaptation(clone, env)
    output = udaflow(clone, env, *RUN, "--set", "train.adapt_lr=0.0005")
    assert (f"adapt adamatch: {checkpoint.relative_to(clone)} was written by another run (params, data, code or start weights differ); "
            "starting fresh") in output, output
    assert "resuming from step" not in output and "resumed at step" not in output
    assert checkpoint.with_suffix(".stale").exists() and not checkpoint.exists()
    assert f"adapt adamatch: {ADAPT_STEPS}/{ADAPT_STEPS} steps (100%)" in output

    # the MLflow runs the two kills left RUNNING were marked KILLED by the next run on this host
    with sqlite3.connect(clone / "mlflow/mlflow.db") as db:
        statuses = [row[0] for row in db.execute("select status from runs where name like 'adamatch:%'")]
        runs = db.execute("select run_uuid, status from runs where name like 'adamatch:%' order by start_time").fetchall()
        ended_by = dict(db.execute("select run_uuid, value from tags where key = 'udaflow.ended_by'").fetchall())
    assert statuses.count("KILLED") == 2 and statuses.count("FINISHED") == 2 and "RUNNING" not in statuses, statuses
    # each killed run names the run that ended it: the next one, which resumed (or, under other settings, restarted) it
    assert [status for _, status in runs] == ["KILLED", "FINISHED", "KILLED", "FINISHED"], runs
    assert ended_by == {runs[0][0]: runs[1][0], runs[2][0]: runs[3][0]}


def ranks_of(clone: Path) -> list[int]:
    """pids of live processes started for this clone's stages by `udaflow.distributed` (torchrun ranks and agent)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "udaflow.distributed" in cmd and str(clone) in cmd:
                pids.append(int(proc.name))
    return pids


def test_a_killed_two_process_run_resumes_to_the_same_bits(tmp_path: Path, user_folders: dict[str, Path]):
    """`udaflow run --nproc 2`: rank 0 alone writes the checkpoint, every rank resumes from it, and the
    result equals, byte for byte, an uninterrupted two-process run; one model is registered."""
    run = [*RUN, "--nproc", "2"]
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(uninterrupted_run, tmp_path / "uninterrupted", user_folders, run)
        clone, env = fresh_clone(tmp_path / "killed", user_folders)
        checkpoint = kill_mid_adaptation(clone, env, run)
        time.sleep(2)
        assert not ranks_of(clone), "the killed run left torchrun ranks training"
        output = udaflow(clone, env, *run)
        reference_output, reference_metrics, reference_model = reference.result()
    assert "pretrain: 2 processes under torchrun" in reference_output  # the resumed run reuses the cached source model
    for out in (output, reference_output):
        assert "adapt: 2 processes under torchrun (global batch 16 per domain, 8 per process)" in out, out
        assert out.count(f"adapt adamatch: {ADAPT_STEPS}/{ADAPT_STEPS} steps (100%)") == 1  # rank 0 alone reports progress
        assert "udaflow-my-digits-to-my-camera v" in out
    step = int(re.search(r"adapt adamatch: resuming from step (\d+)", output).group(1))
    assert 0 < step < ADAPT_STEPS and output.count("resuming from step") == 1  # said once, by rank 0
    assert not checkpoint.exists()
    resumed = (checkpoint.parent / "metrics.json").read_bytes()
    assert json.loads(resumed) == json.loads(reference_metrics)
    assert resumed == reference_metrics and (checkpoint.parent / "model.pt").read_bytes() == reference_model
    assert json.loads(resumed)["target_acc_selected"] is not None


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is `pid`."""
    out = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
    return out


def prefect_server_of(proc: subprocess.Popen, clone: Path) -> int:
    """The pid of the temporary Prefect server `udaflow run` started, once adaptation runs."""
    deadline = time.monotonic() + 600
    while True:
        servers = [pid for pid, cmd in children_of(proc.pid) if "prefect.server.api.server:create_app" in cmd]
        if servers and "adapt adamatch" in (clone / "run.log").read_text():
            return servers[0]
        assert proc.poll() is None, (clone / "run.log").read_text()
        assert time.monotonic() < deadline, "no adaptation within 10 minutes"
        time.sleep(0.05)


def gone(pid: int, wait: float = 15.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_is_one_line_and_no_kill_leaves_prefect_s_server_behind(tmp_path: Path, user_folders: dict[str, Path]):
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it) stops `udaflow run` within
    seconds with one line and exit 130, while the temporary Prefect server, in a session of its own,
    still hears the run report its end; a `kill -9` or `kill` of the run's pid alone takes the server with it."""
    clone, env = fresh_clone(tmp_path, user_folders)
    proc = start(clone, env, *RUN, "--set", f"train.adapt_steps={ADAPT_STEPS * 20}")  # long enough to interrupt
    server = prefect_server_of(proc, clone)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    output = (clone / "run.log").read_text()
    assert time.monotonic() - t0 < 60, output
    assert output.splitlines()[-1].startswith("interrupted: the same command resumes from the last checkpoint"), output
    assert "Traceback" not in output and "ConnectError" not in output, output
    assert gone(server)
    with sqlite3.connect(clone / "mlflow/mlflow.db") as db:
        assert [row[0] for row in db.execute("select status from runs where name like 'adamatch:%'")] == ["KILLED"]  # stopped, not failed
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = start(clone, env, *RUN, "--set", f"train.adapt_steps={ADAPT_STEPS * 20}")
        server = prefect_server_of(proc, clone)
        os.kill(proc.pid, sig)  # the pid alone: its children are not signalled
        proc.wait(timeout=60)
        try:
            assert gone(server), f"Prefect's server outlived `udaflow run` killed by {sig.name}"
        finally:
            kill(proc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)
