"""A team's servers on 127.0.0.1 for the integration tests: PostgreSQL (the Debian package's
binaries, which `.ci/run` installs when absent), an S3 endpoint (moto in server mode), an MLflow
tracking server on PostgreSQL with S3 artifacts, and a Prefect server on the same PostgreSQL.

Each is a real process started as a user would start it; `stop()` ends it."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
# a fake secret: tests check it never lands in a file in git, a logged param or a tag
ACCESS_KEY, SECRET_KEY = "udaflow-test-key", "udaflow-FAKE-secret-0123456789"
AWS_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """This environment without anything that points at another store or server."""
    drop = ("PREFECT_", "MLFLOW_TRACKING", "MLFLOW_S3", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "False",
                "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"})
    return env


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{url}: not up after {timeout:.0f} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((p for p in candidates if (p / "initdb").exists() and (p / "postgres").exists()), None)


@dataclass
class Postgres:
    """A throwaway cluster: trust authentication on 127.0.0.1 only. Root cannot run PostgreSQL, so as
    root the cluster belongs to the `postgres` user (the Debian package makes it)."""

    port: int
    folder: Path
    bindir: Path
    procs: list = field(default_factory=list)

    @classmethod
    def start(cls) -> "Postgres":
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed (apt-get install postgresql; .ci/run does)")
        folder = Path(tempfile.mkdtemp(prefix="udaflow-pg-"))
        folder.chmod(0o755)
        pg = cls(free_port(), folder, bindir)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        pg._as_owner([str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        log = folder / "postgres.log"
        pg._as_owner([
            str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-l", str(log), "-w", "-t", "120", "start",
            "-o", f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {folder} -c max_connections=200 -c fsync=off",
        ])
        for db in ("mlflow", "prefect"):
            pg.sql(f"CREATE DATABASE {db}")
        return pg

    def _as_owner(self, cmd: list[str]) -> None:
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=180)

    def sql(self, statement: str, db: str = "postgres") -> str:
        out = subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db, "-tAc", statement],
            check=True, capture_output=True, text=True, timeout=60,
        )
        return out.stdout.strip()

    def url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        try:
            self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Server:
    """A server process on 127.0.0.1:port, its output in `log`."""

    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop(self.proc, 60)


class S3(Server):
    """moto's S3 in server mode: a real HTTP endpoint that boto3, MLflow and DVC talk to."""

    @property
    def endpoint(self) -> str:
        return self.base

    @classmethod
    def start(cls, folder: Path, buckets: tuple[str, ...]) -> "S3":
        port, log = free_port(), folder / "moto.log"
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env={**base_env(), **AWS_ENV},
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, log, 60)
        s3 = cls(port, proc, log)
        for bucket in buckets:
            s3.client().create_bucket(Bucket=bucket)
        return s3

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


class MlflowServer(Server):
    @property
    def uri(self) -> str:
        return self.base

    @classmethod
    def start(cls, folder: Path, pg: Postgres, s3: S3, bucket: str) -> "MlflowServer":
        """The README's line: `mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://...`."""
        port, log = free_port(), folder / "mlflow-server.log"
        env = {**base_env(), **AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", pg.url("mlflow"), "--artifacts-destination", f"s3://{bucket}/",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=folder,
        )
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, 240)
        return cls(port, proc, log)


@dataclass
class PrefectServer(Server):
    env: dict[str, str] = field(default_factory=dict)  # what a client (CLI, worker) needs to reach it

    @property
    def api(self) -> str:
        return f"{self.base}/api"

    @classmethod
    def start(cls, folder: Path, pg: Postgres) -> "PrefectServer":
        """`prefect server start` with its database on PostgreSQL (asyncpg, which Prefect ships with)."""
        port, log = free_port(), folder / "prefect-server.log"
        home = folder / "prefect-home"
        home.mkdir(exist_ok=True)
        env = {
            **base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "postgresql+asyncpg"),
        }
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=folder)
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log, 240)
        client_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
        return cls(port, proc, log, client_env)
