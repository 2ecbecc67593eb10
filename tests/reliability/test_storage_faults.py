"""Storage faults: the pipeline's S3 traffic goes through a proxy that fails, drops and delays requests.

The `tiny` pipeline still completes (botocore retries single faults; a burst that outlasts them fails the stage's
task, and Prefect's task retry resumes it from the last checkpoint), and a reader watching the bucket the whole time
never sees a checkpoint whose files do not match its manifest. When the store goes down for good, a stage fails with
one clear error, its MLflow run is marked FAILED, nothing is registered, and only complete checkpoints are left.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import s3fs

from tasks.storage.checkpoints import list_checkpoints, verify_checkpoint
from tasks.storage.store import CheckpointError
from tests.reliability.faultproxy import FaultPlan, FaultProxy
from tests.servers import prefect_api

pytestmark = [pytest.mark.servers, pytest.mark.timeout(600)]

ROOT = Path(__file__).parents[2]
FAST = ["--preset", "tiny", "--set", "pretrain.steps=6", "--set", "pretrain.checkpoint_every=3",
        "--set", "pretrain.eval_every=3", "--set", "reward.steps=4", "--set", "reward.checkpoint_every=2",
        "--set", "ppo.steps=2", "--set", "ppo.checkpoint_every=1", "--set", "eval.n_values=[1,2]"]
# Single faults that botocore's own retries absorb, bounded so the run's length is too.
PLAN = FaultPlan(error_rate=0.05, drop_rate=0.04, delay_rate=0.1, max_delay_s=0.2, max_faults=16, seed=11)
BURST = 5  # botocore's legacy retry mode makes 5 attempts: 5 answers of 503 in a row reach the Prefect task retry


@pytest.fixture(scope="module", autouse=True)
def direct_s3(s3_server):
    """This process reads the bucket straight from the server, never through a proxy."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env.items():
            patch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # one built before these settings keeps its old endpoint
        yield
    s3fs.S3FileSystem.clear_instance_cache()


class BucketWatcher:
    """Polls the bucket straight from the server (never through the proxy, nor the store code under test) and checks
    every checkpoint the moment its manifest appears: each listed file present, of the listed size and sha256.
    Counts the folders it caught half-written (files, no manifest yet): what a reader must never take for a
    checkpoint."""

    def __init__(self, s3_server, prefix: str):
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
        self.root = f"{s3_server.bucket}/{prefix}"
        self.verified: set[str] = set()
        self.torn_seen: set[str] = set()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "BucketWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.scan()  # and once more after the last write

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.scan()

    def scan(self) -> None:
        self.fs.invalidate_cache()
        keys = set(self.fs.find(self.root))
        folders = {k.rsplit("/", 1)[0] for k in keys if "/step-" in k}
        for folder in sorted(folders - self.verified):
            if f"{folder}/manifest.json" not in keys:
                self.torn_seen.add(folder)
            elif problem := self._check(folder):
                self.failures.append(f"{folder}: {problem}")
            else:
                self.verified.add(folder)

    def _check(self, folder: str) -> str | None:
        manifest = json.loads(self.fs.cat_file(f"{folder}/manifest.json"))
        for name, entry in manifest["files"].items():
            try:
                data = self.fs.cat_file(f"{folder}/{name}")
            except FileNotFoundError:
                return f"{name} missing"
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return f"{name} does not match the manifest"
        return None


class FaultyPipeline:
    """The pipeline in a subprocess, its S3 traffic through the proxy, watched from here; started when the module
    starts, so the in-process tests below run while it does."""

    def __init__(self, root: Path, s3_server, prefect_server):
        prefix = f"faults-{uuid.uuid4().hex[:8]}"
        self.root, self.proxy = root, FaultProxy(s3_server.endpoint_url, PLAN)
        self.proxy.burst(r"^PUT .*/ppo/[0-9a-f]+/step-00000002/manifest\.json$", BURST)
        self.watcher = BucketWatcher(s3_server, prefix).start()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_", "AWS_"))}
        env = {**base, **prefect_server.env, **s3_server.env, "AWS_ENDPOINT_URL": self.proxy.url,
               "PALM_RLHF_STORE": s3_server.url(prefix), "PALM_RLHF_HOME": str(root / "home"), "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", *FAST, "--summary", str(root / "summary.json")], env=env,
            cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "cli.log", "w"))
        self.summary: dict | None = None

    def result(self) -> tuple[dict, FaultProxy, BucketWatcher]:
        if self.summary is None:
            code = self.process.wait(timeout=500)
            self.watcher.stop()
            print(f"\nfault proxy: {dict(self.proxy.counts)}; watcher verified {len(self.watcher.verified)} "
                  f"checkpoints, caught {len(self.watcher.torn_seen)} half-written")
            assert code == 0, (self.root / "cli.log").read_text()[-4000:]
            self.summary = json.loads((self.root / "summary.json").read_text())
        return self.summary, self.proxy, self.watcher

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.watcher._stop.set()
        self.proxy.close()


@pytest.fixture(scope="module", autouse=True)
def faulty_pipeline(tmp_path_factory, s3_server, prefect_server):
    pipeline = FaultyPipeline(tmp_path_factory.mktemp("faults"), s3_server, prefect_server)
    yield pipeline
    pipeline.close()


@pytest.fixture
def faulty_run(faulty_pipeline):
    return faulty_pipeline.result()


# ---------------------------------------------------------------- the store goes down for good


@pytest.fixture
def down_store(monkeypatch, s3_server, mlflow_server):
    """A stage in this process whose S3 traffic goes through a proxy the test can take down; MLflow stays up."""
    prefix = f"down-{uuid.uuid4().hex[:8]}"
    with FaultProxy(s3_server.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
        monkeypatch.setenv("PALM_RLHF_STORE", s3_server.url(prefix))
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy, s3_server.url(prefix)
    s3fs.S3FileSystem.clear_instance_cache()


def fast_pretrain_config():
    from tasks.config import apply_overrides, tiny

    return apply_overrides(tiny(), ["pretrain.steps=6", "pretrain.checkpoint_every=3",
                                    "pretrain.eval_every=3"]).pretrain


def stage_runs(store: str) -> list:
    from tasks.tracking import client as tracking
    return tracking.get_client().search_runs(
        [tracking.experiment_id()], filter_string=f"tags.checkpoint_prefix LIKE '{store}/%'")


def test_store_down_at_start_fails_before_tracking_or_compute(down_store, s3_server):
    from tasks.pretrain import run_pretrain

    proxy, store = down_store
    proxy.outage()
    with pytest.raises(CheckpointError, match=r"checkpoint s3://\S+: cannot reach the store \(OSError: \[Errno 16\]"):
        run_pretrain(fast_pretrain_config())
    assert stage_runs(store) == []
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    assert not fs.exists(store.removeprefix("s3://"))


def test_store_down_mid_stage_leaves_only_complete_checkpoints_and_a_rerun_resumes(down_store, s3_server):
    from tasks.tracking import client as tracking
    from tasks.pretrain import run_pretrain
    from tasks.runtime.stage import RUN_KEY_TAG

    proxy, store = down_store
    config = fast_pretrain_config()
    proxy.outage(after=r"^PUT .*/step-00000003/manifest\.json$")  # step 3 is published, then the store is gone
    with pytest.raises(CheckpointError, match=r"step-00000006: cannot .* \(OSError: \[Errno 16\]") as failed:
        run_pretrain(config)
    assert "Traceback" not in str(failed.value) and "\n" not in str(failed.value)

    (run,) = stage_runs(store)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("StorageError: ")
    key = run.data.tags[RUN_KEY_TAG]
    assert not tracking.get_client().search_model_versions(f"tags.`{RUN_KEY_TAG}` = '{key}'")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    prefix = f"{store.removeprefix('s3://')}/pretrain/{key}"
    assert fs.glob(f"{prefix}/*/manifest.json") == [f"{prefix}/step-00000003/manifest.json"]
    with pytest.MonkeyPatch.context() as direct:  # read the survivors straight from the server
        direct.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
        s3fs.S3FileSystem.clear_instance_cache()
        assert verify_checkpoint(f"s3://{prefix}/step-00000003").step == 3
    s3fs.S3FileSystem.clear_instance_cache()

    proxy.restore()
    seen = len(proxy.log)
    result = run_pretrain(config)
    after = proxy.log[seen:]
    assert result.mlflow_run_id == run.info.run_id and not result.cached
    assert result.checkpoint_uri == f"s3://{prefix}/step-00000006"
    assert f"GET /{prefix}/step-00000003/state.json" in after  # resumed from step 3 ...
    assert not any(r.startswith(f"PUT /{prefix}/step-00000003/") for r in after)  # ... and left it alone
    assert tracking.get_client().get_run(run.info.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- the pipeline through the fault proxy


def test_pipeline_completes_through_injected_faults(faulty_run):
    summary, proxy, _ = faulty_run
    assert set(summary) == {"pretrain", "reward", "ppo", "eval"}
    assert proxy.counts["burst503"] == BURST
    random_faults = sum(proxy.counts[k] for k in ("error500", "error503", "drop_before", "drop_after"))
    assert random_faults >= 10, proxy.counts  # the run really went through trouble
    for stage in ("pretrain", "reward", "ppo"):
        assert verify_checkpoint(summary[stage]["checkpoint_uri"]).digest == summary[stage]["digest"]


def test_a_burst_beyond_client_retries_is_resumed_by_the_task_retry(faulty_run, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    summary, proxy, _ = faulty_run
    with prefect_api(prefect_server), get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="ppo-train")))
    mine = [r for r in runs if r.state and r.state.is_completed() and r.run_count > 1]
    assert mine, "the PPO task should have needed a second attempt"
    # Resumed, not restarted: the second attempt read the trainer state of the step-1 checkpoint back.
    prefix = summary["ppo"]["checkpoint_uri"].rsplit("/", 1)[0].removeprefix("s3:/")
    assert f"GET {prefix}/step-00000001/state.json" in proxy.log
    assert [ref.step for ref in list_checkpoints(summary["ppo"]["checkpoint_uri"].rsplit("/", 1)[0])] == [1, 2]


def test_no_reader_ever_sees_a_partial_checkpoint(faulty_run):
    summary, _, watcher = faulty_run
    assert watcher.failures == []
    finals = {summary[s]["checkpoint_uri"].removeprefix("s3://") for s in ("pretrain", "reward", "ppo")}
    assert finals <= watcher.verified
