"""A stage's run: its run key, the cache, its MLflow run, its registered model, and the result it returns.

A stage's run key is a digest of its config (without runtime settings such as the device), of its inputs' digests and
of the code that computes it (tasks/runtime/fingerprint.py: a fix to PPO retrains PPO, an edit elsewhere does not).
Its checkpoints live under `<store>/<stage>/<run key>/`, so:
- the same stage with the same config and inputs finds its own final checkpoint and is reused (`cached: true`);
- the same command after a crash finds its last complete checkpoint and resumes from it;
- a different config, input or code writes under a different prefix and never touches another run's checkpoints
  (`runtime.reuse_across_code` reuses a run of other code, when its author knows the change is harmless);
- two processes given the same run key at once (a stage rerun racing the pipeline) do not both train: one holds the
  run key's lease (`RunLease`), the other waits for it and then reuses its result.

A training stage reads as:

    with stage_run("ppo", config, inputs=..., model_name="palm-policy", lineage=...) as run:
        if not run.cached:
            run.trained(*train(run, PPOTraining(...)))      # tasks.runtime.loop.train
    return run.result
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import torch
from pydantic import BaseModel

from models.sampling import sampling_dtype as dtype_for_sampling
from tasks.config import Runtime, as_params
from tasks.redact import redact, redact_uri
from tasks.runtime import signals
from tasks.runtime.fingerprint import stage_code
from tasks.runtime.lease import RunLease
from tasks.serving.export import log_model
from tasks.storage.store import join_uri, store_root
from tasks.storage.checkpoints import CheckpointRef, latest_checkpoint, read_manifest
from tasks.tracking import client as tracking
from tasks.tracking import registry, runs
from tasks.tracking.lineage import CODE_TAG

RUN_KEY_TAG = "palm_rlhf.run_key"
DATA_KEY_TAG = "palm_rlhf.data_key"  # the run key without the code: what runs of other code share
REUSED_TAG = "palm_rlhf.reused_across_code"
STAGE_TAG = "palm_rlhf.stage"
CANDIDATE, CHAMPION = "candidate", "champion"
FLOW_RUN_TAG = "prefect.flow_run_id"

log = logging.getLogger(__name__)


class StageResult(BaseModel):
    """The small result a stage returns: references and headline numbers, never tensors."""

    stage: str
    checkpoint_uri: str | None = None
    digest: str | None = None
    mlflow_run_id: str
    model_name: str | None = None
    model_version: str | None = None
    cached: bool = False
    run_key: str
    metrics: dict[str, float] = {}
    code: str | None = None  # the fingerprint of the code that made it (tasks/runtime/fingerprint.py)


@dataclass
class StageRun:
    """Where a stage writes, what it logs to and on which device; and, once done, what it returns.

    `run_id` is None on the nodes after node 0 of a multi-machine stage (node 0 owns the MLflow run; its ranks are
    told the id), and `metrics` is None in a worker process until it builds its own logger.
    """

    stage: str
    run_key: str
    prefix: str
    run_id: str | None
    config: BaseModel  # the stage's config, as the checkpoints' manifests record it
    device: torch.device
    amp_dtype: torch.dtype | None
    metrics: runs.MetricLogger | None = field(default=None, repr=False)
    resume_from: CheckpointRef | None = None
    result: StageResult | None = None
    code: str | None = None  # the stage's code fingerprint, recorded in every checkpoint it writes
    _finish: Callable | None = field(default=None, repr=False)

    @property
    def runtime(self) -> Runtime:
        return self.config.runtime

    @property
    def cached(self) -> bool:
        """An identical earlier run's result is already here: there is nothing to train."""
        return self.result is not None

    def trained(self, ref: CheckpointRef, metrics: dict[str, float]) -> None:
        """Hand over what training made: the final checkpoint and its headline metrics (registered on exit)."""
        self._finish(ref, metrics)


def resolve_runtime(runtime: Runtime) -> tuple[torch.device, torch.dtype | None]:
    """"auto" picks the GPU when there is one; bf16 autocast there, fp32 on CPU."""
    name = runtime.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device is {runtime.device!r} but this machine has no GPU")
    precision = runtime.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return device, (torch.bfloat16 if precision == "bf16" else None)


def sampling_dtype(runtime: Runtime, device: torch.device) -> torch.dtype | None:
    """The precision to draw tokens in (None: the model's own, fp32): runtime.sampling_precision, where "auto" is bf16
    on a GPU and fp32 on a CPU."""
    return dtype_for_sampling(runtime.sampling_precision, device)


def run_key(stage: str, config: BaseModel, inputs: dict[str, str | None], *, code: bool = True) -> str:
    """Digest of what determines a stage's output: its config (less runtime), its inputs' digests and its code's
    fingerprint (`code=False`: the data key, which runs of other code share)."""
    payload = {"stage": stage, "config": config.model_dump(exclude={"runtime"}, mode="json"), "inputs": inputs}
    if code:
        payload["code"] = stage_code(stage)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def stage_prefix(stage: str, key: str) -> str:
    return join_uri(store_root(), stage, key)


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("palm-rlhf")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent, text=True,
                             capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


def prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:  # not inside a flow run
        return None


# ---------------------------------------------------------------- training stages


@contextmanager
def stage_run(stage: str, config: BaseModel, *, inputs: dict[str, str | None], model_name: str,
              lineage: dict[str, str], parent_run_id: str | None = None,
              log_inputs: Callable[[str], None] | None = None) -> Iterator[StageRun]:
    """Everything around a training stage's loop.

    Reuse an identical earlier run (`run.cached`: the body has nothing to do), else hold the run key's lease, open (or
    reopen, when resuming) the MLflow run, and register the checkpoint the body hands to `run.trained` as the next
    version of `model_name`. Every check on bad input has been made by the caller before this point.
    """
    key, data_key = run_key(stage, config, inputs), run_key(stage, config, inputs, code=False)
    device, amp = resolve_runtime(config.runtime)  # a bad device fails before any run opens
    prefix, code = stage_prefix(stage, key), stage_code(stage)
    if config.runtime.node_rank > 0:  # this node only adds ranks to node 0's run, unless node 0 will find it done
        run = StageRun(stage, key, prefix, None, config, device, amp, code=code,
                       result=cached_result(stage, key, config.steps, model_name))
        run._finish = lambda ref, metrics: setattr(run, "result", _result(run, ref, metrics, model_name, None))
        yield run
        return

    def reusable() -> StageResult | None:
        hit = cached_result(stage, key, config.steps, model_name)
        if hit is None and config.runtime.reuse_across_code:
            hit = _result_of_other_code(stage, data_key, config.steps, model_name)
        return hit

    hit = reusable()
    if hit is not None:
        yield StageRun(stage, hit.run_key, prefix, hit.mlflow_run_id, config, device, amp, result=hit, code=code)
        return
    with RunLease(prefix, stage):
        hit = reusable()  # the lease's last holder may have just made it
        if hit is not None:
            yield StageRun(stage, hit.run_key, prefix, hit.mlflow_run_id, config, device, amp, result=hit, code=code)
            return
        with mlflow_run(stage, key, config, parent_run_id=parent_run_id, data_key=data_key) as run:
            if log_inputs is not None:
                log_inputs(run.run_id)

            def finish(ref: CheckpointRef, metrics: dict[str, float]) -> None:
                version = register(stage, model_name, ref, run.run_id, key, {**lineage, CODE_TAG: code})
                run.result = _result(run, ref, metrics, model_name, version)

            run._finish = finish
            yield run


def _result(run: StageRun, ref: CheckpointRef, metrics: dict, model_name: str, version: str | None) -> StageResult:
    return StageResult(stage=run.stage, checkpoint_uri=ref.uri, digest=ref.digest, mlflow_run_id=run.run_id,
                       model_name=model_name, model_version=version, run_key=run.run_key, metrics=metrics,
                       code=run.code)


@contextmanager
def mlflow_run(stage: str, key: str, config: BaseModel, *, parent_run_id: str | None,
               data_key: str | None = None) -> Iterator[StageRun]:
    """Open (or reopen, when resuming) the stage's MLflow run; mark it FAILED (KILLED when stopped) if the body
    raises."""
    prefix, code = stage_prefix(stage, key), stage_code(stage)
    device, amp = resolve_runtime(config.runtime)
    flow_run = prefect_flow_run_id()
    run_id = runs.find_run({RUN_KEY_TAG: key, STAGE_TAG: stage, "checkpoint_prefix": prefix})
    if run_id is None:
        tags = {RUN_KEY_TAG: key, STAGE_TAG: stage, "code_version": code_version(), "checkpoint_prefix": prefix,
                CODE_TAG: code}
        if data_key:
            tags[DATA_KEY_TAG] = data_key
        if flow_run:
            tags[FLOW_RUN_TAG] = flow_run
        run_id = runs.start_run(stage, parent_run_id=parent_run_id, tags=tags)
    else:
        runs.reopen_run(run_id)
        if flow_run:
            tracking.get_client().set_tag(run_id, FLOW_RUN_TAG, flow_run)
    runs.log_params(run_id, as_params(config), changeable=("runtime.",))
    # Metrics are sent when the training loop says so: once the checkpoint that covers them is published.
    run = StageRun(stage, key, prefix, run_id, config, device, amp, runs.MetricLogger(run_id, flush_every=None),
                   resume_from=latest_checkpoint(prefix), code=code)
    try:
        yield run
        run.metrics.flush(strict=True)
    except BaseException as exc:
        tracking_up = tracking.reachable()  # one quick probe: marking a run on a server that is gone takes minutes
        if tracking_up:
            _mark_failed(run, exc)
        if not tracking_up and tracking.is_tracking_failure(exc):
            raise tracking.TrackingUnavailable(_tracking_lost(run, exc)) from None
        raise
    runs.end_run(run_id, "FINISHED")


def _mark_failed(run: StageRun, exc: BaseException) -> None:
    """Best effort: the stage's own error is what the caller must see, not a second one from tracking. Metrics not
    sent yet stay unsent: those of steps after the last checkpoint will be logged again by the resumed run, and the
    others are in that checkpoint, to be resent (tasks/runtime/loop.py)."""
    try:
        tracking.get_client().set_tag(run.run_id, "error", redact(f"{type(exc).__name__}: {exc}")[:4000])
        runs.end_run(run.run_id, "KILLED" if signals.is_stop(exc) else "FAILED")
    except Exception:
        pass


def _tracking_lost(run: StageRun, exc: BaseException) -> str:
    try:
        latest = latest_checkpoint(run.prefix)
        kept = f"step {latest.step}" if latest else "none yet"
    except Exception:
        kept = "unknown: the store did not answer either"
    return (f"stage {run.stage}: MLflow tracking at {redact_uri(tracking.tracking_uri())} went away mid-stage "
            f"({tracking.failure_reason(exc)}); MLflow run {run.run_id} is left RUNNING, and the training is kept in "
            f"the checkpoints under {redact_uri(run.prefix)} (latest: {kept}): rerun the same command once MLflow "
            "answers to resume the stage and complete its run")


# ---------------------------------------------------------------- the registry and the cache


def registered_version(model_name: str, key: str, checkpoint_uri: str) -> str | None:
    """The version already registered for this run key's checkpoint (a cached or re-registered stage), if any.

    The checkpoint URI is part of the match: two stores sharing one tracking server can hold runs of one run key.
    """
    client = tracking.get_client()
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.`{RUN_KEY_TAG}` = '{key}' and "
                                             f"tags.checkpoint_uri = '{tracking.quote(redact_uri(checkpoint_uri))}'")
    except Exception:
        return None
    return str(min(int(v.version) for v in found)) if found else None


def register(stage_name: str, model_name: str, ref: CheckpointRef, run_id: str, key: str,
             lineage: dict[str, str]) -> str:
    """Register the stage's final checkpoint once per run key, as the MLflow model logged from it in the stage's run,
    with the tags that give lineage."""
    existing = registered_version(model_name, key, ref.uri)
    if existing is not None:
        return existing
    logged = log_model(run_id, ref.uri, ref.digest, model_name)
    tags = {RUN_KEY_TAG: key, STAGE_TAG: stage_name, "code_version": code_version(), **lineage,
            "model_bytes": str(logged.info["model_bytes"]), "checkpoint_bytes": str(logged.info["checkpoint_bytes"])}
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags[FLOW_RUN_TAG] = flow_run
    version = registry.register_checkpoint(model_name, checkpoint_uri=ref.uri, digest=ref.digest, run_id=run_id,
                                           lineage=tags, model_id=logged.model_id)
    first = registered_version(model_name, key, ref.uri)
    if first is not None and int(first) < int(version):
        # An identical run started at the same time registered this checkpoint a moment earlier: keep its version,
        # so that both runs (and their lineage) name one model.
        tracking.get_client().delete_model_version(model_name, version)
        version = first
    _point_candidate_at_newest(model_name)  # `champion` moves only on an eval win
    return version


def _point_candidate_at_newest(model_name: str) -> None:
    """`candidate` names the newest version. Runs registering at the same time each set it after registering, in
    any order, so one may set it back to an older version: set it until it names the newest."""
    client = tracking.get_client()
    for _ in range(10):
        newest = client.search_model_versions(f"name = '{tracking.quote(model_name)}'", max_results=1,
                                              order_by=["version_number DESC"])
        if not newest or registry.get_alias(model_name, CANDIDATE) == str(newest[0].version):
            return
        registry.set_alias(model_name, CANDIDATE, newest[0].version)


def cached_result(stage: str, key: str, steps: int, model_name: str | None) -> StageResult | None:
    """The earlier result of an identical stage run, when its final checkpoint and model version exist."""
    ref = latest_checkpoint(stage_prefix(stage, key))
    if ref is None or ref.step < steps:
        return None
    run_id = _finished_run(stage, key)
    version = registered_version(model_name, key, ref.uri) if model_name else None
    if run_id is None or (model_name and version is None):
        return None
    manifest = read_manifest(ref.uri)
    return StageResult(stage=stage, checkpoint_uri=ref.uri, digest=ref.digest, mlflow_run_id=run_id,
                       model_name=model_name, model_version=version, cached=True, run_key=key,
                       metrics=manifest.get("metrics", {}), code=(manifest.get("code") or {}).get("fingerprint"))


def _finished_run(stage: str, key: str) -> str | None:
    found = tracking.get_client().search_runs(
        [tracking.experiment_id()],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = '{stage}' and "
                      f"tags.checkpoint_prefix = '{tracking.quote(redact_uri(stage_prefix(stage, key)))}' and "
                      "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def _result_of_other_code(stage: str, data_key: str, steps: int, model_name: str) -> StageResult | None:
    """The newest finished run of this config and these inputs in this store, made by any code: what
    `runtime.reuse_across_code` reuses. The reuse is logged, and tagged on that run."""
    found = tracking.get_client().search_runs(
        [tracking.experiment_id()],
        filter_string=f"tags.`{DATA_KEY_TAG}` = '{data_key}' and tags.`{STAGE_TAG}` = '{stage}' and "
                      "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20)
    here = redact_uri(join_uri(store_root(), stage)) + "/"
    for run in found:
        key = run.data.tags.get(RUN_KEY_TAG, "")
        if not run.data.tags.get("checkpoint_prefix", "").startswith(here):
            continue  # another store's run: its checkpoints are not ours to name
        hit = cached_result(stage, key, steps, model_name)
        if hit is not None:
            code = stage_code(stage)
            log.warning("stage %s: reusing run %s, made by code %s, for this code (%s), as runtime.reuse_across_code "
                        "asks", stage, hit.mlflow_run_id, hit.code or "of an unknown version", code)
            tracking.get_client().set_tag(hit.mlflow_run_id, REUSED_TAG, code)
            return hit
    return None
