"""A data store that fails: reads of a user's feedback file through a proxy that answers 503.

A burst longer than botocore's own retries is an outage, not bad data: the stage command retries it (each attempt
logged) and succeeds. A store that stays down fails the command with exit code 1 (an outage) after a bounded number
of attempts, never with exit code 2 (bad input).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import s3fs

from tests.reliability import workspace
from tests.reliability.faultproxy import FaultProxy

pytestmark = [pytest.mark.servers, pytest.mark.timeout(600)]

ROOT = Path(__file__).parents[2]
BURST = 5  # botocore's legacy retry mode makes 5 attempts: 5 answers of 503 in a row reach our own retry


@pytest.fixture(scope="module")
def feedback(s3_server) -> str:
    """A good ratings table in the bucket (several answers to each of 24 prompts)."""
    rows = [(f"prompt number {i}", f"answer {j} to {i}", 1 + (i + j) % 5) for i in range(24) for j in range(2)]
    key = f"{s3_server.bucket}/outage-{uuid.uuid4().hex[:8]}/feedback.csv"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    fs.pipe(key, pd.DataFrame(rows, columns=["prompt", "response", "rating"]).to_csv(index=False).encode())
    return f"s3://{key}"


def reward_stage(tmp_path: Path, pretrained: str, feedback: str, s3_server, prefect_server, proxy: FaultProxy):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_", "AWS_"))}
    env.update({**prefect_server.env, **s3_server.env, "AWS_ENDPOINT_URL": proxy.url,
                "PALM_RLHF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
    settings = ["reward.steps=2", "reward.checkpoint_every=2", f"reward.feedback={feedback}"]
    command = [sys.executable, "-m", "flows.cli", "stage", "reward", "--preset", "tiny", "--pretrained", pretrained,
               *(arg for setting in settings for arg in ("--set", setting)), "--summary", str(tmp_path / "out.json")]
    return subprocess.run(command, env=env, cwd=tmp_path, text=True, capture_output=True, timeout=500)


def test_a_feedback_read_that_fails_its_first_requests_is_retried_and_the_stage_succeeds(
        tmp_path_factory, tmp_path, feedback, s3_server, prefect_server):
    pretrained = workspace(tmp_path_factory).pretrained.checkpoint_uri
    key = feedback.removeprefix("s3://")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.burst(rf"^(HEAD|GET) /{key}$", BURST)
        done = reward_stage(tmp_path, pretrained, feedback, s3_server, prefect_server, proxy)
    assert done.returncode == 0, done.stderr[-3000:]
    assert proxy.counts["burst503"] == BURST
    assert "attempt 1 of 4 failed" in done.stderr and "trying again in 2 s" in done.stderr
    assert "the store did not answer" in done.stderr
    result = json.loads((tmp_path / "out.json").read_text())["reward"]
    assert result["checkpoint_uri"] and not result["cached"]


def test_a_feedback_store_that_stays_down_is_an_outage_not_bad_input(tmp_path_factory, tmp_path, feedback,
                                                                    s3_server, prefect_server):
    pretrained = workspace(tmp_path_factory).pretrained.checkpoint_uri
    with FaultProxy(s3_server.endpoint_url) as proxy:
        proxy.outage()
        done = reward_stage(tmp_path, pretrained, feedback, s3_server, prefect_server, proxy)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"palm-rlhf: error: cannot read {feedback}: the store did not answer (OSError: ")
    assert sum("failed (" in line for line in lines) == 4, "three retries, each logged, then the error"
    assert not (tmp_path / "home" / "store").exists(), "nothing computed or written"
