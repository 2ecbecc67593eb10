"""Security: checkpoints never run code when loaded, and credentials never leave the environment.

A checkpoint is safetensors plus JSON; a stage handed one whose files are pickles (which would run code when
unpickled) refuses it before anything is unpickled. The pipeline runs with recognisable fake credentials (AWS keys
and an MLflow token in the environment, keys and passwords inside the store and tracking URIs), and every place it
writes to is searched for them: the MLflow database and artifacts, the store, the Prefect database, its flow-run
parameters, logs and artifacts through its API, the local project folder, stdout, stderr and error messages.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import s3fs
import torch

from tasks.storage.store import CheckpointError
from tests.reliability import copy_checkpoint, footprint, use_home, workspace
from tests.servers import prefect_api

ROOT = Path(__file__).parents[2]
FAST = ["--preset", "tiny", "--set", "pretrain.steps=4", "--set", "pretrain.checkpoint_every=2",
        "--set", "pretrain.eval_every=2", "--set", "reward.steps=2", "--set", "reward.checkpoint_every=2",
        "--set", "ppo.steps=2", "--set", "ppo.checkpoint_every=2", "--set", "eval.n_values=[1,2]"]


# ---------------------------------------------------------------- no code in checkpoints


class Payload:
    """Unpickling this runs code: it creates the folder ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def pickle_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"token_emb.weight": Payload(str(marker))}, buffer)  # what a renamed .pt file holds
    return buffer.getvalue()


def test_the_payload_is_live_and_weights_only_loading_stops_it(tmp_path):
    marker = tmp_path / "ran"
    data = pickle_bytes(marker)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(io.BytesIO(data), weights_only=True)
    assert not marker.exists()
    torch.load(io.BytesIO(data), weights_only=False)  # what a careless loader would do
    assert marker.exists()


# Pickles that never touch stored state: what a module hands between its own processes, just written, in a
# private temporary folder.
OWN_PROCESS_PICKLES = {"tasks/runtime/launch.py"}


def test_no_code_path_unpickles_stored_state():
    loads = re.compile(r"(?<![\w.])(torch\.load|pickle\.loads?|cloudpickle\.loads?|joblib\.load|dill\.loads?)\s*\(")
    offenders = []
    for package in ("models", "tasks", "flows"):
        for path in (ROOT / package).rglob("*.py"):
            text, where = path.read_text(), str(path.relative_to(ROOT))
            for match in loads.finditer(text):
                call = text[match.start():text.find(")", match.end()) + 1]
                if match.group(1) == "torch.load":
                    allowed = "weights_only=True" in call
                else:
                    allowed = where in OWN_PROCESS_PICKLES
                if not allowed:
                    offenders.append(f"{where}: {call}")
    assert offenders == []


@pytest.mark.parametrize("name", ["weights.safetensors", "state.safetensors"])
def test_a_stage_refuses_a_checkpoint_carrying_a_pickle(name, tmp_path, tmp_path_factory, monkeypatch):
    """The attacker can write a consistent manifest: sizes and sha256s match, only the format gives it away."""
    from tasks.config import apply_overrides, tiny
    from tasks.reward import run_reward

    ws = workspace(tmp_path_factory)
    use_home(monkeypatch, ws.home)
    folder = copy_checkpoint(ws.pretrained.checkpoint_uri, tmp_path / "planted" / "step-00000002")
    marker = tmp_path / "code-ran"
    payload = pickle_bytes(marker)
    (folder / name).write_bytes(payload)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    if name == "weights.safetensors":
        manifest["digest"] = "sha256:" + manifest["files"][name]["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = footprint(ws.home)

    with pytest.raises(CheckpointError, match=f"{name} is not a safetensors file.*refusing to load it"):
        run_reward(apply_overrides(tiny(), ["reward.steps=2"]).reward, str(folder))
    assert not marker.exists(), "the pickle ran"
    assert footprint(ws.home) == before


# ---------------------------------------------------------------- credentials stay in the environment


SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPALMRLHF7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "pRlhF/fake+Secret/9f3kQz7Lw2Xv8EXAMPLE",
    "MLFLOW_TRACKING_TOKEN": "palm-rlhf-fake-token-5b0c1e77",
}
URI_KEY, URI_SECRET = "AKIAURIKEY0PALM0RLHF", "uri/Secret+in/the0store0URI"  # given only inside URIs
URI_PASSWORD = "palm-rlhf-fake-password-in-tracking-uri"
NEEDLES = [*SECRETS.values(), URI_KEY, URI_SECRET, URI_PASSWORD,
           "pRlhF/fake", "uri/Secret"]  # a secret cut at its first "/" is still a secret


@pytest.fixture(scope="module", autouse=True)
def secret_processes(tmp_path_factory, s3_server, mlflow_server, prefect_server):
    """A good pipeline run with credentials in the environment, and two runs given credentials inside URIs, all
    started when the module starts (the checkpoint tests above run meanwhile)."""
    root = tmp_path_factory.mktemp("secrets")
    store = s3_server.url(f"security-{uuid.uuid4().hex[:8]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_", "AWS_"))}
    env.update({**prefect_server.env, **s3_server.env, **SECRETS, "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
                "PALM_RLHF_STORE": store, "PALM_RLHF_HOME": str(root / "home"), "PYTHONPATH": str(ROOT)})
    host = mlflow_server.tracking_uri.removeprefix("http://")
    runs = {
        "good": (["run", *FAST, "--summary", str(root / "summary.json")], env),
        "store": (["run", *FAST], {**env, "PALM_RLHF_STORE": f"s3://{URI_KEY}:{URI_SECRET}@{s3_server.bucket}/x"}),
        "tracking": (["run", *FAST], {**env, "MLFLOW_TRACKING_URI": f"http://palm:{URI_PASSWORD}@{host}"}),
    }
    started = {name: subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=run_env, cwd=root, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, (args, run_env) in runs.items()}
    yield root, store, started
    for process in started.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def secret_runs(secret_processes):
    root, store, started = secret_processes
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=500)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert done["good"].returncode == 0, done["good"].stderr[-4000:]
    return root, store, done["good"], {"store": done["store"], "tracking": done["tracking"]}


@pytest.mark.servers
def test_credentials_inside_uris_are_refused_with_a_clean_message(secret_runs):
    _, _, _, refused = secret_runs
    for what, done in refused.items():
        assert done.returncode == 2, (what, done.stderr[-3000:])
        last = done.stderr.strip().splitlines()[-1]
        assert re.fullmatch(r"palm-rlhf: error: .*: credentials inside the URI are not supported; .*", last), last


def _prefect_records(prefect_server) -> dict[str, str]:
    """Every flow run's parameters, every log line and every artifact the Prefect server holds, as text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found: dict[str, str] = {}
    with prefect_api(prefect_server), get_client(sync_client=True) as client:
        runs, offset = [], 0
        while page := client.read_flow_runs(limit=200, offset=offset):
            runs += page
            offset += len(page)
        for run in runs:
            found[f"flow run {run.name} parameters"] = json.dumps(run.parameters, default=str)
            logs, offset = [], 0
            log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            while page := client.read_logs(log_filter=log_filter, limit=200, offset=offset):
                logs += page
                offset += len(page)
            found[f"flow run {run.name} logs"] = "\n".join(log.message for log in logs)
        for artifact in client.read_artifacts(limit=200):
            found[f"artifact {artifact.key}"] = json.dumps(artifact.data, default=str)
    assert any("models:/palm-policy" in text for text in found.values()), "the pipeline's logs were read"
    return found


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.servers
def test_no_credential_appears_anywhere_the_pipeline_wrote(secret_runs, s3_server, mlflow_server, prefect_server):
    root, store, good, refused = secret_runs
    places: dict[str, bytes] = {}
    places["stdout+stderr of the good run"] = (good.stdout + good.stderr).encode()
    for what, done in refused.items():
        places[f"stdout+stderr of the run given a {what} URI with credentials"] = (done.stdout + done.stderr).encode()
    places.update(_files(root))  # the project home and the summary
    places.update(_files(mlflow_server.process.log_path.parent))  # MLflow's database
    places.update(_files(prefect_server.home.parent))  # Prefect's database, home and log
    places.update(_files(s3_server.process.log_path.parent))  # the S3 server's request log
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    objects = fs.find(s3_server.bucket)
    places.update({f"s3://{key}": data for key, data in fs.cat(objects).items()})  # MLflow artifacts, the store
    places.update({k: v.encode() for k, v in _prefect_records(prefect_server).items()})

    assert any(key.startswith(f"{store}/ppo/") for key in (f"s3://{o}" for o in objects)), "the store was searched"
    leaks = [f"{needle!r} in {where}" for where, data in places.items() for needle in NEEDLES
             if needle.encode() in data]
    assert not leaks, "\n".join(leaks)
