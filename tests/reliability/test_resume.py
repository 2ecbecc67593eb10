"""Kill a stage with SIGKILL between checkpoints, run the same command again: it resumes from the last complete
checkpoint (a torn one is skipped) and, on CPU, ends with weights bit-identical to a run that was never interrupted.

Each stage runs in its own Python process calling `run_pretrain` / `run_reward` / `run_ppo`, as a Prefect task would.
An uninterrupted reference chain runs in another project home at the same time, in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.storage.checkpoints import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).parents[2]
# Steps enough that a kill lands mid-run even on a fast machine, a checkpoint every few steps, and an adaptive KL
# coefficient so that the PPO controller's state matters.
SETTINGS = ["pretrain.steps=64", "pretrain.checkpoint_every=8", "pretrain.eval_every=8",
            "reward.steps=24", "reward.checkpoint_every=6",
            "ppo.steps=12", "ppo.checkpoint_every=3", "ppo.adaptive_kl=true", "ppo.kl_target=0.01"]
STEPS = {"pretrain": 64, "reward": 24, "ppo": 12}
EVERY = {"pretrain": 8, "reward": 6, "ppo": 3}

# Runs the named stages in order, each fed the checkpoints of the ones before it (or the URIs given), and prints
# one JSON result per stage as soon as it finishes.
STAGE_SCRIPT = """
import json, sys
from tasks.config import apply_overrides, tiny
from tasks import ppo, pretrain, reward

stages, uris, settings = sys.argv[1].split(","), json.loads(sys.argv[2]), json.loads(sys.argv[3])
config = apply_overrides(tiny(), settings)
for stage in stages:
    if stage == "pretrain":
        result = pretrain.run_pretrain(config.pretrain)
    elif stage == "reward":
        result = reward.run_reward(config.reward, uris["pretrain"])
    else:
        result = ppo.run_ppo(config.ppo, uris["pretrain"], uris["reward"])
    uris[stage] = result.checkpoint_uri
    print(json.dumps({"stage": stage, **result.model_dump()}), flush=True)
"""


def stage_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_STORE", "PALM_RLHF_EXPERIMENT")}
    # One thread per process: two stages run side by side on two cores, and every run uses the same kernels.
    return {**env, "PALM_RLHF_HOME": str(home), "PALM_RLHF_PROGRESS": "0", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start(stages: str, uris: dict, home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, stages, json.dumps(uris), json.dumps(SETTINGS)],
                            env=stage_env(home), cwd=home.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


class Chain:
    """The uninterrupted reference: all three stages in one process; results are read as they arrive."""

    def __init__(self, home: Path):
        self.process, self.results = start("pretrain,reward,ppo", {}, home), {}

    def result(self, stage: str) -> dict:
        while stage not in self.results:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait()
                pytest.fail(f"the reference chain stopped before {stage}: {self.process.stderr.read()[-3000:]}")
            found = json.loads(line)
            self.results[found["stage"]] = found
        return self.results[stage]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    chain = Chain(tmp_path_factory.mktemp("uninterrupted") / "home")
    yield chain
    if chain.process.poll() is None:
        chain.process.kill()
    chain.process.wait()


def stage_folder(home: Path, stage: str) -> Path | None:
    """The run-key folder of the stage in this home (each home runs one config per stage)."""
    found = sorted((home / "store" / stage).glob("*/"))
    return found[0] if len(found) == 1 else None


def read_result(process: subprocess.Popen, stage: str) -> dict:
    line = process.stdout.readline()
    if not line:
        process.wait()
        pytest.fail(f"{stage} failed (code {process.returncode}): {process.stderr.read()[-3000:]}")
    return json.loads(line)


def kill_after_checkpoint(process: subprocess.Popen, home: Path, stage: str, step: int, then_s: float) -> None:
    """SIGKILL the process `then_s` seconds after the stage published its checkpoint at `step`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        folder = stage_folder(home, stage)
        if folder is not None and (folder / f"step-{step:08d}" / "manifest.json").exists():
            break
        if process.poll() is not None:
            pytest.fail(f"{stage} exited (code {process.returncode}) before step {step}: "
                        f"{process.stderr.read()[-3000:]}")
        time.sleep(0.01)
    else:
        pytest.fail(f"{stage} wrote no checkpoint at step {step} in time")
    time.sleep(then_s)
    assert process.poll() is None, f"{stage} finished before it could be killed: give it more steps"
    process.send_signal(signal.SIGKILL)
    process.wait()


def tear_next_checkpoint(folder: Path, stage: str) -> int:
    """Leave what a kill in the middle of writing the next checkpoint leaves: some files, no manifest."""
    last = latest_checkpoint(str(folder))
    torn = folder / f"step-{last.step + EVERY[stage]:08d}"
    torn.mkdir(exist_ok=True)
    weights = (Path(last.uri.removeprefix("file://")) / "weights.safetensors").read_bytes()
    (torn / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    (torn / ".manifest.json.0123abcd").write_text('{"format_version": 1, "kind"')
    return last.step


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, reference) -> dict:
    """Each stage killed once mid-run, a torn checkpoint left behind, then the same command run again.

    Asks for `reference` only to start it first: the two chains run side by side. To save interpreter starts, the
    process that resumes one stage goes on to the next, which is killed in turn. Returns per stage: the resumed
    result, the step it resumed from, and its checkpoint folder.
    """
    home = tmp_path_factory.mktemp("interrupted") / "home"
    kill_at = {"pretrain": 16, "reward": 12, "ppo": 6}
    runs, uris, resumed = {}, {}, None
    for stage, then in (("pretrain", "reward"), ("reward", "ppo"), ("ppo", None)):
        process = resumed or start(stage, uris, home)
        kill_after_checkpoint(process, home, stage, kill_at[stage], then_s=0.05)
        folder = stage_folder(home, stage)
        runs[stage] = {"folder": folder, "resumed_from": tear_next_checkpoint(folder, stage)}
        began = time.monotonic()
        resumed = start(f"{stage},{then}" if then else stage, uris, home)
        runs[stage]["result"] = result = read_result(resumed, stage)
        runs[stage]["seconds"] = time.monotonic() - began
        uris[stage] = result["checkpoint_uri"]
    resumed.wait()
    return {"home": home, **runs}


def logged_steps(home: Path, run_id: str, metric: str, monkeypatch) -> list[int]:
    from tasks.tracking import client as tracking
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PALM_RLHF_HOME", str(home))
    return sorted((m.step, m.value) for m in tracking.get_client().get_metric_history(run_id, metric))


@pytest.mark.parametrize("stage", ["pretrain", "reward", "ppo"])
def test_a_killed_stage_resumes_to_bit_identical_weights(stage, interrupted, reference, monkeypatch):
    run = interrupted[stage]
    print(f"{stage}: resumed from step {run['resumed_from']} to {STEPS[stage]} in {run['seconds']:.1f} s")
    assert 0 < run["resumed_from"] < STEPS[stage]
    result = run["result"]
    assert not result["cached"]
    assert result["digest"] == reference.result(stage)["digest"], "resumed weights differ from an uninterrupted run"
    # The torn folder was skipped, then rewritten whole when training reached its step again.
    steps = [c.step for c in list_checkpoints(str(run["folder"]))]
    assert steps == list(range(EVERY[stage], STEPS[stage] + 1, EVERY[stage]))
    # Resumed, not restarted: the steps up to the checkpoint it resumed from are in the run's history once (a restart
    # would log them twice). Steps after it may appear twice when the kill landed after their metrics were sent but
    # before their checkpoint was published; the replay is deterministic, so both entries carry the same value.
    metric = "reward" if stage == "ppo" else "loss"
    history = logged_steps(interrupted["home"], result["mlflow_run_id"], metric, monkeypatch)
    steps = [step for step, _ in history]
    assert sorted(set(steps)) == list(range(1, STEPS[stage] + 1))
    assert all(steps.count(step) == 1 for step in range(1, run["resumed_from"] + 1))
    values = {}
    for step, value in history:
        assert values.setdefault(step, value) == value, f"step {step} logged with two different values"
