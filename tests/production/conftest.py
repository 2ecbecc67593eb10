"""The pipeline in its production shape: checkpoints in S3, an MLflow tracking server, a Prefect server.

Every program is the real one on loopback (tests/servers.py: moto's S3 server, `mlflow server` with proxied artifacts
in the same bucket, `prefect server start`). The CLI and the workers run as subprocesses with the environment a
production machine would have; this process reads the results back through the same servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.redact import redact
from tests.servers import PrefectServer, prefect_api, run_env

REPO = Path(__file__).resolve().parents[2]
MODELS = {"pretrain": "palm-pretrained", "reward": "palm-reward", "ppo": "palm-policy"}
STAGES = ("pretrain", "reward", "ppo", "eval")
# `tiny` in fewer steps, still two checkpoints per stage: for the runs beyond the first, which only need to be whole.
SHORT = ["pretrain.steps=6", "pretrain.checkpoint_every=3", "pretrain.eval_every=3", "reward.steps=4",
         "reward.checkpoint_every=2", "ppo.steps=2", "ppo.checkpoint_every=1", "eval.n_values=[1,4]"]


@dataclass
class Production:
    env: dict[str, str]  # what a subprocess gets: servers, store, credentials, a scratch home
    store: str  # s3://<bucket>/runs
    bucket: str
    prefect: PrefectServer
    tmp: Path
    secrets: tuple[str, ...]  # the AWS keys every subprocess holds; none may be written anywhere

    def cli(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=self.env, cwd=self.tmp, text=True,
                              capture_output=True, timeout=timeout_s)

    def start_cli(self, *args: str, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=self.env, cwd=self.tmp,
                                    stdout=out, stderr=subprocess.STDOUT)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the environment

    def api(self):
        """Point this process's Prefect client at the server (``with production.api(): ...``)."""
        return prefect_api(self.prefect)


@pytest.fixture(scope="package")
def production(s3_server, mlflow_server, prefect_server, tmp_path_factory):
    """The three servers, the store at s3://<bucket>/runs, and credentials of our own to look for in every record.

    The same variables are set in this process (for reading back), restored afterwards.
    """
    tmp = tmp_path_factory.mktemp("production")
    secrets = {"AWS_ACCESS_KEY_ID": "AKIA" + uuid.uuid4().hex[:16].upper(),
               "AWS_SECRET_ACCESS_KEY": "prod/" + uuid.uuid4().hex + uuid.uuid4().hex[:3]}
    store = s3_server.url("runs")
    own = {**run_env(s3_server, mlflow_server, prefect_server), **secrets, "PALM_RLHF_STORE": store,
           "PALM_RLHF_HOME": str(tmp / "home"), "PALM_RLHF_PROGRESS": "0"}
    env = {k: v for k, v in os.environ.items() if k not in ("PALM_RLHF_EXPERIMENT", "MLFLOW_REGISTRY_URI")}
    env.update(own, PYTHONPATH=str(REPO))
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PALM_RLHF_EXPERIMENT", "MLFLOW_REGISTRY_URI"):
            patch.delenv(key, raising=False)
        for key, value in own.items():
            patch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # one built under other settings would keep its endpoint
        yield Production(env, store, s3_server.bucket, prefect_server, tmp, tuple(secrets.values()))
        s3fs.S3FileSystem.clear_instance_cache()


def read_summary(path: Path, done: subprocess.CompletedProcess | None = None) -> dict:
    if done is not None:
        assert done.returncode == 0, redact(done.stderr[-4000:])
    return json.loads(path.read_text())


def wait_for(what: str, check, timeout_s: float, detail=lambda: "", every_s: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` at the deadline (a hang guard)."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s:.0f} s\n{detail()}")
        time.sleep(every_s)
    return value


def stage_checkpoints(production: Production, checkpoint_uri: str) -> list[str]:
    """Every step folder under a stage run's prefix in the bucket, complete or not, as s3:// URIs."""
    prefix = checkpoint_uri.rsplit("/", 1)[0].removeprefix("s3://")
    return sorted(f"s3://{p}" for p in production.fs().glob(f"{prefix}/step-*"))


def run_artifacts(client, run_id: str, path: str | None = None) -> list:
    """Every artifact file of an MLflow run (FileInfo), folders walked."""
    files = []
    for info in client.list_artifacts(run_id, path):
        files += run_artifacts(client, run_id, info.path) if info.is_dir else [info]
    return files
