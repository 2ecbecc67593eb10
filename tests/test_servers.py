"""The loopback servers answer and do their real job: objects, runs, artifacts, flow runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.servers import (
    ServerError,
    launch,
    listed_workers,
    prefect_api,
    run_env,
    start_worker,
    wait_until,
)

pytest_plugins = ["tests.servers"]

pytestmark = pytest.mark.servers


def _s3fs(s3_server):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)


def test_s3_round_trips_an_object(s3_server):
    fs = _s3fs(s3_server)
    key = f"{s3_server.bucket}/round-trip/{uuid.uuid4().hex}.bin"
    fs.pipe(key, b"\x00palm\xff")
    assert fs.cat(key) == b"\x00palm\xff"


def test_s3_endpoint_comes_from_the_standard_env(s3_server, tmp_path):
    # A fresh process with only the AWS_* variables reaches moto through s3fs and boto3.
    script = textwrap.dedent(
        f"""
        import boto3, s3fs
        fs = s3fs.S3FileSystem()
        fs.pipe("{s3_server.bucket}/from-env.txt", b"hello")
        body = boto3.client("s3").get_object(Bucket="{s3_server.bucket}", Key="from-env.txt")["Body"].read()
        assert body == b"hello", body
        """
    )
    subprocess.run([sys.executable, "-c", script], env=run_env(s3_server, inherit=True), check=True, timeout=120)
    assert _s3fs(s3_server).cat(f"{s3_server.bucket}/from-env.txt") == b"hello"


def test_mlflow_run_keeps_metric_and_artifact_in_s3(mlflow_server, s3_server, monkeypatch, tmp_path):
    import mlflow

    for name, value in run_env(mlflow_server).items():
        monkeypatch.setenv(name, value)
    report = tmp_path / "report.txt"
    report.write_text("reward 0.5\n")
    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    # An explicit experiment: mlflow.set_experiment would leak into later tests.
    experiment_id = client.create_experiment(f"servers-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run(experiment_id=experiment_id) as run:  # tracking URI from the env
        mlflow.log_metric("reward", 0.5, step=3)
        mlflow.log_artifact(str(report))

    # Proxied: clients upload through the server and need no S3 credentials of their own.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert client.get_run(run.info.run_id).data.metrics == {"reward": 0.5}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.txt"]
    stored = _s3fs(s3_server).glob(f"{s3_server.bucket}/mlflow/**/{run.info.run_id}/artifacts/report.txt")
    assert len(stored) == 1
    assert _s3fs(s3_server).cat(stored[0]) == b"reward 0.5\n"


def test_prefect_records_a_completed_flow_run(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="servers-smoke")
    def add(a: int, b: int) -> int:
        return a + b

    with prefect_api(prefect_server):
        state = add(2, 3, return_state=True)
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == prefect_server.api_url
            recorded = client.read_flow_run(state.state_details.flow_run_id)
    assert state.result() == 5
    assert recorded.state.is_completed()


def test_worker_is_listed_and_runs_a_deployment(prefect_server, tmp_path):
    (tmp_path / "hello.py").write_text(
        "from prefect import flow\n\n@flow\ndef hello(name: str) -> str:\n    return f'hello {name}'\n"
    )
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    env = run_env(prefect_server, inherit=True)
    worker = start_worker(env, pool, cwd=tmp_path, log_path=tmp_path / "worker.log")
    try:
        assert worker.name in listed_workers(prefect_server.api_url, pool)
        from prefect import flow
        from prefect.deployments import run_deployment

        with prefect_api(prefect_server):
            deployment_id = flow.from_source(str(tmp_path), "hello.py:hello").deploy(
                name="smoke", work_pool_name=pool, print_next_steps=False
            )
            run = run_deployment(deployment_id, parameters={"name": "palm"}, timeout=120)
        assert run.state.is_completed(), worker.process.log_tail()
    finally:
        worker.stop()
    assert worker.process.process.poll() is not None


def test_a_server_that_dies_reports_its_log(tmp_path):
    script = "import sys; print('cannot bind: port taken'); sys.exit(3)"
    dying = launch("fake server", [sys.executable, "-c", script], {}, tmp_path / "fake.log")
    with pytest.raises(ServerError, match=r"(?s)fake server exited with code 3.*cannot bind: port taken"):
        wait_until(dying, lambda: False, "answer")


def test_a_server_that_never_answers_is_stopped_at_the_deadline(tmp_path):
    silent = launch("silent server", [sys.executable, "-c", "import time; time.sleep(600)"], {}, tmp_path / "s.log")
    with pytest.raises(ServerError, match=r"silent server did not answer .* within"):
        wait_until(silent, lambda: False, "answer http://127.0.0.1:9/health", timeout_s=0.5)
    assert silent.process.poll() is not None


def test_stop_ends_the_whole_process_group(tmp_path):
    # The leader starts a grandchild that ignores SIGTERM, as a stuck server worker would.
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    leader = launch("sleepy server", [sys.executable, "-c", script], {}, tmp_path / "sleepy.log")
    wait_until(leader, lambda: leader.log_path.read_text().strip().isdigit(), "print its child's pid")
    child_pid = int(leader.log_path.read_text())
    leader.stop(grace_s=1)
    assert leader.process.poll() is not None
    deadline = time.monotonic() + 30  # SIGKILL is delivered asynchronously
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie left for init to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
