"""The `tiny` pipeline through the CLI with checkpoints in S3, the MLflow server and the Prefect server: everything it
writes is where production would look for it, and verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.tracking import client as tracking
from tasks.config import tiny
from tasks.storage.checkpoints import list_checkpoints, read_manifest, verify_checkpoint
from tests.production.conftest import MODELS, STAGES, read_summary, run_artifacts, stage_checkpoints

pytestmark = [pytest.mark.servers, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def first_run(production):
    summary = production.tmp / "first.json"
    done = production.cli("run", "--preset", "tiny", "--summary", str(summary))
    return read_summary(summary, done), done.stdout + done.stderr


@pytest.fixture(scope="module")
def runs(first_run):
    """The stage runs by stage, and their parent (the pipeline run) under "pipeline"."""
    summary, _ = first_run
    client = tracking.get_client()
    found = {stage: client.get_run(summary[stage]["mlflow_run_id"]) for stage in STAGES}
    parents = {run.data.tags.get("mlflow.parentRunId") for run in found.values()}
    assert len(parents) == 1 and None not in parents, "the four stage runs share one parent"
    return {"pipeline": client.get_run(parents.pop()), **found}


def expected_steps(config) -> list[int]:
    return sorted({*range(config.checkpoint_every, config.steps + 1, config.checkpoint_every), config.steps})


def test_every_checkpoint_is_in_the_bucket_and_verifies(first_run, production):
    summary, _ = first_run
    cfg = tiny()
    for stage in MODELS:
        result = summary[stage]
        assert result["checkpoint_uri"].startswith(f"{production.store}/{stage}/"), result["checkpoint_uri"]
        assert result["cached"] is False
        prefix = result["checkpoint_uri"].rsplit("/", 1)[0]
        refs = list_checkpoints(prefix)
        assert [ref.step for ref in refs] == expected_steps(getattr(cfg, stage))
        assert [ref.uri for ref in refs] == stage_checkpoints(production, result["checkpoint_uri"]), \
            "every step folder in the bucket has its manifest"
        for ref in refs:
            assert verify_checkpoint(ref.uri) == ref
        assert refs[-1].uri == result["checkpoint_uri"] and refs[-1].digest == result["digest"]

    policy = read_manifest(summary["ppo"]["checkpoint_uri"])
    assert {p["uri"]: p["digest"] for p in policy["parents"]} == \
        {summary[s]["checkpoint_uri"]: summary[s]["digest"] for s in ("pretrain", "reward")}
    assert read_manifest(summary["reward"]["checkpoint_uri"])["parents"][0]["digest"] == summary["pretrain"]["digest"]


def test_mlflow_server_holds_the_pipeline_run_and_four_stage_runs(runs, mlflow_server):
    assert tracking.tracking_uri() == mlflow_server.tracking_uri
    client = tracking.get_client()
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags.get("prefect.flow_run_id"), name
    for stage in STAGES:
        assert runs[stage].data.metrics, stage
        assert runs[stage].data.params, stage
    assert len(client.get_metric_history(runs["pretrain"].info.run_id, "loss")) == tiny().pretrain.steps
    assert {"reward", "kl", "entropy", "clip_frac"} <= set(runs["ppo"].data.metrics)
    assert runs["pretrain"].inputs.dataset_inputs, "the corpus is logged as a dataset"


def test_run_artifacts_are_objects_in_the_bucket(runs, production, mlflow_server):
    client, fs = tracking.get_client(), production.fs()
    destination = mlflow_server.artifacts_destination.removeprefix("s3://")
    for name, run in runs.items():
        files = run_artifacts(client, run.info.run_id)
        assert files, f"the {name} run logged no artifacts"
        # Proxied artifacts: mlflow-artifacts:/<experiment>/<run>/artifacts lands under the server's destination.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        root = f"{destination}/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}"
        for info in files:
            assert fs.size(f"{root}/{info.path}") == info.file_size, f"{name}: {info.path}"
    paths = {info.path for info in run_artifacts(client, runs["ppo"].info.run_id)}
    assert "plots/ppo.png" in paths


def test_registered_versions_are_the_logged_models_of_the_bucket_checkpoints(first_run):
    summary, _ = first_run
    client = tracking.get_client()
    versions = {stage: client.get_model_version(name, summary[stage]["model_version"])
                for stage, name in MODELS.items()}
    for stage, version in versions.items():
        assert version.tags["checkpoint_uri"] == summary[stage]["checkpoint_uri"]
        assert version.tags["checkpoint_digest"] == summary[stage]["digest"]
        # the version is the MLflow model its stage logged (through the server, into the bucket) from that checkpoint
        assert version.source.startswith("models:/m-")
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        assert logged.source_run_id == version.run_id == summary[stage]["mlflow_run_id"]
    pretrained = f"palm-pretrained/{versions['pretrain'].version}"
    assert versions["reward"].tags["parent.pretrained"] == pretrained
    assert versions["ppo"].tags["parent.pretrained"] == pretrained
    assert versions["ppo"].tags["parent.reward"] == f"palm-reward/{versions['reward'].version}"
    assert versions["pretrain"].tags["data.corpus"].startswith("sha256:")


def test_the_registered_policy_loads_from_the_server_and_answers(first_run):
    """What a team deploying from the registry does: the model's files come through the tracking server from S3."""
    import mlflow

    summary, _ = first_run  # MLFLOW_TRACKING_URI names the server, as in a deploying team's shell
    model = mlflow.pyfunc.load_model(f"models:/palm-policy/{summary['ppo']['model_version']}")
    answers = model.predict(["The function", "A module is"], params={"max_new_tokens": 4, "num_samples": 2,
                                                                     "return_scores": True})
    assert len(answers) == 2 and answers["score"].between(1, 5).all()


def test_prefect_flow_run_completed_with_its_stage_artifacts(runs, production):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterParentFlowRunId,
    )

    pipeline_id = runs["pipeline"].data.tags["prefect.flow_run_id"]
    with production.api(), get_client(sync_client=True) as client:
        pipeline = client.read_flow_run(pipeline_id)
        stages = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline.id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id for run in stages])))
        flow_names = {run.id: client.read_flow(run.flow_id).name for run in stages}
    assert pipeline.state.is_completed(), pipeline.state
    assert sorted(flow_names.values()) == sorted(STAGES)
    assert all(run.state.is_completed() for run in stages)
    assert {str(run.id) for run in stages} == {runs[s].data.tags["prefect.flow_run_id"] for s in STAGES}
    by_key = {a.key: a for a in artifacts}
    assert {f"palm-rlhf-{stage}" for stage in STAGES} | {"palm-rlhf-eval-results"} <= set(by_key)
    for stage in MODELS:
        assert runs[stage].info.run_id in by_key[f"palm-rlhf-{stage}"].data


def test_no_credential_reaches_output_runs_or_artifacts(first_run, runs, production):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    summary, output = first_run
    client, folder = tracking.get_client(), str(production.tmp / "artifacts")
    texts, scanned = [output], set()
    for run in runs.values():
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        for info in run_artifacts(client, run.info.run_id):  # every artifact, whatever its kind (.md, .json, .png)
            data = Path(client.download_artifacts(run.info.run_id, info.path, folder)).read_bytes()
            texts.append(data.decode("utf-8", errors="replace"))
            scanned.add(Path(info.path).suffix)
    assert {".md", ".json", ".png"} <= scanned, scanned
    texts += [json.dumps(client.get_model_version(name, summary[stage]["model_version"]).tags)
              for stage, name in MODELS.items()]
    flow_runs = [run.data.tags["prefect.flow_run_id"] for run in runs.values()]
    with production.api(), get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_runs)))
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=flow_runs)))
    assert logs and artifacts, "the flow runs sent their logs and artifacts to the server"
    texts += [log.message for log in logs] + [json.dumps(artifact.data) for artifact in artifacts]
    leaked = [secret[:4] + "..." for secret in production.secrets if any(secret in text for text in texts)]
    assert not leaked
