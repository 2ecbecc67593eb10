"""Concurrency: a full pipeline and two stage reruns started at the same moment, on one bucket and one tracking server.

One rerun is the pipeline's own pretraining stage (same config, same inputs: the same run key), the other a
different seed. Whoever holds a run key's lease trains it; the identical rerun waits and reuses that result, so there
is one set of checkpoints, one MLflow run and one model version for the run key. The different run keeps its own.
`candidate` ends on the newest version, and `champion` moves only if the pipeline's evaluation says its policy won,
which it says exactly when the champion gate's evidence (tasks/evaluation/promotion.py) says so.

So that the wait is certain rather than a matter of timing, the test holds the run key's lease itself until both
identical runs are seen waiting on it; then the one that gets it next trains, and the other waits on that one.
"""

from __future__ import annotations

import json
import os
import socket
import time
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import s3fs

from tasks.tracking import client as tracking
from tasks.tracking.registry import get_alias
from tasks.runtime.lease import LEASE_FILE, RunLease
from tasks.runtime.stage import CANDIDATE, CHAMPION, RUN_KEY_TAG
from tasks.storage.checkpoints import list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).parents[2]
# Pretraining long enough that the identical rerun arrives while the pipeline's pretraining still runs.
SETTINGS = ["pretrain.steps=20", "pretrain.checkpoint_every=10", "pretrain.eval_every=10", "pretrain.seed=4242",
            "reward.steps=2", "reward.checkpoint_every=2", "ppo.steps=2", "ppo.checkpoint_every=2",
            "eval.n_values=[1,2]"]
ARGS = ["--preset", "tiny", *(a for s in SETTINGS for a in ("--set", s))]
MODELS = {"pretrain": "palm-pretrained", "reward": "palm-reward", "ppo": "palm-policy"}


@pytest.fixture(scope="module")
def race(tmp_path_factory, s3_server, mlflow_server, prefect_server):
    root = tmp_path_factory.mktemp("race")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_", "AWS_"))}
    env.update({**prefect_server.env, **mlflow_server.env, "PYTHONPATH": str(ROOT), "PALM_RLHF_HOME": str(root),
                "PALM_RLHF_STORE": s3_server.url(f"race-{uuid.uuid4().hex[:8]}"),
                "OMP_NUM_THREADS": "1"})  # three processes on two cores: spinning thread pools would starve each other
    with pytest.MonkeyPatch.context() as here:  # this process reads the same registry and bucket
        for key, value in {**mlflow_server.env, "PALM_RLHF_STORE": env["PALM_RLHF_STORE"]}.items():
            here.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        champions_before = {name: get_alias(name, CHAMPION) for name in MODELS.values()}
        held = RunLease(pretrain_prefix(), "pretrain").__enter__()  # the test's own hold on the identical run key
        commands = {
            "pipeline": ["run", *ARGS],
            "same": ["stage", "pretrain", *ARGS],
            "other": ["stage", "pretrain", *ARGS, "--set", "pretrain.seed=4343"],
        }
        started = {name: subprocess.Popen([sys.executable, "-m", "flows.cli", *args, "--summary",
                                           str(root / f"{name}.json")], env=env, cwd=root, text=True,
                                          stdout=subprocess.DEVNULL, stderr=open(root / f"{name}.log", "w"))
                   for name, args in commands.items()}
        try:
            wait_for_waiters(root, started)
        finally:
            held.__exit__(None, None, None)
        for name, process in started.items():
            code = process.wait(timeout=500)
            assert code == 0, f"{name} exited with {code}:\n{(root / f'{name}.log').read_text()[-3000:]}"
        results = {name: json.loads((root / f"{name}.json").read_text()) for name in commands}
        logs = {name: (root / f"{name}.log").read_text() for name in commands}
        yield results, logs, champions_before, env["PALM_RLHF_STORE"]
    s3fs.S3FileSystem.clear_instance_cache()


def pretrain_prefix() -> str:
    """Where the pipeline's pretraining (and the identical rerun) keep their checkpoints and lease."""
    from tasks.config import apply_overrides, tiny
    from tasks.data.tokenizer import digest
    from tasks.pretrain import plan_corpus
    from tasks.runtime.stage import run_key, stage_prefix

    config = apply_overrides(tiny(), SETTINGS).pretrain
    _, corpus, tokenizer = plan_corpus(config)
    return stage_prefix("pretrain", run_key("pretrain", config, {"corpus": corpus, "tokenizer": digest(tokenizer)}))


def wait_for_waiters(root: Path, started: dict) -> None:
    deadline = time.monotonic() + 300
    while not all("waiting for it to finish" in (root / f"{name}.log").read_text() for name in ("pipeline", "same")):
        gone = [name for name, process in started.items() if name != "other" and process.poll() is not None]
        if gone or time.monotonic() > deadline:
            pytest.fail(f"{gone or 'both'} did not wait on the held lease:\n" +
                        "\n".join((root / f"{name}.log").read_text()[-2000:] for name in ("pipeline", "same")))
        time.sleep(0.5)


@pytest.mark.servers
def test_the_identical_rerun_waited_and_reused_the_pipelines_stage(race):
    results, logs, _, _ = race
    pipeline, same = results["pipeline"]["pretrain"], results["same"]["pretrain"]
    for field in ("checkpoint_uri", "digest", "model_version", "mlflow_run_id"):
        assert pipeline[field] == same[field], field
    assert sorted([pipeline["cached"], same["cached"]]) == [False, True], "exactly one of them trained"
    # Both waited on the test's hold; after it, the one that did not train waited for the one that did (or found its
    # result the moment it got the lease) and reused it.
    assert all("waiting for it to finish" in logs[name] for name in ("pipeline", "same"))
    assert "waiting for it to finish" not in logs["other"], "another run key never waits"

    client = tracking.get_client()
    key = client.get_model_version("palm-pretrained", pipeline["model_version"]).tags[RUN_KEY_TAG]
    assert len(client.search_runs([tracking.experiment_id()], f"tags.`{RUN_KEY_TAG}` = '{key}'")) == 1
    assert len(client.search_model_versions(f"tags.`{RUN_KEY_TAG}` = '{key}'")) == 1


@pytest.mark.servers
def test_every_run_keeps_its_own_complete_checkpoints(race, s3_server):
    results, _, _, store = race
    pipeline, other = results["pipeline"], results["other"]["pretrain"]
    assert other["checkpoint_uri"].rsplit("/", 1)[0] != pipeline["pretrain"]["checkpoint_uri"].rsplit("/", 1)[0]
    assert other["digest"] != pipeline["pretrain"]["digest"]
    assert other["model_version"] != pipeline["pretrain"]["model_version"]
    finals = [*(pipeline[stage] for stage in MODELS), other]
    for result in finals:
        prefix = result["checkpoint_uri"].rsplit("/", 1)[0]
        refs = list_checkpoints(prefix)
        assert [verify_checkpoint(r.uri).digest for r in refs][-1] == result["digest"], prefix
        tags = tracking.get_client().get_model_version(result["model_name"], result["model_version"]).tags
        assert tags["checkpoint_uri"] == result["checkpoint_uri"] and tags["checkpoint_digest"] == result["digest"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    assert not [k for k in fs.find(store.removeprefix("s3://")) if k.endswith("_lease.json")], "leases released"


@pytest.mark.servers
def test_candidate_is_the_newest_and_champion_moves_only_on_an_eval_win(race):
    results, _, champions_before, _ = race
    pipeline, other = results["pipeline"], results["other"]["pretrain"]
    newest = max(int(pipeline["pretrain"]["model_version"]), int(other["model_version"]))
    assert get_alias("palm-pretrained", CANDIDATE) == str(newest)
    metrics = pipeline["eval"]["metrics"]
    won = metrics["promoted"] == 1.0
    # the gate: no alarm, and a win rate whose 95% interval lies above one half against the pretrained policy (on
    # the oracle: the tiny preset's feedback is simulated) and against the champion when there is one
    beats = metrics["win_rate.ppo.ci_low"] > 0.5 and metrics["hacking_flag"] == 0.0
    if champions_before["palm-policy"] is not None:
        beats = beats and metrics["win_rate.ppo_vs_champion.ci_low"] > 0.5
    assert won == beats, metrics
    version = tracking.get_client().get_model_version("palm-policy", pipeline["ppo"]["model_version"])
    assert version.tags["promotion.decision"] == ("promoted" if won else "kept")
    for stage, name in MODELS.items():
        expected = pipeline[stage]["model_version"] if won else champions_before[name]
        assert get_alias(name, CHAMPION) == expected, name
    assert get_alias("palm-pretrained", CHAMPION) != other["model_version"], "a stage rerun never wins"


# ---------------------------------------------------------------- leases left behind


def _leave_lease(prefix: Path, **holder) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / LEASE_FILE).write_text(json.dumps({"owner": "someone", **holder}))
    return prefix / LEASE_FILE


def test_a_lease_left_by_a_killed_process_is_taken_over_at_once(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = _leave_lease(tmp_path / "run", host=socket.gethostname(), pid=int(gone.stdout),
                         expires_at=time.time() + 3600)
    with RunLease(str(tmp_path / "run"), "pretrain") as held:
        assert json.loads(lease.read_text())["owner"] == held.holder["owner"]
    assert not lease.exists(), "released"


def test_a_lease_of_another_host_is_taken_over_only_once_it_expires(tmp_path):
    from tasks.runtime.lease import _abandoned

    alive = {"owner": "someone", "host": "another-host", "pid": 1}
    assert not _abandoned({**alive, "expires_at": time.time() + 30})
    assert _abandoned({**alive, "expires_at": time.time() - 1})
    lease = _leave_lease(tmp_path / "run", **alive, expires_at=time.time() - 1)
    with RunLease(str(tmp_path / "run"), "pretrain") as held:
        assert json.loads(lease.read_text())["owner"] == held.holder["owner"]
