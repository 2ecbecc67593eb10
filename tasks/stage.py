"""What every stage shares: run keys, the cache, MLflow runs, resume, registration and the result it returns.

A stage's run key is a digest of its config (without runtime settings such as the device) and of its inputs' digests.
Its checkpoints live under `<store>/<stage>/<run key>/`, so:
- the same stage with the same config and inputs finds its own final checkpoint and is reused (`cached: true`);
- the same command after a crash finds its last complete checkpoint and resumes from it;
- a different config or input writes under a different prefix and never touches another run's checkpoints;
- two processes given the same run key at once (a stage rerun racing the pipeline) do not both train: one holds the
  run key's lease (`RunLease`), the other waits for it and then reuses its result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import BaseModel

from tasks import tracking
from tasks.config import Runtime
from tasks.redact import redact, redact_uri
from tasks.store import (CheckpointError, CheckpointRef, StorageError, create_file, join_uri, latest_checkpoint,
                         read_file, read_manifest, remove_file, replace_file, store_root)

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
LEASE_TTL_S = 60.0  # a holder that stops renewing for this long is presumed dead
LEASE_RENEW_S = 10.0
LEASE_POLL_S = 1.0
_HELD: set[str] = set()  # owners of the leases this process holds now (a failed release leaves a file behind)

RUN_KEY_TAG = "palm_rlhf.run_key"
STAGE_TAG = "palm_rlhf.stage"
CANDIDATE, CHAMPION = "candidate", "champion"
FLOW_RUN_TAG = "prefect.flow_run_id"


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


@dataclass
class StageRun:
    """Handed to a stage's training function: where to write, what to log to, and on which device."""

    stage: str
    run_key: str
    prefix: str
    run_id: str
    device: torch.device
    amp_dtype: torch.dtype | None
    metrics: tracking.MetricLogger = field(repr=False)
    resume_from: CheckpointRef | None = None


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


def run_key(stage: str, config: BaseModel, inputs: dict[str, str | None]) -> str:
    """Digest of what determines a stage's output: its config (less runtime) and its inputs' digests."""
    payload = {"stage": stage, "config": config.model_dump(exclude={"runtime"}, mode="json"), "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def stage_prefix(stage: str, key: str) -> str:
    return join_uri(store_root(), stage, key)


def final_checkpoint(prefix: str, steps: int) -> CheckpointRef | None:
    latest = latest_checkpoint(prefix)
    return latest if latest is not None and latest.step >= steps else None


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


def _quoted(value: str) -> str:
    """A value inside single quotes of an MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def registered_version(model_name: str, key: str, checkpoint_uri: str) -> str | None:
    """The version already registered for this run key's checkpoint (a cached or re-registered stage), if any.

    The checkpoint URI is part of the match: two stores sharing one tracking server can hold runs of one run key.
    """
    client = tracking.get_client()
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.`{RUN_KEY_TAG}` = '{key}' and "
                                             f"tags.checkpoint_uri = '{_quoted(redact_uri(checkpoint_uri))}'")
    except Exception:
        return None
    return str(min(int(v.version) for v in found)) if found else None


@contextmanager
def stage_run(stage: str, key: str, config: BaseModel, *, parent_run_id: str | None, steps: int):
    """Open (or reopen, when resuming) the stage's MLflow run; mark it FAILED if the body raises."""
    prefix = stage_prefix(stage, key)
    device, amp = resolve_runtime(getattr(config, "runtime", Runtime()))  # a bad device fails before any run opens
    flow_run = prefect_flow_run_id()
    run_id = tracking.find_run({RUN_KEY_TAG: key, STAGE_TAG: stage, "checkpoint_prefix": prefix})
    if run_id is None:
        tags = {RUN_KEY_TAG: key, STAGE_TAG: stage, "code_version": code_version(),
                "checkpoint_prefix": prefix}
        if flow_run:
            tags[FLOW_RUN_TAG] = flow_run
        run_id = tracking.start_run(stage, parent_run_id=parent_run_id, tags=tags)
    else:
        tracking.reopen_run(run_id)
        if flow_run:
            tracking.get_client().set_tag(run_id, FLOW_RUN_TAG, flow_run)
    tracking.log_params(run_id, config.model_dump(mode="json"))
    run = StageRun(stage, key, prefix, run_id, device, amp, tracking.MetricLogger(run_id),
                   resume_from=latest_checkpoint(prefix))
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
    tracking.end_run(run_id, "FINISHED")


def _mark_failed(run: StageRun, exc: BaseException) -> None:
    """Best effort: the stage's own error is what the caller must see, not a second one from tracking."""
    try:
        run.metrics.flush()
        tracking.get_client().set_tag(run.run_id, "error", redact(f"{type(exc).__name__}: {exc}")[:4000])
        tracking.end_run(run.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
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


def register(stage_name: str, model_name: str, ref: CheckpointRef, run_id: str, key: str,
             lineage: dict[str, str]) -> str:
    """Register the stage's final checkpoint once per run key, with the tags that give lineage."""
    existing = registered_version(model_name, key, ref.uri)
    if existing is not None:
        return existing
    tags = {RUN_KEY_TAG: key, STAGE_TAG: stage_name, "code_version": code_version(), **lineage}
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags[FLOW_RUN_TAG] = flow_run
    version = tracking.register_checkpoint(model_name, checkpoint_uri=ref.uri, digest=ref.digest, run_id=run_id,
                                           lineage=tags)
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
        newest = client.search_model_versions(f"name = '{_quoted(model_name)}'", max_results=1,
                                              order_by=["version_number DESC"])
        if not newest or tracking.get_alias(model_name, CANDIDATE) == str(newest[0].version):
            return
        tracking.set_alias(model_name, CANDIDATE, newest[0].version)


def cached_result(stage: str, key: str, steps: int, model_name: str | None) -> StageResult | None:
    """The earlier result of an identical stage run, when its final checkpoint and model version exist."""
    ref = final_checkpoint(stage_prefix(stage, key), steps)
    if ref is None:
        return None
    run_id = _finished_run(stage, key)
    version = registered_version(model_name, key, ref.uri) if model_name else None
    if run_id is None or (model_name and version is None):
        return None
    manifest = read_manifest(ref.uri)
    return StageResult(stage=stage, checkpoint_uri=ref.uri, digest=ref.digest, mlflow_run_id=run_id,
                       model_name=model_name, model_version=version, cached=True, run_key=key,
                       metrics=manifest.get("metrics", {}))


def _finished_run(stage: str, key: str) -> str | None:
    runs = tracking.get_client().search_runs(
        [tracking.experiment_id()],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = '{stage}' and "
                      f"tags.checkpoint_prefix = '{_quoted(redact_uri(stage_prefix(stage, key)))}' and "
                      "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


class RunLease:
    """One process at a time trains a run key: the others wait, then reuse its result.

    Two runs of one run key (a stage rerun racing the pipeline that runs the same stage) would write the same
    checkpoint folders and MLflow run. Bit-identical bytes would make that harmless, but a run key leaves out the
    device and the code version, so bytes can differ. The lease is ``<prefix>/_lease.json``, created exclusively
    (the store's atomic create); its holder renews it every LEASE_RENEW_S and removes it when done. A lease not
    renewed for LEASE_TTL_S, or held by a process of this host that no longer exists (a SIGKILLed stage), is
    abandoned and taken over, so a crash never blocks the rerun that resumes it.
    """

    def __init__(self, prefix: str, stage: str):
        self.uri, self.stage = join_uri(prefix, LEASE_FILE), stage
        self.holder = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="run-lease", daemon=True)

    def __enter__(self) -> "RunLease":
        told = False
        while not create_file(self.uri, self._body()):
            current = self._read()
            if current is None:  # released between our two calls
                continue
            if current.get("owner") == self.holder["owner"]:  # ours: only the answer to our create was lost
                break
            if _abandoned(current):
                remove_file(self.uri)
                continue
            if not told:
                log.warning("stage %s: %s (pid %s) is running it with the same configuration and inputs; waiting for "
                            "it to finish, to reuse its result", self.stage, current.get("host"), current.get("pid"))
                told = True
            time.sleep(LEASE_POLL_S)
        _HELD.add(self.holder["owner"])
        self._renewer.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        _HELD.discard(self.holder["owner"])
        if isinstance(exc, StorageError):  # the store just failed us: the lease expires on its own, and a rerun on
            return                         # this host takes it over at once (its holder is gone)
        self._renewer.join()
        try:
            if (self._read() or {}).get("owner") == self.holder["owner"]:
                remove_file(self.uri)
        except CheckpointError:  # the store is away: the lease expires on its own
            pass

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "expires_at": time.time() + LEASE_TTL_S}).encode()

    def _read(self) -> dict | None:
        raw = read_file(self.uri)
        try:
            return None if raw is None else json.loads(raw)
        except ValueError:
            return {}  # garbled: abandoned

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                if (self._read() or {}).get("owner") != self.holder["owner"]:
                    log.warning("stage %s: lost the run lease %s (taken over after a stall)", self.stage, self.uri)
                    return
                replace_file(self.uri, self._body())
            except CheckpointError:  # a store hiccup: try again at the next renewal, well before expiry
                continue


def _abandoned(lease: dict) -> bool:
    if not isinstance(lease.get("expires_at"), (int, float)) or time.time() > lease["expires_at"]:
        return True
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    if lease["pid"] == os.getpid():  # this process: abandoned unless one of its leases still holds it
        return lease.get("owner") not in _HELD
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def log_curves(run: StageRun, keys: list[str], title: str, artifact_file: str) -> None:
    """A PNG of the curves this run has (a tiny run may lack some, e.g. held-out pairs)."""
    present = [k for k in keys if run.metrics.history.get(k)]
    if present:
        tracking.log_plot(run.run_id, run.metrics.history, keys=present, title=title, artifact_file=artifact_file)


def resume_into(run: StageRun, module, generators: dict) -> tuple[int, "object | None"]:
    """Load the run's last complete checkpoint into `module` and the random streams; (step to continue from, it)."""
    if run.resume_from is None:
        return 0, None
    from models.training import restore_rng
    from tasks.store import load_checkpoint

    ckpt = load_checkpoint(run.resume_from.uri)
    module.load_state_dict(ckpt.weights)
    restore_rng(ckpt.state["rng"], generators)
    return ckpt.ref.step, ckpt


class Throughput:
    """Items per second over the last interval, for the progress bar and the metrics."""

    def __init__(self):
        self.last = time.perf_counter()

    def rate(self, items: float) -> float:
        now = time.perf_counter()
        rate = items / max(now - self.last, 1e-9)
        self.last = now
        return rate


def execute(stage: str, config: BaseModel, *, inputs: dict[str, str | None], model_name: str | None, train_fn,
            lineage: dict[str, str], parent_run_id: str | None = None, log_inputs=None) -> StageResult:
    """Run one stage: reuse an identical earlier run, else train (resuming if it was cut off) and register.

    train_fn(run) -> (final CheckpointRef, headline metrics). log_inputs(run_id) logs the MLflow datasets.
    Everything that can fail on bad input has been checked by the caller before this point.
    """
    key = run_key(stage, config, inputs)
    hit = cached_result(stage, key, config.steps, model_name)
    if hit is not None:
        return hit
    with RunLease(stage_prefix(stage, key), stage):
        # whoever held the lease before us may have just finished this very run
        hit = cached_result(stage, key, config.steps, model_name)
        if hit is not None:
            return hit
        return _train_and_register(stage, key, config, model_name, train_fn, lineage, parent_run_id, log_inputs)


def _train_and_register(stage, key, config, model_name, train_fn, lineage, parent_run_id, log_inputs) -> StageResult:
    with stage_run(stage, key, config, parent_run_id=parent_run_id, steps=config.steps) as run:
        if log_inputs is not None:
            log_inputs(run.run_id)
        # Python's global RNG is saved with the trainer state (models.training.capture_rng) though no stage draws
        # from it; unseeded, two identical runs would write different bytes at the same step and the store would
        # refuse the second. A resume restores the saved state over this seed.
        random.seed(key)
        ref, metrics = train_fn(run)
        version = register(stage, model_name, ref, run.run_id, key, lineage) if model_name else None
    return StageResult(stage=stage, checkpoint_uri=ref.uri, digest=ref.digest, mlflow_run_id=run.run_id,
                       model_name=model_name, model_version=version, cached=False, run_key=key, metrics=metrics)
