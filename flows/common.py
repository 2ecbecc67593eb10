"""Prefect pieces every stage flow shares: retry policy, input pinning, checkpoint verification, artifacts.

Compute tasks retry on failures that a rerun can fix (a storage or network error), and a retry resumes from the
last checkpoint, so it costs only the steps since then. Bad input never retries: it fails at once with its message.
"""

from __future__ import annotations

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks import tracking
from tasks.config import ConfigError
from tasks.redact import redact_uri
from tasks.stage import StageResult
from tasks.store import CheckpointError, StorageError, verify_checkpoint

# Errors that are the caller's to fix (bad settings, data, URIs): retrying would only repeat them.
PERMANENT = (ValueError, TypeError, KeyError, FloatingPointError, ConfigError)


def retry_unless_permanent(task, task_run, state) -> bool:
    try:
        state.result()
    except PERMANENT:
        return False
    except tracking.TrackingUnavailable:  # a tracking server that is restarting answers again
        return True
    except tracking.TrackingError:  # no such model or alias, a deleted experiment, a changed config
        return False
    except StorageError:  # a store that failed to answer may answer the next time
        return True
    except CheckpointError:  # a damaged or refused checkpoint stays so
        return False
    except Exception:
        return True
    return False


IO_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=retry_unless_permanent)


def compute_options() -> dict:
    """Tag the stage's task `gpu` where it will use one, so work-pool concurrency limits can count GPUs."""
    return {"tags": ["gpu" if torch.cuda.is_available() else "cpu"], "retries": 2, "retry_delay_seconds": 10,
            "retry_condition_fn": retry_unless_permanent}


@task(**IO_RETRIES)
def pin_model(uri: str | None) -> str | None:
    """Turn an alias into the exact version it names now (models:/palm-reward@champion -> models:/palm-reward/3),
    so that the stage, its lineage and any retry all use the same model."""
    if not uri or not uri.startswith("models:/"):
        return uri
    info = tracking.resolve_model_uri(uri)
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
