"""Tracking, registry and lineage against the embedded default: a real SQLite MLflow store."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_frame_dataset, log_plot, log_table, log_text, log_text_dataset
from tasks.tracking.registry import get_alias, register_checkpoint, resolve_model_uri, set_alias
from tasks.tracking.runs import MetricLogger, end_run, find_run, log_params, reopen_run, start_run
from tasks.tracking.lineage import format_lineage, lineage

pytest_plugins = ["tests.servers"]

SECRET_URI = "s3://AKIAFAKE:SECRETFAKE@bucket/x"
ENV_SECRET = "envsecretvalue-1234"
REPO = Path(__file__).resolve().parents[2]


def _use_home(monkeypatch, home: Path) -> Path:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_EXPERIMENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PALM_RLHF_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow database with its schema made once: migrations take seconds per test."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        home = _use_home(monkeypatch, tmp_path_factory.mktemp("template"))
        tracking.check_tracking()
    return home / "mlflow.db"


@pytest.fixture
def home(tmp_path, monkeypatch):
    return _use_home(monkeypatch, tmp_path / "home")


@pytest.fixture
def tracked(home, empty_db) -> Path:
    home.mkdir()
    shutil.copy(empty_db, home / "mlflow.db")
    return home


@pytest.fixture
def run_id(tracked):
    return start_run("stage")


def _download(run_id: str, path: str, dst: Path) -> Path:
    return Path(tracking.get_client().download_artifacts(run_id, path, str(dst)))


def test_embedded_default_is_sqlite_under_home(home):
    assert tracking.tracking_uri() == f"sqlite:///{home.resolve() / 'mlflow.db'}"
    tracking.check_tracking()
    assert (home / "mlflow.db").exists()
    experiment = tracking.get_client().get_experiment(tracking.experiment_id())
    assert experiment.name == "palm-rlhf"
    assert experiment.artifact_location.startswith((home.resolve() / "mlartifacts").as_uri())


def test_the_experiment_opens_in_the_model_training_view(home, monkeypatch):
    """MLflow's UI picks an experiment's view from its kind: a new experiment and one made before the tag existed
    both open as model development, not as GenAI."""
    client = tracking.get_client()
    assert client.get_experiment(tracking.experiment_id()).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-elsewhere")
    monkeypatch.setenv("PALM_RLHF_EXPERIMENT", "made-elsewhere")
    assert tracking.experiment_id() == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_stage_runs_nest_under_the_pipeline_run_and_can_be_found_again(tracked):
    parent = start_run("pipeline", tags={"pipeline.key": "abc"})
    stage = start_run("pretrain", parent_run_id=parent, tags={"stage.key": "k1"})
    end_run(stage, "FAILED")
    end_run(parent)

    client = tracking.get_client()
    assert client.get_run(stage).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(stage).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FINISHED"
    assert find_run({"stage.key": "k1"}) == stage
    assert find_run({"stage.key": "other"}) is None
    reopen_run(stage)
    assert client.get_run(stage).info.status == "RUNNING"


def test_params_are_flattened_redacted_and_a_resume_may_log_them_again(run_id, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    params = {"store": {"root": SECRET_URI}, "model": {"dim": 64, "depth": 2}, "note": f"key={ENV_SECRET}"}
    log_params(run_id, params)
    log_params(run_id, params)  # a resumed stage logs its config again

    logged = tracking.get_client().get_run(run_id).data.params
    assert logged["model.dim"] == "64" and logged["model.depth"] == "2"
    assert logged["store.root"] == "s3://bucket/x"
    everything = json.dumps(logged)
    assert "SECRETFAKE" not in everything and "AKIAFAKE" not in everything and ENV_SECRET not in everything

    with pytest.raises(tracking.TrackingError, match="model.dim"):
        log_params(run_id, {"model": {"dim": 128}})


def test_metric_logger_sends_batches_and_keeps_history(run_id):
    logger = MetricLogger(run_id, flush_every=4)
    for step in range(5):
        logger.log(step, loss=1.0 / (step + 1), lr=0.1)
    client = tracking.get_client()
    assert len(client.get_metric_history(run_id, "loss")) == 4  # the first 4 steps went as one batch
    logger.flush()

    sent = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sent] == logger.history["loss"]
    assert logger.history["lr"] == [(s, 0.1) for s in range(5)]


def test_a_stop_signal_during_a_metrics_write_waits_for_it_and_the_run_can_be_marked_killed(run_id, monkeypatch):
    """SIGTERM landing inside the SQLite write used to leave its transaction open: marking the run KILLED then
    failed with "database is locked" and the run stayed RUNNING."""
    import os
    import signal

    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped

    client = tracking.get_client()
    write = client.log_batch

    def signalled_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives as the write begins
        return write(*args, **kwargs)

    monkeypatch.setattr(client, "log_batch", signalled_write)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        logger = MetricLogger(run_id, flush_every=1000)
        for step in range(50):
            logger.log(step, loss=1.0 / (step + 1))
        with pytest.raises(Stopped):
            logger.flush()
    finally:
        signal.signal(signal.SIGTERM, previous)
    end_run(run_id, "KILLED")
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(50))  # the write finished


def test_unsent_metrics_resent_after_they_arrived_are_kept_once(run_id):
    """What a resumed stage does with the list its checkpoint kept: some of it reached MLflow before the kill."""
    logger = MetricLogger(run_id, flush_every=None)
    for step in (1, 2):
        logger.log(step, loss=1.0 / step, accuracy=float("nan"), kl=float("inf"))
    kept = json.loads(json.dumps(logger.unsent(), allow_nan=False))  # as a manifest holds it: plain JSON
    assert len(kept) == 6 and [m[3] for m in kept] == [1, 1, 1, 2, 2, 2]
    logger.flush()
    assert logger.unsent() == []

    resumed = MetricLogger(run_id, flush_every=None)
    resumed.resend(kept)
    resumed.log(3, loss=1 / 3, accuracy=0.5, kl=0.1)
    resumed.flush()
    client = tracking.get_client()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "kl")] == [1, 2, 3]  # inf is stored as the largest float


def test_datasets_are_run_inputs_with_digest_and_redacted_source(run_id, monkeypatch):
    digest = "sha256:" + "ab" * 32
    frame = pd.DataFrame({"prompt": ["hi", "yo"], "chosen": [0, 1], "score": [0.5, 1.5]})
    log_text_dataset(run_id, name="corpus", source_uri=SECRET_URI, digest=digest,
                              context="training", preview="once upon a time")
    log_frame_dataset(run_id, frame, name="feedback", source_uri="file:///data/fb.parquet",
                               digest="sha256:" + "cd" * 32, context="training")

    inputs = {d.dataset.name: d for d in tracking.get_client().get_run(run_id).inputs.dataset_inputs}
    corpus, feedback = inputs["corpus"], inputs["feedback"]
    assert digest.endswith(corpus.dataset.digest)
    assert json.loads(corpus.dataset.profile)["digest"] == digest
    assert json.loads(corpus.dataset.source) == {"uri": "s3://bucket/x"}
    assert corpus.dataset.source_type == "s3"
    assert {t.key: t.value for t in corpus.tags}["mlflow.data.context"] == "training"
    assert feedback.dataset.source_type == "local"
    assert json.loads(feedback.dataset.profile)["num_rows"] == 2
    assert "prompt" in feedback.dataset.schema


def test_plot_is_a_png_artifact(run_id, tmp_path):
    history = {"loss": [(0, 2.0), (1, 1.5), (2, 1.0)], "kl": [(0, 0.0), (2, 0.1)]}
    log_plot(run_id, history, keys=["loss", "kl"], title="ppo", artifact_file="plots/ppo.png")
    assert _download(run_id, "plots/ppo.png", tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(tracking.TrackingError, match="reward"):
        log_plot(run_id, history, keys=["reward"], title="x", artifact_file="x.png")


def test_table_is_replaced_not_appended_and_text_is_redacted(run_id, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    frame = pd.DataFrame({"prompt": ["a", f"see {SECRET_URI}"], "reward": [0.1, 0.2]})
    log_table(run_id, frame, "eval/samples.json")
    log_table(run_id, frame, "eval/samples.json")  # a resumed stage
    log_text(run_id, f"token {ENV_SECRET}", "notes.txt")

    table = json.loads(_download(run_id, "eval/samples.json", tmp_path).read_text())
    assert len(table["data"]) == 2 and table["columns"] == ["prompt", "reward"]
    csv = _download(run_id, "eval/samples.csv", tmp_path).read_text()
    assert "SECRETFAKE" not in csv + json.dumps(table) and "s3://bucket/x" in csv
    assert ENV_SECRET not in _download(run_id, "notes.txt", tmp_path).read_text()


def test_register_checkpoint_numbers_versions_and_tags_them(run_id):
    first = register_checkpoint(
        "palm-pretrained", checkpoint_uri="file:///ckpt/a", digest="sha256:aa", run_id=run_id,
        lineage={"data.corpus": "sha256:c0", "prefect.flow_run_id": "f-1", "code_version": "abc123"},
    )
    second = register_checkpoint(
        "palm-pretrained", checkpoint_uri=SECRET_URI, digest="sha256:bb", run_id=run_id, lineage={},
    )
    assert (first, second) == ("1", "2")

    client = tracking.get_client()
    v1, v2 = client.get_model_version("palm-pretrained", "1"), client.get_model_version("palm-pretrained", "2")
    assert v1.source == "file:///ckpt/a" and v1.run_id == run_id
    assert v1.tags == {"checkpoint_uri": "file:///ckpt/a", "checkpoint_digest": "sha256:aa",
                       "mlflow_run_id": run_id, "data.corpus": "sha256:c0",
                       "prefect.flow_run_id": "f-1", "code_version": "abc123"}
    assert v2.source == "s3://bucket/x" and v2.tags["checkpoint_uri"] == "s3://bucket/x"


def test_aliases_resolve_and_missing_ones_are_named(run_id):
    for uri in ("file:///ckpt/r1", "file:///ckpt/r2"):
        register_checkpoint("palm-reward", checkpoint_uri=uri, digest="sha256:r",
                                     run_id=run_id, lineage={})
    set_alias("palm-reward", "champion", "1")
    assert get_alias("palm-reward", "champion") == "1"
    assert get_alias("palm-reward", "nope") is None

    by_alias = resolve_model_uri("models:/palm-reward@champion")
    assert by_alias["version"] == "1" and by_alias["checkpoint_uri"] == "file:///ckpt/r1"
    assert by_alias["run_id"] == run_id and by_alias["digest"] == "sha256:r"
    assert resolve_model_uri("models:/palm-reward/2")["checkpoint_uri"] == "file:///ckpt/r2"
    plain = resolve_model_uri("s3://bucket/ckpt/7")
    assert plain["checkpoint_uri"] == "s3://bucket/ckpt/7" and plain["name"] is None

    with pytest.raises(tracking.TrackingError, match=r"no alias @candidate.*@champion -> v1"):
        resolve_model_uri("models:/palm-reward@candidate")
    with pytest.raises(tracking.TrackingError, match=r"no version 9.*v2, v1"):
        resolve_model_uri("models:/palm-reward/9")
    with pytest.raises(tracking.TrackingError, match=r"'palm-policy'.*palm-reward"):
        resolve_model_uri("models:/palm-policy@candidate")


def test_lineage_walks_back_from_the_policy_to_the_data(run_id):
    def register(name, uri, lineage_tags):
        return register_checkpoint(name, checkpoint_uri=uri, digest=f"sha256:{name}",
                                            run_id=run_id, lineage=lineage_tags)

    pre = register("palm-pretrained", "s3://b/pre", {"data.corpus": "sha256:corpus"})
    rew = register("palm-reward", "s3://b/rew", {"parent.pretrained": f"palm-pretrained/{pre}",
                                                 "data.feedback": "sha256:feedback"})
    set_alias("palm-reward", "champion", rew)
    pol = register("palm-policy", "s3://b/pol", {"parent.pretrained": f"palm-pretrained/{pre}",
                                                 "parent.reward": "models:/palm-reward@champion",
                                                 "data.prompts": "sha256:prompts"})
    set_alias("palm-policy", "candidate", pol)

    nodes = lineage("models:/palm-policy@candidate")
    assert [(n["name"], n["version"]) for n in nodes] == [
        ("palm-policy", "1"), ("palm-pretrained", "1"), ("palm-reward", "1")]
    assert nodes[0]["parents"] == {"pretrained": "palm-pretrained/1", "reward": "palm-reward/1"}
    assert nodes[0]["data"] == {"prompts": "sha256:prompts"}
    assert nodes[2]["parents"] == {"pretrained": "palm-pretrained/1"}

    text = format_lineage(nodes)
    assert text.splitlines()[0].startswith("palm-policy v1 (run ") and "aliases: candidate" in text
    for expected in ("palm-pretrained v1", "palm-reward v1", "s3://b/pol", "sha256:corpus",
                     "sha256:feedback", "data prompts sha256:prompts"):
        assert expected in text
    assert text.count("palm-pretrained v1") == 2  # under the policy and under the reward model


def test_two_processes_registering_at_once_get_distinct_versions(run_id):
    script = (
        "import sys; from tasks.tracking.registry import register_checkpoint\n"
        "for i in range(3):\n"
        "    print(register_checkpoint('palm-policy', checkpoint_uri=f's3://b/{sys.argv[1]}/{i}',"
        " digest='d', run_id=sys.argv[2], lineage={}))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, tag, run_id], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    versions = sorted(int(v) for out, _ in outputs for v in out.split())
    assert versions == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(60)
def test_check_tracking_fails_fast_and_clearly_on_a_dead_server(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.check_tracking()
    print(f"check_tracking on a closed port took {time.perf_counter() - started:.3f}s")
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}" in message and "unreachable" in message and "\n" not in message


def test_credentials_inside_the_tracking_uri_are_refused_without_echoing_them(monkeypatch):
    # MLflow prints the tracking URI (run links on stdout) and repeats it in its errors.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:pa55word@127.0.0.1:5000")
    with pytest.raises(tracking.TrackingError, match="credentials inside the URI are not supported") as caught:
        tracking.check_tracking()
    assert "http://127.0.0.1:5000" in str(caught.value) and "pa55word" not in str(caught.value)


@pytest.mark.servers
def test_through_a_tracking_server_local_checkpoints_register_via_the_run(
    mlflow_server, s3_server, monkeypatch, tmp_path
):
    from tests.servers import run_env

    for name, value in run_env(mlflow_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PALM_RLHF_EXPERIMENT", f"tracking-{tmp_path.name}")
    tracking.check_tracking()
    run = start_run("pretrain")
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "manifest.json").write_text('{"step": 7}')

    # The server refuses file:// sources outside the run's artifacts; s3:// goes in as is.
    on_disk = register_checkpoint("palm-pretrained", checkpoint_uri=local.as_uri(),
                                           digest="sha256:local", run_id=run, lineage={})
    in_s3 = register_checkpoint("palm-pretrained", checkpoint_uri=s3_server.url("ckpt/1"),
                                         digest="sha256:s3", run_id=run,
                                         lineage={"parent.previous": f"palm-pretrained/{on_disk}"})

    client = tracking.get_client()
    assert client.get_model_version("palm-pretrained", on_disk).source == f"runs:/{run}/checkpoint"
    assert client.get_model_version("palm-pretrained", in_s3).source == s3_server.url("ckpt/1")
    assert resolve_model_uri(f"models:/palm-pretrained/{on_disk}")["checkpoint_uri"] == local.as_uri()
    assert _download(run, "checkpoint/manifest.json", tmp_path / "dl").read_text() == '{"step": 7}'
    assert [n["checkpoint_uri"] for n in lineage(f"models:/palm-pretrained/{in_s3}")] == [
        s3_server.url("ckpt/1"), local.as_uri()]
    stored = client.get_run(run).info.artifact_uri.split("/", 1)[1]  # mlflow-artifacts:/<exp>/<run>/...
    assert any(key.endswith("checkpoint/manifest.json") for key in _s3_keys(s3_server, stored))


def _s3_keys(s3_server, under: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    return fs.find(f"{s3_server.bucket}/mlflow/{under.strip('/')}")
