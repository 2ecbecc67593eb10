"""Stopping the CLI: `palm-rlhf stage pretrain` with Prefect's temporary server (no PREFECT_API_URL), sent SIGTERM or
SIGKILL mid-stage, in one process or on two data-parallel ranks. Either way no process it started is left running, the MLflow run is marked KILLED and the Prefect
flow run Crashed, the last complete checkpoint is kept, and the same command run again resumes from it, with each
step's metrics logged once. SIGTERM exits with 143 and says how to resume.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.storage.checkpoints import latest_checkpoint

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).parents[2]
STEPS, EVERY, STOP_AFTER = 200, 50, 100
COMMAND = ["stage", "pretrain", "--preset", "tiny", "--set", f"pretrain.steps={STEPS}",
           "--set", f"pretrain.checkpoint_every={EVERY}", "--set", f"pretrain.eval_every={EVERY}"]


def environment(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_", "PREFECT_API"))}
    env.update(PALM_RLHF_HOME=str(root / "home"), PREFECT_HOME=str(root / "prefect"), PYTHONPATH=str(ROOT))
    return env


def cli(root: Path, log: str, ranks: int) -> subprocess.Popen:
    command = [*COMMAND, "--set", f"pretrain.nproc_per_node={ranks}", "--summary", str(root / "summary.json")]
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *command],
                            env=environment(root), cwd=root, stdout=subprocess.DEVNULL,
                            stderr=open(root / log, "w"))


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`: pid -> command line."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, pending = {}, list(children.get(pid, []))
    while pending:
        child = pending.pop()
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        pending += children.get(child, [])
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stage_prefix(root: Path) -> Path | None:
    found = list((root / "home" / "store" / "pretrain").glob("*/"))
    return found[0] if len(found) == 1 else None


@pytest.fixture(scope="module", params=["SIGTERM", "SIGKILL", "SIGTERM-2-ranks"])
def stopped(request, tmp_path_factory):
    """The command stopped with the signal once its checkpoint at step STOP_AFTER is published."""
    name, ranks = request.param.split("-")[0], 2 if "ranks" in request.param else 1
    signum = getattr(signal, name)
    root = tmp_path_factory.mktemp(request.param.lower())
    process = cli(root, "stopped.log", ranks)
    deadline = time.monotonic() + 300
    while not ((prefix := stage_prefix(root)) and (prefix / f"step-{STOP_AFTER:08d}" / "manifest.json").exists()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint at step {STOP_AFTER}: {(root / 'stopped.log').read_text()[-3000:]}")
        time.sleep(0.05)
    below = descendants(process.pid)
    process.send_signal(signum)
    code = process.wait(timeout=120)
    deadline = time.monotonic() + 60
    while [pid for pid in below if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: command for pid, command in below.items() if alive(pid)}
    for pid in left:  # never leave them to the next test
        os.kill(pid, signal.SIGKILL)
    return {"signal": name, "ranks": ranks, "root": root, "code": code, "below": below, "left": left,
            "log": (root / "stopped.log").read_text(), "prefix": prefix}


def test_no_process_outlives_the_command(stopped):
    commands = " ".join(stopped["below"].values())
    assert "uvicorn" in commands and "prefect.server" in commands, "the temporary server ran below the command"
    if stopped["ranks"] > 1:
        assert commands.count("multiprocessing.spawn") >= stopped["ranks"], "the ranks ran below the command"
    assert stopped["left"] == {}, f"left running after {stopped['signal']}: {stopped['left']}"


def test_the_exit_code_and_line_say_it_was_stopped(stopped):
    if stopped["signal"] == "SIGTERM":
        assert stopped["code"] == 143
        assert "palm-rlhf: stopped by SIGTERM; rerun the same command to resume from the last checkpoint" in \
            stopped["log"].splitlines()
    else:
        assert stopped["code"] == -signal.SIGKILL  # what the scheduler sees of the process it killed
    assert "Traceback" not in stopped["log"]


def test_the_runs_are_marked_and_the_checkpoints_kept(stopped):
    home = stopped["root"] / "home"
    with sqlite3.connect(home / "mlflow.db") as db:
        assert db.execute("select status from runs").fetchall() == [("KILLED",)]
    with sqlite3.connect(stopped["root"] / "prefect" / "prefect.db") as db:
        assert db.execute("select state_type from flow_run").fetchall() == [("CRASHED",)]
    kept = latest_checkpoint(str(stopped["prefix"]))
    assert STOP_AFTER <= kept.step < STEPS


@pytest.fixture(scope="module")
def resumed(stopped):
    root = stopped["root"]
    process = cli(root, "resumed.log", stopped["ranks"])
    code = process.wait(timeout=500)
    assert code == 0, (root / "resumed.log").read_text()[-3000:]
    return json.loads((root / "summary.json").read_text())["pretrain"]


def test_the_same_command_resumes_and_logs_each_step_once(stopped, resumed, monkeypatch):
    root = stopped["root"]
    monkeypatch.setenv("PALM_RLHF_HOME", str(root / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks.tracking import client as tracking

    assert not resumed["cached"] and resumed["checkpoint_uri"].endswith(f"step-{STEPS:08d}")
    client = tracking.get_client()
    (run,) = client.search_runs([tracking.experiment_id()])
    assert run.info.run_id == resumed["mlflow_run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, STEPS + 1))
