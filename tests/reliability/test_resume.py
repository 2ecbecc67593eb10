"""Kill a stage with SIGKILL as it starts writing a checkpoint, run the same command again: it resumes from the last
complete checkpoint (a torn one is skipped) and, on CPU, ends with weights bit-identical to a run that was never
interrupted, and with every step's metrics in MLflow exactly once, valued as in that run.

The kill comes when the metrics of every step up to the checkpoint being written have been computed: a design that
sends them before the checkpoint is published logs them twice.

Each stage runs in its own Python process calling `run_pretrain` / `run_reward` / `run_ppo`, as a Prefect task would.
An uninterrupted reference chain runs in another project home at the same time, in one process.
"""

from __future__ import annotations

import json
import math
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
# With KILL_WHILE_SAVING=<stage>:<step> the process SIGKILLs itself when that stage starts writing that checkpoint.
STAGE_SCRIPT = """
import json, os, signal, sys
from tasks.config import apply_overrides, tiny
from tasks import ppo, pretrain, reward
from tasks.runtime import loop

if os.environ.get("KILL_WHILE_SAVING"):
    victim, at = os.environ["KILL_WHILE_SAVING"].split(":")
    save = loop.save_checkpoint

    def save_or_die(prefix, step, *args, **kwargs):
        if f"/{victim}/" in prefix and step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return save(prefix, step, *args, **kwargs)

    loop.save_checkpoint = save_or_die

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


def start(stages: str, uris: dict, home: Path, kill: str | None = None) -> subprocess.Popen:
    env = {**stage_env(home), **({"KILL_WHILE_SAVING": kill} if kill else {})}
    return subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, stages, json.dumps(uris), json.dumps(SETTINGS)],
                            env=env, cwd=home.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Chain:
    """The uninterrupted reference: all three stages in one process; results are read as they arrive."""

    def __init__(self, home: Path):
        self.home = home
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


def killed(process: subprocess.Popen, stage: str) -> None:
    """Wait for the process to die of the SIGKILL it sent itself while writing a checkpoint of `stage`."""
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{stage} was not killed in time")
    if process.returncode != -signal.SIGKILL:
        pytest.fail(f"{stage} exited with code {process.returncode} instead of being killed: "
                    f"{process.stderr.read()[-3000:]}")


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
    kill_at = {"pretrain": 24, "reward": 18, "ppo": 9}  # the checkpoint being written when the kill comes
    runs, uris = {}, {}
    process = start("pretrain", uris, home, kill=f"pretrain:{kill_at['pretrain']}")
    for stage, then in (("pretrain", "reward"), ("reward", "ppo"), ("ppo", None)):
        killed(process, stage)
        folder = stage_folder(home, stage)
        runs[stage] = {"folder": folder, "resumed_from": tear_next_checkpoint(folder, stage)}
        assert runs[stage]["resumed_from"] == kill_at[stage] - EVERY[stage]
        began = time.monotonic()
        process = start(f"{stage},{then}" if then else stage, uris, home, kill=then and f"{then}:{kill_at[then]}")
        runs[stage]["result"] = result = read_result(process, stage)
        runs[stage]["seconds"] = time.monotonic() - began
        uris[stage] = result["checkpoint_uri"]
    process.wait()
    return {"home": home, **runs}


def metric_history(home: Path, run_id: str, monkeypatch) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as MLflow holds it: key -> (step, value) entries, by step."""
    from tasks.tracking import client as tracking
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PALM_RLHF_HOME", str(home))
    client = tracking.get_client()
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


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


@pytest.mark.parametrize("stage", ["pretrain", "reward", "ppo"])
def test_every_step_is_logged_exactly_once_with_the_values_of_an_uninterrupted_run(stage, interrupted, reference,
                                                                                  monkeypatch):
    """The kill landed after the metrics of the steps since the last checkpoint were computed (and, before this
    design, sent): the resumed run's MLflow history still holds each step once, valued as if never interrupted."""
    got = metric_history(interrupted["home"], interrupted[stage]["result"]["mlflow_run_id"], monkeypatch)
    want = metric_history(reference.home, reference.result(stage)["mlflow_run_id"], monkeypatch)
    assert set(got) == set(want)
    assert "reward" in got if stage == "ppo" else "loss" in got
    for key in want:
        steps = [step for step, _ in got[key]]
        assert len(steps) == len(set(steps)), f"{key}: steps logged twice: {sorted(steps)}"
        assert steps == [step for step, _ in want[key]], key
        if key.endswith("_per_s"):  # throughput: a measurement of the machine, not of the run
            continue
        for (step, value), (_, expected) in zip(got[key], want[key]):
            assert same(value, expected), f"{key} at step {step}: {value} here, {expected} uninterrupted"
