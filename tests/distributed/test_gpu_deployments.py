"""deploy/gpu.prefect.yaml against a real Prefect server, as its header says to deploy it: the Kubernetes pool made from
deploy/k8s-gpu-job-template.json and the per-GPU process pool take every GPU deployment, and the GPU request and the
settings secret reach the job manifest. Neither a GPU nor a cluster is needed to check that."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tasks.redact import redact
from tests.servers import BIN, prefect_api, run_env

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
K8S_POOL, PROCESS_POOL = "palm-rlhf-k8s-gpu", "palm-rlhf-gpu"


def prefect(env: dict, *argv: str) -> None:
    done = subprocess.run([str(BIN / "prefect"), *argv], env=env, cwd=REPO, text=True, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, redact(f"prefect {' '.join(argv)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def deployed(prefect_server):
    from prefect.client.orchestration import get_client

    env = {**run_env(prefect_server, inherit=True), "PALM_RLHF_PROJECT_DIR": str(REPO)}
    prefect(env, "work-pool", "create", K8S_POOL, "--type", "kubernetes", "--overwrite",
            "--base-job-template", "deploy/k8s-gpu-job-template.json")
    prefect(env, "work-pool", "create", PROCESS_POOL, "--type", "process", "--overwrite")
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/gpu.prefect.yaml", "--all")
    with prefect_api(prefect_server), get_client(sync_client=True) as client:
        pools = {name: client.read_work_pool(name) for name in (K8S_POOL, PROCESS_POOL)}
        deployments = {d.name: d for d in client.read_deployments() if d.work_pool_name in pools}
        yield pools, deployments
        for deployment in deployments.values():  # the session's Prefect server is shared
            client.delete_deployment(deployment.id)
        for name in pools:
            client.delete_work_pool(name)


def test_every_stage_has_a_kubernetes_and_a_per_gpu_deployment(deployed):
    _, deployments = deployed
    by_pool = {}
    for d in deployments.values():
        by_pool.setdefault(d.work_pool_name, set()).add(d.entrypoint)
    entrypoints = {"flows/pipeline.py:pipeline", "flows/stages.py:pretrain_flow", "flows/stages.py:reward_flow",
                   "flows/stages.py:ppo_flow", "flows/stages.py:eval_flow"}
    assert by_pool == {K8S_POOL: entrypoints, PROCESS_POOL: entrypoints}
    for d in deployments.values():
        directory = "/opt/palm-rlhf" if d.work_pool_name == K8S_POOL else str(REPO)  # the image's, or this checkout
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": directory}}]


def test_kubernetes_jobs_request_as_many_gpus_as_the_stage_runs_ranks(deployed):
    pools, deployments = deployed
    for d in deployments.values():
        if d.work_pool_name != K8S_POOL:
            continue
        config = d.parameters.get("config", {})
        ranks = config.get("runtime", {}).get("nproc_per_node", 1)
        if "overrides" in d.parameters:  # the pipeline: every training stage on the job's GPUs
            ranks = {int(o.split("=")[1]) for o in d.parameters["overrides"] if ".nproc_per_node=" in o}.pop()
        assert d.job_variables["gpus"] == ranks, d.name
        assert "AWS_SECRET_ACCESS_KEY" not in str(d.job_variables) and "MLFLOW_TRACKING_URI" not in str(d.job_variables)
    template = pools[K8S_POOL].base_job_template
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["envFrom"] == [{"secretRef": {"name": "{{ settings_secret }}"}}]
    assert template["variables"]["properties"]["settings_secret"]["default"] == "palm-rlhf-settings"


def test_gpu_deployment_parameters_are_valid_stage_settings(deployed):
    from tasks.config import PPOConfig, PretrainConfig, RewardConfig, apply_overrides, preset

    _, deployments = deployed
    models = {"pretrain_flow": PretrainConfig, "reward_flow": RewardConfig, "ppo_flow": PPOConfig}
    for d in deployments.values():
        flow = d.entrypoint.split(":")[1]
        if "config" in d.parameters:
            models[flow].model_validate(d.parameters["config"])  # e.g. a batch that splits evenly over the ranks
        if "overrides" in d.parameters:
            apply_overrides(preset(d.parameters["preset"]), d.parameters["overrides"])
