"""A stage's compute task respects the Prefect concurrency limit of its device: with `prefect gcl create cpu --limit 1`
(`gpu` on a GPU machine, as the README shows), two stages started together on one Prefect server train one after the
other, the second waiting inside its running task; tasks are tagged with the device they use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import BIN, launch_prefect, prefect_api

pytestmark = [pytest.mark.servers, pytest.mark.timeout(600)]

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def own_prefect(tmp_path_factory):
    """A Prefect server of this module's own: a limit on `cpu` must not slow the session's other tests."""
    server = launch_prefect(tmp_path_factory.mktemp("prefect-slots"))
    try:
        server.process.wait_ready()
        yield server
    finally:
        server.process.stop()


@pytest.fixture(scope="module")
def two_stages(own_prefect, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_"))}
    env.update(own_prefect.env, PYTHONPATH=str(ROOT))
    done = subprocess.run([str(BIN / "prefect"), "gcl", "create", "cpu", "--limit", "1"], env=env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    roots, started = {}, {}
    for seed in (1, 2):
        roots[seed] = root = tmp_path_factory.mktemp(f"seed{seed}")
        command = [sys.executable, "-m", "flows.cli", "stage", "pretrain", "--preset", "tiny",
                   "--set", "pretrain.steps=400", "--set", "pretrain.checkpoint_every=200",
                   "--set", "pretrain.eval_every=200", "--set", f"pretrain.seed={seed}"]
        started[seed] = subprocess.Popen(command, env={**env, "PALM_RLHF_HOME": str(root / "home"),
                                                       "OMP_NUM_THREADS": "1"},
                                         cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "log", "w"))
    for seed, process in started.items():
        assert process.wait(timeout=500) == 0, (roots[seed] / "log").read_text()[-3000:]
    return roots


def mlflow_run(root: Path, monkeypatch):
    monkeypatch.setenv("PALM_RLHF_HOME", str(root / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks.tracking import client as tracking

    (run,) = tracking.get_client().search_runs([tracking.experiment_id()])
    return run.info


def test_stages_take_turns_on_the_device_limit(two_stages, own_prefect, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    runs = sorted((mlflow_run(root, monkeypatch) for root in two_stages.values()), key=lambda r: r.start_time)
    first, second = runs
    assert second.start_time >= first.end_time, "the second stage trained while the first held the only slot"
    with prefect_api(own_prefect), get_client(sync_client=True) as client:
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="pretrain-train")))
    assert len(tasks) == 2 and all(task.state.is_completed() for task in tasks)
    assert all("cpu" in task.tags for task in tasks)
    began = sorted(task.start_time.timestamp() * 1000 for task in tasks)
    assert began[1] < first.end_time, "the second task was running, waiting for the slot, while the first trained"
