"""Data-parallel stages on two CPU processes (gloo): the trajectory of one process, resume after a kill, and a rank
that dies failing the stage with a clear error instead of a hang.

Each stage runs in its own Python process calling the stage's plain function, as a Prefect task would; the training
ranks are that process's children (tasks/distributed.py). Every home below runs one config, so run keys agree.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tasks.storage.checkpoints import latest_checkpoint

pytestmark = pytest.mark.timeout(900)  # two ranks share the cores with the other test worker

ROOT = Path(__file__).parents[2]
STEPS, EVERY = 48, 8
PRETRAIN = [f"pretrain.steps={STEPS}", f"pretrain.checkpoint_every={EVERY}", f"pretrain.eval_every={EVERY}"]
REWARD = ["reward.steps=8", "reward.checkpoint_every=4"]
TWO = ["pretrain.nproc_per_node=2", "reward.nproc_per_node=2"]

# Runs the named stages in order and prints one JSON result per stage. Reward fits on the pretrained model given as
# the third argument, else on the one this process just trained.
SCRIPT = """
import json, sys
from tasks.config import apply_overrides, tiny
from tasks import pretrain, reward

stages, settings, pretrained = sys.argv[1].split(","), json.loads(sys.argv[2]), sys.argv[3:]
config = apply_overrides(tiny(), settings)
for stage in stages:
    if stage == "pretrain":
        result = pretrain.run_pretrain(config.pretrain)
        pretrained = pretrained or [result.checkpoint_uri]
    else:
        result = reward.run_reward(config.reward, pretrained[0])
    print(json.dumps(result.model_dump()), flush=True)
"""


def start(home: Path, stages: str, settings: list[str], *inputs: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PALM_RLHF_STORE")}
    # One thread per process, so two ranks share the two cores without oversubscription.
    env.update(PALM_RLHF_HOME=str(home), PALM_RLHF_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, stages, json.dumps(settings), *inputs], env=env,
                            cwd=home.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(process: subprocess.Popen) -> list[dict]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.strip().splitlines()]


def run(home: Path, stages: str, settings: list[str], *inputs: str) -> list[dict]:
    return results(start(home, stages, settings, *inputs))


def weights(result: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(result["checkpoint_uri"].removeprefix("file://"), "weights.safetensors"))


def history(home: Path, run_id: str, metric: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> dict:
    """Pretraining, then reward fitting on it, in one process each."""
    home = tmp_path_factory.mktemp("one") / "home"
    pretrain, reward = run(home, "pretrain,reward", PRETRAIN + REWARD)
    return {"home": home, "pretrain": pretrain, "reward": reward}


@pytest.fixture(scope="module")
def two(tmp_path_factory, one) -> dict:
    """The same stages and inputs on two processes each (reward fits on the one-process pretrained model)."""
    home = tmp_path_factory.mktemp("two") / "home"
    pretrain, reward = run(home, "pretrain,reward", PRETRAIN + REWARD + TWO, one["pretrain"]["checkpoint_uri"])
    return {"home": home, "pretrain": pretrain, "reward": reward}


@pytest.mark.parametrize("stage", ["pretrain", "reward"])
def test_two_processes_follow_the_one_process_trajectory(stage, one, two):
    a, b = one[stage], two[stage]
    # Runtime settings are not part of the run key: either world size writes (and resumes) under one prefix.
    assert a["run_key"] == b["run_key"]
    curve_a = history(one["home"], a["mlflow_run_id"], "loss")
    curve_b = history(two["home"], b["mlflow_run_id"], "loss")
    assert [s for s, _ in curve_a] == [s for s, _ in curve_b] == list(range(1, len(curve_a) + 1))
    torch.testing.assert_close(torch.tensor([v for _, v in curve_b]), torch.tensor([v for _, v in curve_a]),
                               rtol=1e-4, atol=1e-5)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_machines_train_one_stage(tmp_path_factory, one):
    """Two machines on loopback (node_rank 0 and 1, one process each, one store and tracking database between them):
    node 0 owns the MLflow run and the registry, node 1 returns the same checkpoint, and the weights are one run's."""
    home = tmp_path_factory.mktemp("nodes") / "home"
    home.mkdir()
    # Machines would share a tracking server; two processes creating one SQLite schema at once would collide.
    MlflowClient(f"sqlite:///{home / 'mlflow.db'}").search_experiments()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = PRETRAIN + ["pretrain.nnodes=2", f"pretrain.rdzv_endpoint=127.0.0.1:{port}"]
    node0 = start(home, "pretrain", nodes + ["pretrain.node_rank=0"])
    node1 = start(home, "pretrain", nodes + ["pretrain.node_rank=1"])
    (first,), (second,) = results(node0), results(node1)
    assert (second["checkpoint_uri"], second["digest"]) == (first["checkpoint_uri"], first["digest"])
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert first["model_version"] is not None and second["model_version"] is None
    reference = weights(one["pretrain"])
    for name, tensor in weights(first).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def rank_pid(stage_pid: int, local_rank: int) -> int | None:
    """The pid of a training process: the stage process's spawned children, started in local-rank order."""
    workers = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            spawned = b"spawn_main" in (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == stage_pid and spawned:
            workers.append(int(proc.name))
    return sorted(workers)[local_rank] if len(workers) == 2 else None


def kill_rank_after_checkpoint(process: subprocess.Popen, home: Path, rank: int, step: int) -> None:
    """SIGKILL one training rank as soon as the stage has published its checkpoint at `step`."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        prefixes = list((home / "store" / "pretrain").glob(f"*/step-{step:08d}/manifest.json"))
        pid = rank_pid(process.pid, rank) if prefixes else None
        if pid:
            os.kill(pid, signal.SIGKILL)
            return
        if process.poll() is not None:
            pytest.fail(f"the stage ended before step {step}: {process.stderr.read()[-3000:]}")
        time.sleep(0.01)
    pytest.fail(f"no checkpoint at step {step} in time")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """Two-process pretraining whose rank 1 is SIGKILLed after the first checkpoint, then the same command again."""
    home = tmp_path_factory.mktemp("killed") / "home"
    process = start(home, "pretrain", PRETRAIN + TWO)
    kill_rank_after_checkpoint(process, home, rank=1, step=EVERY)
    began = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=120)  # ends on its own: nothing waits on the dead rank
    finally:
        process.kill()
    failed_after_s = time.monotonic() - began
    (prefix,) = (home / "store" / "pretrain").glob("*/")
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (failed_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {"home": home, "code": process.returncode, "stderr": stderr, "failed_after_s": failed_after_s,
            "failed_run": failed_run, "resumed_from": latest_checkpoint(str(prefix)).step,
            "result": run(home, "pretrain", PRETRAIN + TWO)[0]}


def test_a_dead_rank_fails_the_stage_with_an_error_naming_it(killed):
    print(f"the stage failed {killed['failed_after_s']:.1f} s after rank 1 was killed")
    assert killed["code"] == 1
    last_line = killed["stderr"].strip().splitlines()[-1]
    assert "rank 1 of 2 exited with signal SIGKILL" in last_line, killed["stderr"][-3000:]
    assert "rerun it to resume" in last_line
    failed = killed["failed_run"]
    assert failed.info.status == "FAILED"
    assert "rank 1 of 2 exited with signal SIGKILL" in failed.data.tags["error"]
    assert killed["result"]["mlflow_run_id"] == failed.info.run_id  # the rerun reopened it


def test_two_processes_resume_after_a_kill_to_the_uninterrupted_weights(killed, two):
    assert EVERY <= killed["resumed_from"] < STEPS, "the kill must land mid-run"
    result = killed["result"]
    assert not result["cached"] and result["run_key"] == two["pretrain"]["run_key"]
    assert result["digest"] == two["pretrain"]["digest"], "resumed weights differ from an uninterrupted run"
    # Resumed, not restarted: each step logged once, the early ones by the killed run, the rest after the resume.
    assert [s for s, _ in history(killed["home"], result["mlflow_run_id"], "loss")] == list(range(1, STEPS + 1))
