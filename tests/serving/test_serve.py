"""`mlflow models serve` on a registered policy: the real scoring server answers prompts, best-of-n included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.servers import HOST, free_port

pytestmark = pytest.mark.timeout(600)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    from tasks.tracking.client import tracking_uri

    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    # the server execs `uvicorn` from PATH, as it finds it in an activated virtual environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_PROXY": HOST, "no_proxy": HOST}
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/palm-policy@candidate",
                                    "--env-manager", "local", "-h", HOST, "-p", str(port)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _ok(f"{url}/ping"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)  # the server's workers are in its process group
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _ok(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def invoke(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_the_scoring_server_answers_like_the_loaded_model(served, registry):
    import mlflow

    prompts = ["The function", "A module is"]
    status, answer = invoke(served, {"inputs": prompts, "params": {"max_new_tokens": 6, "seed": 9}})
    expected = mlflow.pyfunc.load_model("models:/palm-policy@candidate").predict(
        prompts, params={"max_new_tokens": 6, "seed": 9})
    assert status == 200 and answer["predictions"] == expected


def test_the_scoring_server_does_best_of_n_and_returns_scores(served):
    status, answer = invoke(served, {"dataframe_records": [{"prompt": "The function"}, {"prompt": "When"}],
                                     "params": {"num_samples": 8, "return_scores": True, "max_new_tokens": 6}})
    assert status == 200 and len(answer["predictions"]) == 2
    assert all(set(row) == {"completion", "score"} and 1 <= row["score"] <= 5 for row in answer["predictions"])


def test_the_scoring_server_refuses_a_bad_request_with_its_reason(served):
    status, answer = invoke(served, {"inputs": ["x"], "params": {"num_samples": 500}})
    assert status == 400 and "num_samples must be between 1 and 64, got 500" in answer.get("message", "")
