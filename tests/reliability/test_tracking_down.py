"""Tracking down: an MLflow server that is unreachable when a stage starts stops it at once, with one clear line and
nothing computed or written; one that goes away mid-stage costs no training and no checkpoint, and the same command
run again once it is back resumes and completes the stage's run.

The mid-stage case uses its own MLflow server (it is killed and restarted on the same database); the session's
servers are never touched.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.runtime import loop
from tasks.storage.checkpoints import list_checkpoints, verify_checkpoint
from tasks.tracking import client as tracking
from tests.servers import free_port, launch_mlflow

pytestmark = [pytest.mark.servers, pytest.mark.timeout(600)]

ROOT = Path(__file__).parents[2]
FAST = ["pretrain.steps=6", "pretrain.checkpoint_every=3", "pretrain.eval_every=3"]


UNREACHABLE = {
    "pretrain": ["stage", "pretrain"],
    # registry inputs are resolved before the stage starts: without a quick probe MLflow's own retries take minutes
    "ppo-from-registry": ["stage", "ppo", "--pretrained", "models:/palm-pretrained@champion",
                          "--reward-model", "models:/palm-reward@champion"],
}


@pytest.fixture(scope="module", autouse=True)
def unreachable_runs(tmp_path_factory, prefect_server):
    """Each command in its own project, its MLflow address a port nobody listens on; started when the module starts,
    so they run while the in-process test below does."""
    started = {}
    for name, args in UNREACHABLE.items():
        root = tmp_path_factory.mktemp(name)
        uri = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_"))}
        env.update({**prefect_server.env, "MLFLOW_TRACKING_URI": uri, "PALM_RLHF_HOME": str(root / "home"),
                    "PALM_RLHF_STORE": str(root / "store"), "PYTHONPATH": str(ROOT)})
        settings = [arg for setting in FAST for arg in ("--set", setting)]
        command = [sys.executable, "-m", "flows.cli", *args, "--preset", "tiny", *settings]
        started[name] = (subprocess.Popen(command, env=env, cwd=root, text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE), uri, root)
    yield started
    for process, _, _ in started.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


# ---------------------------------------------------------------- MLflow goes away mid-stage


class OwnTracking:
    """A tracking server of this module's own (artifacts in a bucket of their own), killable and restartable on
    the same database. Launched when the module starts, so that it boots while the tests before it run."""

    def __init__(self, workdir: Path, s3_server):
        self.workdir, self.s3 = workdir, dataclasses.replace(s3_server, bucket="tracking-down")
        self.servers = [launch_mlflow(workdir, self.s3)]

    @property
    def server(self):
        return self.servers[-1]

    def restart(self) -> None:
        """Kill the server outright (SIGKILL, no goodbye) and boot a new one on its database, at a new address."""
        self.server.process.stop(grace_s=0)
        self.servers.append(launch_mlflow(self.workdir, self.s3))

    def use(self, monkeypatch) -> None:
        self.server.process.wait_ready()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.server.tracking_uri)


@pytest.fixture(scope="module", autouse=True)
def own_tracking(tmp_path_factory, s3_server):
    tracking_server = OwnTracking(tmp_path_factory.mktemp("own-mlflow"), s3_server)
    yield tracking_server
    for server in tracking_server.servers:
        server.process.stop()


def test_mlflow_lost_mid_stage_keeps_training_and_a_rerun_completes_the_run(own_tracking, tmp_path, monkeypatch):
    import tasks.pretrain as pretrain
    from tasks.config import apply_overrides, tiny

    own_tracking.s3.ensure_bucket()
    # One quick retry instead of MLflow's default seven (~4 minutes of backoff per call) once the server is gone.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("PALM_RLHF_STORE", str(tmp_path / "store"))
    own_tracking.use(monkeypatch)
    config = apply_overrides(tiny(), FAST).pretrain
    saved = []
    original = loop.save_checkpoint  # the one training loop writes every stage's checkpoints

    def save_then_lose_tracking(*args, **kwargs):
        ref = original(*args, **kwargs)
        saved.append(ref.step)
        if ref.step == 3:
            own_tracking.restart()  # the server dies between two checkpoints; its successor boots meanwhile
        return ref

    monkeypatch.setattr(loop, "save_checkpoint", save_then_lose_tracking)
    with pytest.raises(tracking.TrackingError) as lost:
        pretrain.run_pretrain(config)
    message = str(lost.value)
    assert "went away mid-stage" in message and "latest: step 6" in message and "rerun" in message
    assert saved == [3, 6], "training went on to the end without tracking"
    (run_prefix,) = (tmp_path / "store" / "pretrain").iterdir()
    assert [verify_checkpoint(r.uri).step for r in list_checkpoints(str(run_prefix))] == [3, 6]

    own_tracking.use(monkeypatch)  # back, on the same database, at a new address
    saved.clear()
    result = pretrain.run_pretrain(config)
    assert saved == [], "the rerun resumed from the final checkpoint instead of training again"
    assert result.checkpoint_uri.endswith("step-00000006") and not result.cached
    client = tracking.get_client()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the rerun reopened the interrupted run"
    assert client.get_model_version("palm-pretrained", result.model_version).tags["checkpoint_digest"] == \
        result.digest
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")][:3] == [1, 2, 3]


# ---------------------------------------------------------------- unreachable from the start (run meanwhile)


@pytest.mark.parametrize("name", UNREACHABLE)
def test_unreachable_tracking_fails_at_start_with_one_line(unreachable_runs, name):
    process, uri, root = unreachable_runs[name]
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]  # an outage, not bad input
    assert stderr.strip().splitlines() == [f"palm-rlhf: error: MLflow tracking at {uri} is unreachable (connection "
                                           "refused); start the server or fix MLFLOW_TRACKING_URI"]
    assert not (root / "store").exists(), "nothing may be computed or written before tracking answers"
