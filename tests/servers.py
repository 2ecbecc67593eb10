"""Real loopback servers for tests: S3 (moto), an MLflow tracking server, a Prefect server.

A pytest plugin: load it with ``pytest_plugins = ["tests.servers"]``. Each fixture gives one
server per session on 127.0.0.1 at a free port, answering, and tears down its whole process
group afterwards. All the servers a session's tests ask for are launched together before the
first test (see ``servers_prestart``). Logs go to files under the session's tmp dir; a server
that does not come up fails with the tail of its log.

Two things to know when pointing code at these servers:

- Prefect reads its settings when it is imported, so changing ``os.environ`` afterwards does
  not move an in-process client: use :func:`prefect_api` (``temporary_settings``) in-process,
  and ``run_env(..., inherit=True)`` as the ``env=`` of subprocesses.
- s3fs caches filesystem instances; one built before the S3 env was set keeps its endpoint.

PYTEST_DONT_REWRITE: this module has no asserts to rewrite, and a conftest or a test module
may well import it before pytest loads it as a plugin (pytest would warn on every run).
"""

from __future__ import annotations

import http.client
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import pytest

from tasks.redact import redact

__all__ = [
    "MlflowServer", "PrefectServer", "S3Server", "ServerError", "ServerProcess", "Worker",
    "launch_mlflow", "launch_prefect", "launch_s3", "mlflow_server", "prefect_api",
    "prefect_server", "run_env", "s3_server", "servers_prestart", "start_worker",
]

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0  # a cold start on a busy 2-core machine takes ~10 s; leave room
STOP_GRACE_S = 10.0
BIN = Path(sys.executable).parent  # console scripts of the venv running pytest

# Loopback traffic must never go through a proxy a developer has configured; clients differ
# in which spelling they read, so set both.
_NO_PROXY_VALUE = ",".join(
    filter(None, [os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), HOST, "localhost"])
)
_NO_PROXY = {"NO_PROXY": _NO_PROXY_VALUE, "no_proxy": _NO_PROXY_VALUE}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A server did not start, or a helper process did not become ready."""


@dataclass
class ServerProcess:
    """One started process group, the file its output goes to, and the URL that says it is up."""

    name: str
    process: subprocess.Popen
    log_path: Path
    ready_url: str = ""
    launched_at: float = field(default_factory=time.monotonic)
    started_in_s: float | None = None  # launch to first answer; None until then
    stopped: bool = False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until ``ready_url`` answers (once; later calls return at once)."""
        if self.started_in_s is None:
            wait_until(self, lambda: answers(self.ready_url), f"answer {self.ready_url}", timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return redact("\n".join(text.splitlines()[-lines:]))

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the whole group, SIGKILL what is left after ``grace_s``."""
        if self.stopped:  # never signal a group id twice: it could belong to someone else by now
            return
        self.stopped = True
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Children can outlive the leader (uvicorn workers, flow-run subprocesses).
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def launch(
    name: str, argv: list[str], env: Mapping[str, str], log_path: Path,
    ready_url: str = "", cwd: Path | None = None,
) -> ServerProcess:
    """Start ``argv`` in its own session (so the group can be torn down), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, env={**os.environ, **env}, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return ServerProcess(name, process, log_path, ready_url)


def wait_until(server: ServerProcess, ready, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``ready()`` until it is true; fail early if the process dies, late at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.stop()
            raise ServerError(
                f"{server.name} exited with code {server.process.returncode} before it could "
                f"{what}; last lines of {server.log_path}:\n{server.log_tail()}"
            )
        if ready():
            server.started_in_s = time.monotonic() - server.launched_at
            return
        time.sleep(0.1)
    server.stop()
    raise ServerError(
        f"{server.name} did not {what} within {timeout_s:.0f} s; "
        f"last lines of {server.log_path}:\n{server.log_tail()}"
    )


def answers(url: str) -> bool:
    """True when ``url`` answers GET with a 2xx status."""
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, half-started
        return False


def run_env(*servers, inherit: bool = False) -> dict[str, str]:
    """The servers' environment variables merged; on top of ``os.environ`` when ``inherit``.

    ``inherit=True`` is what a subprocess needs as ``env=``; without it the dict holds only
    the servers' variables (for ``monkeypatch.setenv``). Two servers that disagree on a
    variable are a mistake in the test setup, so that raises instead of picking one.
    """
    merged: dict[str, str] = {}
    for server in servers:
        for key, value in server.env.items():
            if merged.get(key, value) != value:
                raise ValueError(f"servers disagree on environment variable {key}")
            merged[key] = value
    return {**os.environ, **merged} if inherit else merged


# --- S3 ----------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    storage_options: dict
    env: dict[str, str]
    process: ServerProcess = field(repr=False)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        if not fs.exists(self.bucket):
            fs.mkdir(self.bucket)


def launch_s3(workdir: Path, bucket: str = "palm-rlhf-test") -> S3Server:
    """Start moto's S3 server; ``process.wait_ready()`` then ``ensure_bucket()`` before use."""
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    process = launch(
        "moto_server", [str(BIN / "moto_server"), "-H", HOST, "-p", str(port)],
        _NO_PROXY, workdir / "moto.log", f"{endpoint}/moto-api/",
    )
    # botocore, aiobotocore (s3fs) and boto3 (MLflow) all honour AWS_ENDPOINT_URL,
    # so code under test needs no S3 settings beyond the standard variables.
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        **_NO_PROXY,
    }
    # No region here: s3fs sends a region as the bucket's LocationConstraint, and S3 rejects
    # "us-east-1" as one; with an explicit endpoint the client needs no region.
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    return S3Server(endpoint, bucket, options, env, process)


@pytest.fixture(scope="session")
def s3_server(request, tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server with one bucket (``.bucket``)."""
    server = _claim(request, "s3_server") or launch_s3(tmp_path_factory.mktemp("s3"))
    with _stopped_after(server):
        server.process.wait_ready()
        server.ensure_bucket()
        yield server


# --- MLflow --------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    tracking_uri: str
    artifacts_destination: str
    env: dict[str, str]
    process: ServerProcess = field(repr=False)


def launch_mlflow(workdir: Path, s3: S3Server) -> MlflowServer:
    """Tracking server on SQLite whose proxied artifacts land in ``s3://<bucket>/mlflow``.

    S3 need not answer yet: the server touches it only when artifacts move. One uvicorn
    worker: the default four double the start time on two cores and tests need no more.
    Job execution (huey consumers) is off: nothing here uses it.
    """
    port = free_port()
    uri = f"http://{HOST}:{port}"
    destination = s3.url("mlflow")
    argv = [
        str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", destination,
    ]
    quiet = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    server_env = {**s3.env, **quiet, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = launch("mlflow server", argv, server_env, workdir / "mlflow.log", f"{uri}/health")
    return MlflowServer(uri, destination, {**s3.env, **quiet, "MLFLOW_TRACKING_URI": uri}, process)


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory, s3_server) -> Iterator[MlflowServer]:
    """An MLflow tracking server; artifacts go through it into ``s3://<bucket>/mlflow``."""
    server = _claim(request, "mlflow_server") or launch_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server)
    with _stopped_after(server):
        server.process.wait_ready()
        yield server


# --- Prefect -------------------------------------------------------------------------------


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    env: dict[str, str]
    process: ServerProcess = field(repr=False)


def launch_prefect(workdir: Path, server_settings: Mapping[str, str] | None = None) -> PrefectServer:
    """A Prefect server with its own home and SQLite database; every service left on.

    ``server_settings`` reach only the server (e.g. a shorter scheduler loop).
    """
    port = free_port()
    api_url = f"http://{HOST}:{port}/api"
    home = workdir / "home"
    env = {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **_NO_PROXY,
    }
    server_env = {
        **env,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{workdir / 'prefect.db'}",
        # Together ~3 s of a ~9 s cold start: the UI bundle is copied into every fresh home,
        # and a block registers its own type when first saved, so none are needed up front.
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
        **(server_settings or {}),
    }
    argv = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    process = launch("prefect server", argv, server_env, workdir / "prefect.log", f"{api_url}/health")
    return PrefectServer(api_url, home, env, process)


@pytest.fixture(scope="session")
def prefect_server(request, tmp_path_factory) -> Iterator[PrefectServer]:
    """A Prefect server (scheduler and late-runs services on) isolated in its own home."""
    server = _claim(request, "prefect_server") or launch_prefect(tmp_path_factory.mktemp("prefect"))
    with _stopped_after(server):
        server.process.wait_ready()
        yield server


# --- Starting early -------------------------------------------------------------------------

_EARLY = pytest.StashKey[dict]()


@pytest.fixture(scope="session", autouse=True)
def servers_prestart(request, tmp_path_factory) -> Iterator[None]:
    """Launch every server this session's tests will ask for, all at once, without waiting.

    Each server spends seconds importing and migrating; started side by side (and while the
    first tests run) the session waits for the slowest instead of the sum: ~40% less on 2 cores.
    """
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    early: dict = {}
    if "s3_server" in wanted:
        early["s3_server"] = launch_s3(tmp_path_factory.mktemp("s3"))
    if "mlflow_server" in wanted:
        early["mlflow_server"] = launch_mlflow(tmp_path_factory.mktemp("mlflow"), early["s3_server"])
    if "prefect_server" in wanted:
        early["prefect_server"] = launch_prefect(tmp_path_factory.mktemp("prefect"))
    request.config.stash[_EARLY] = early
    yield
    for server in early.values():  # launched for tests that never ran (-x, -k after a failure)
        server.process.stop()


def _claim(request, name: str):
    return request.config.stash.get(_EARLY, {}).pop(name, None)


@contextmanager
def _stopped_after(server):
    try:
        yield
    finally:
        server.process.stop()


@contextmanager
def prefect_api(server: PrefectServer):
    """Point this process's Prefect client at ``server`` (env changes come too late for it)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_HOME: server.home}):
        try:
            yield
        finally:
            _drain_prefect_senders()


def _drain_prefect_senders() -> None:
    """Send queued logs and events now, while the server is still up.

    Otherwise they are flushed at interpreter exit, after the session's server has stopped,
    and each prints a connection error (prefect.testing.utilities drains for the same reason).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for result in (APILogWorker.drain_all(), EventsWorker.drain_all()):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


@dataclass
class Worker:
    name: str
    pool: str
    process: ServerProcess

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        self.process.stop(grace_s)


def start_worker(env: Mapping[str, str], pool: str, cwd: Path, log_path: Path, name: str | None = None) -> Worker:
    """Start ``prefect worker start --type process`` and wait until the server lists it.

    ``env`` is the worker's environment (``run_env(...)`` of the servers it needs); the work
    pool is created if missing. The worker polls every second so tests do not wait ten.
    """
    api_url = env.get("PREFECT_API_URL")
    if not api_url:
        raise ValueError("start_worker: env has no PREFECT_API_URL")
    name = name or f"{pool}-worker-{os.getpid()}"
    worker_env = {"PREFECT_WORKER_QUERY_SECONDS": "1", **env}
    argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    process = launch(f"prefect worker {name}", argv, worker_env, Path(log_path), cwd=Path(cwd))
    wait_until(process, lambda: name in listed_workers(api_url, pool), f"register in work pool {pool}")
    return Worker(name, pool, process)


def listed_workers(api_url: str, pool: str) -> set[str]:
    """Names of the workers the server lists in ``pool`` (empty while the pool does not exist)."""
    request = urllib.request.Request(
        f"{api_url}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with _DIRECT.open(request, timeout=5) as response:
            return {worker["name"] for worker in json.load(response)}
    except (OSError, http.client.HTTPException):
        return set()
