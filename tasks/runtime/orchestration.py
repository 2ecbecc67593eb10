"""What Prefect needs around the stages: the compute task's options, the hand-off tasks between stages, and the
pipeline's parent MLflow run.

Compute tasks retry on failures that a rerun can fix (a storage or network error), and a retry resumes from the
last checkpoint, so it costs only the steps since then. Bad input never retries: it fails at once with its message.

A compute task is tagged `gpu` or `cpu` by the device its stage will use (`device_tag`), and holds one slot per
process of its stage (one per GPU) of the Prefect global concurrency limit of that name while it runs, when the user
has created one (`prefect gcl create gpu --limit 4` on a 4-GPU machine); without one it runs at once.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.redact import redact_uri
from tasks.runtime.errors import retry_unless_permanent
from tasks.config import Runtime
from tasks.runtime.stage import (FLOW_RUN_TAG, STAGE_TAG, StageResult, code_version, prefect_flow_run_id,
                                 resolve_runtime)
from tasks.storage.checkpoints import verify_checkpoint
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_text
from tasks.tracking.registry import resolve_model_uri
from tasks.tracking.runs import end_run, log_params, start_run

IO_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=retry_unless_permanent)


def compute_task(name: str):
    """@task for a stage's compute, whose first argument is the stage's config: it runs holding its device slots.
    Call it under `prefect.tags(device_tag(config.runtime))` (flows/stages.py) to tag it `gpu` or `cpu`."""
    def decorate(fn):
        @functools.wraps(fn)
        def holding_slots(config, *args, **kwargs):
            with device_slots(config.runtime):
                return fn(config, *args, **kwargs)

        return task(name=name, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_permanent)(
            holding_slots)

    return decorate


def device_tag(runtime: Runtime) -> str:
    """"gpu" for a stage that will run on CUDA, else "cpu"."""
    return "gpu" if resolve_runtime(runtime)[0].type == "cuda" else "cpu"


@contextmanager
def device_slots(runtime: Runtime):
    """Hold one slot per process of this node's share of the stage in the global concurrency limit named by its
    device tag, waiting for them if it is full; at once when no such limit exists."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    name = device_tag(runtime)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # none created: nothing to respect (and no warning on every task)
            yield
            return
    with concurrency(name, occupy=runtime.nproc_per_node, strict=True):
        yield


@task(**IO_RETRIES)
def pin_model(uri: str | None) -> str | None:
    """Turn an alias into the exact version it names now (models:/palm-reward@champion -> models:/palm-reward/3),
    so that the stage, its lineage and any retry all use the same model."""
    if not uri or not uri.startswith("models:/"):
        return uri
    info = resolve_model_uri(uri)
    return f"models:/{info['name']}/{info['version']}"


@task(**IO_RETRIES)
def verify(uri: str) -> str:
    """Read back every file of a stage's checkpoint and check its sha256 before anyone downstream uses it."""
    return verify_checkpoint(uri).digest


def run_link(run_id: str) -> str:
    uri = redact_uri(tracking.tracking_uri())  # a link people click: never with the credentials in it
    if uri.startswith(("http://", "https://")):
        return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{tracking.experiment_id()}/runs/{run_id})"
    return f"`{run_id}` (open with `mlflow ui --backend-store-uri {uri}`)"


@task(**IO_RETRIES)
def publish(result: StageResult) -> None:
    """A markdown artifact per stage: where its checkpoint is, which MLflow run tracked it, what it measured."""
    lines = [f"# {result.stage}", "",
             f"- MLflow run: {run_link(result.mlflow_run_id)}",
             f"- checkpoint: `{result.checkpoint_uri}`", f"- digest: `{result.digest}`"]
    if result.model_name:
        lines.append(f"- model: `models:/{result.model_name}/{result.model_version}`")
    lines.append(f"- reused from an identical earlier run: {'yes' if result.cached else 'no'}")
    if result.metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(result.metrics.items())]
    create_markdown_artifact(markdown="\n".join(lines), key=f"palm-rlhf-{result.stage}",
                             description=f"palm-rlhf {result.stage} stage")
    get_run_logger().info("%s: %s%s", result.stage,
                          f"models:/{result.model_name}/{result.model_version}" if result.model_name else "done",
                          " (reused)" if result.cached else "")


@task(**IO_RETRIES)
def open_pipeline_run(preset: str, overrides: list[str]) -> str:
    """The pipeline's parent MLflow run, under which every stage's run nests."""
    tracking.check_tracking()
    tags = {STAGE_TAG: "pipeline", "preset": preset, "code_version": code_version()}
    if flow_run := prefect_flow_run_id():
        tags[FLOW_RUN_TAG] = flow_run
    run_id = start_run("pipeline", tags=tags)
    log_params(run_id, {"preset": preset, "overrides": " ".join(overrides) or "(none)"})
    return run_id


@task(**IO_RETRIES)
def close_pipeline_run(run_id: str, results: dict[str, StageResult] | None, stopped: bool = False) -> None:
    """Record which stage runs made this pipeline run (a reused one may sit under an earlier pipeline) and end it:
    FINISHED, KILLED when it was stopped (Ctrl-C, SIGTERM), else FAILED."""
    if results is not None:
        summary = {name: r.model_dump() for name, r in results.items()}
        client = tracking.get_client()
        for name, r in results.items():  # a reused stage's run sits under the pipeline run that first made it
            client.set_tag(run_id, f"stage.{name}.run_id", r.mlflow_run_id)
            client.set_tag(run_id, f"stage.{name}.cached", str(r.cached).lower())
            if r.code:  # the code that made it: another version's, when reused across code versions
                client.set_tag(run_id, f"stage.{name}.code", r.code)
        log_text(run_id, json.dumps(summary, indent=2), "summary.json")
    end_run(run_id, "FINISHED" if results is not None else "KILLED" if stopped else "FAILED")
