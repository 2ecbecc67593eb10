"""The project's own prefect.yaml against the Prefect server: `prefect deploy --all`, schedules that make runs, a
process worker that runs the pipeline and a stage rerun, and the lineage the CLI prints afterwards."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

from tasks.tracking import client as tracking
from tasks.tracking.registry import get_alias, resolve_model_uri
from tasks.config import tiny
from tasks.redact import redact
from tests.production.conftest import MODELS, REPO, SHORT, STAGES, wait_for
from tests.servers import BIN, start_worker

pytestmark = [pytest.mark.servers, pytest.mark.timeout(900)]

POOL = "palm-rlhf"  # prefect.yaml's work pool
DEPLOYMENTS = {"palm-rlhf-nightly": "flows/pipeline.py:pipeline", "palm-rlhf-pretrain": "flows/stages.py:pretrain_flow",
               "palm-rlhf-reward": "flows/stages.py:reward_flow", "palm-rlhf-ppo": "flows/stages.py:ppo_flow",
               "palm-rlhf-eval": "flows/stages.py:eval_flow"}


def prefect_client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def runs_of(client, deployment_id, *states: str) -> list:
    """The deployment's flow runs in any of these state types (all of them when none is given)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType,
    )

    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))) if states else None
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), state=state))


def finished(client, flow_run_id):
    run = client.read_flow_run(flow_run_id)
    return run if run.state.is_final() else None


@pytest.fixture(scope="module")
def deployed(production):
    """`prefect work-pool create` and `prefect deploy --all` as the README says, from the repository itself."""
    env = {**production.env, "PALM_RLHF_PROJECT_DIR": str(REPO)}
    for argv in (["work-pool", "create", POOL, "--type", "process", "--overwrite"], ["--no-prompt", "deploy", "--all"]):
        done = subprocess.run([str(BIN / "prefect"), *argv], env=env, cwd=REPO, text=True, capture_output=True,
                              timeout=300)
        assert done.returncode == 0, redact(f"prefect {' '.join(argv)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    with production.api(), prefect_client() as client:
        return {d.name: d for d in client.read_deployments() if d.work_pool_name == POOL}


@pytest.fixture(scope="module")
def worker(production, deployed):
    """A process worker on the pool, started where no project files are: the pull step must find them.

    The nightly cron is switched off first, so that a demo run due now (at 02:00 UTC) cannot land on this worker.
    """
    with production.api(), prefect_client() as client:
        nightly = deployed["palm-rlhf-nightly"]
        for schedule in client.read_deployment_schedules(nightly.id):
            client.update_deployment_schedule(nightly.id, schedule.id, active=False)
    cwd = production.tmp / "worker"
    cwd.mkdir()
    started = start_worker(production.env, POOL, cwd=cwd, log_path=production.tmp / "worker.log")
    yield started
    started.stop()


def test_deploy_all_creates_every_deployment_from_prefect_yaml(deployed):
    assert {name: d.entrypoint for name, d in deployed.items()} == DEPLOYMENTS
    for deployment in deployed.values():
        # {{ $PALM_RLHF_PROJECT_DIR }} is filled in at deploy time, so a worker anywhere runs the deployed checkout.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}], deployment.name
    nightly = deployed["palm-rlhf-nightly"]
    assert nightly.parameters == {"preset": "demo"}
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]


def test_nightly_schedule_creates_scheduled_runs(deployed, production):
    nightly = deployed["palm-rlhf-nightly"]
    with production.api(), prefect_client() as client:
        # The scheduler's loop runs once a minute; a changed deployment is scheduled within seconds, so nudge it
        # (pause and resume) instead of waiting out a busy machine's slow loop.
        client.pause_deployment(nightly.id)
        client.resume_deployment(nightly.id)
        scheduled = wait_for("scheduled nightly runs", lambda: runs_of(client, nightly.id, "SCHEDULED"), 150)
    times = sorted(run.expected_start_time for run in scheduled)
    assert all((t.hour, t.minute) == (2, 0) for t in times), times
    assert times[0] > dt.datetime.now(dt.timezone.utc)
    assert all(run.parameters == {"preset": "demo"} and run.auto_scheduled for run in scheduled)


@pytest.fixture(scope="module")
def scheduled_run(deployed, worker, production):
    """The pipeline deployment on a one-minute interval schedule with tiny parameters; the worker starts the run."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    nightly = deployed["palm-rlhf-nightly"]
    parameters = {"preset": "tiny", "overrides": [*SHORT, "pretrain.seed=31"]}  # models of its own
    first = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=15)
    with production.api(), prefect_client() as client:
        [schedule] = client.create_deployment_schedules(nightly.id, [DeploymentScheduleCreate(
            schedule=IntervalSchedule(interval=dt.timedelta(minutes=1), anchor_date=first), parameters=parameters)])
        # A new schedule alone waits for the scheduler's main loop (a minute); a changed deployment is scheduled
        # within seconds. Pause and resume is that change.
        client.pause_deployment(nightly.id)
        client.resume_deployment(nightly.id)
        picked = wait_for("run picked up by the worker", lambda: runs_of(
            client, nightly.id, "PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED"), 180,
            detail=worker.process.log_tail)
        client.update_deployment_schedule(nightly.id, schedule.id, active=False)  # one run is enough
        [run] = picked
        run = wait_for("final state of the scheduled run", lambda: finished(client, run.id), 600,
                       detail=worker.process.log_tail, every_s=2)
    assert run.state.is_completed(), f"{run.state}\n{worker.process.log_tail(80)}"
    return run, parameters


def test_scheduled_pipeline_run_is_started_by_the_worker_and_registers_models(scheduled_run, production):
    run, parameters = scheduled_run
    assert run.auto_scheduled and run.parameters == parameters  # made by the scheduler, not by this test
    client = tracking.get_client()
    [pipeline] = client.search_runs([tracking.experiment_id()],
                                    filter_string=f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert pipeline.info.status == "FINISHED"
    summary = json.loads(Path(client.download_artifacts(pipeline.info.run_id, "summary.json",
                                                        str(production.tmp / "scheduled"))).read_text())
    assert list(summary) == list(STAGES)
    for stage, name in MODELS.items():
        assert summary[stage]["cached"] is False, "pretrain.seed=31 gives the run models of its own"
        version = client.get_model_version(name, summary[stage]["model_version"])
        assert version.tags["checkpoint_uri"] == summary[stage]["checkpoint_uri"]
        assert version.tags["checkpoint_uri"].startswith(f"{production.store}/{stage}/")
    assert client.get_run(summary["pretrain"]["mlflow_run_id"]).data.params["seed"] == "31"


@pytest.fixture(scope="module")
def stage_rerun(scheduled_run, worker, production):
    """PPO alone through its deployment, on the newest candidates, with a seed no earlier run used (the tiny
    policy is never good enough to be champion: the gate keeps it out)."""
    from prefect.deployments import run_deployment

    inputs = {"pretrained": "models:/palm-pretrained@candidate", "reward_model": "models:/palm-reward@candidate"}
    pinned = {role: resolve_model_uri(uri)["version"] for role, uri in inputs.items()}
    config = tiny().ppo.model_copy(update={"seed": 7}).model_dump(mode="json")
    with production.api():
        run = run_deployment("ppo/palm-rlhf-ppo", parameters={**inputs, "config": config}, timeout=600)
    assert run.state.is_completed(), f"{run.state}\n{worker.process.log_tail(80)}"
    versions = tracking.get_client().search_model_versions(
        f"name = 'palm-policy' and tags.`prefect.flow_run_id` = '{run.id}'")
    assert len(versions) == 1, "the rerun registers one new policy version"
    return versions[0], pinned


def test_stage_rerun_registers_a_policy_whose_lineage_names_its_inputs(stage_rerun):
    policy, pinned = stage_rerun
    assert policy.tags["parent.pretrained"] == f"palm-pretrained/{pinned['pretrained']}"
    assert policy.tags["parent.reward"] == f"palm-reward/{pinned['reward_model']}"
    assert get_alias("palm-policy", "candidate") == policy.version
    assert tracking.get_client().get_run(policy.run_id).data.params["seed"] == "7"


def test_lineage_cli_prints_the_chain_down_to_the_data(stage_rerun, production):
    policy, pinned = stage_rerun
    client = tracking.get_client()
    pretrained = client.get_model_version("palm-pretrained", pinned["pretrained"])
    reward = client.get_model_version("palm-reward", pinned["reward_model"])
    done = production.cli("lineage", "models:/palm-policy@candidate")
    assert done.returncode == 0, redact(done.stderr[-3000:])
    text = done.stdout
    assert text.splitlines()[0].startswith(f"palm-policy v{policy.version} ")
    assert f"pretrained: palm-pretrained v{pretrained.version} " in text
    assert f"reward: palm-reward v{reward.version} " in text
    for version in (policy, pretrained, reward):
        assert version.tags["checkpoint_uri"] in text and version.tags["checkpoint_uri"].startswith("s3://")
    assert f"data corpus {pretrained.tags['data.corpus']}" in text
    assert f"data feedback {reward.tags['data.feedback']}" in text
    assert f"data prompts {policy.tags['data.prompts']}" in text


def test_worker_output_holds_no_credentials(stage_rerun, worker, production):
    log = worker.process.log_path.read_text(errors="replace")
    assert "Completed" in log
    for secret in production.secrets:
        assert secret not in log
