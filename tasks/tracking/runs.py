"""MLflow runs of the pipeline: one parent run per pipeline run, one nested run per stage, params and metrics.

A stage run is nested under its pipeline's run with the tag ``mlflow.parentRunId``.
"""

from __future__ import annotations

import math
import threading
import time

from mlflow.entities import Metric, Param

from tasks.redact import redact_uri
from tasks.tracking.client import (TrackingError, TrackingUnavailable, check_tracking, clean, experiment_id,
                                   failure_reason, get_client, quote, tracking_uri, uninterrupted)

PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def start_run(name: str, *, parent_run_id: str | None = None, tags: dict = {}) -> str:
    all_tags = {k: clean(v) for k, v in tags.items()}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return get_client().create_run(experiment_id(), run_name=name, tags=all_tags).info.run_id


def reopen_run(run_id: str) -> None:
    """Mark a run found by ``find_run`` as running again (a resumed stage)."""
    client = get_client()
    error = client.get_run(run_id).data.tags.get("error")
    if error is not None:  # what stopped the earlier attempt: history now, not the state of a run that goes on
        client.set_tag(run_id, "resumed_after_error", error)
        client.delete_tag(run_id, "error")
    client.update_run(run_id, status="RUNNING")


def end_run(run_id: str, status: str = "FINISHED") -> None:
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise TrackingError(f"end_run status must be FINISHED, FAILED or KILLED, not {status!r}")
    get_client().set_terminated(run_id, status=status)


def find_run(tags: dict) -> str | None:
    """The newest run of the experiment that carries all these tags, if any."""
    if not tags:
        raise TrackingError("find_run needs at least one tag to match")
    clauses = [f"tags.`{key}` = '{quote(clean(value))}'" for key, value in tags.items()]
    runs = get_client().search_runs(
        [experiment_id()], filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _flatten(params: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in params.items():
        if hasattr(value, "model_dump"):  # a nested pydantic config
            value = value.model_dump()
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_params(run_id: str, params: dict, changeable: tuple[str, ...] = ()) -> None:
    """Flattened ``a.b.c`` params; logging the same values again (a resume) is a no-op.

    A param under a ``changeable`` prefix (where the run happens, not what it computes) may differ on a resume: the
    first value stays the param (MLflow params never change) and the new one is tagged ``resumed_with.<name>``.
    """
    client = get_client()
    wanted = {k: clean(v)[:_MAX_PARAM_LEN] for k, v in _flatten(params).items()}
    logged = client.get_run(run_id).data.params
    changed = [k for k, v in wanted.items() if k in logged and logged[k] != v]
    for key in [k for k in changed if k.startswith(changeable)] if changeable else []:
        client.set_tag(run_id, f"resumed_with.{key}", wanted[key])
        changed.remove(key)
    if changed:
        key = changed[0]
        raise TrackingError(
            f"run {run_id} already has param {key}={logged[key]!r}, not {wanted[key]!r}: "
            "a resumed stage must use the configuration it started with"
        )
    fresh = [Param(k, v) for k, v in wanted.items() if k not in logged]
    for start in range(0, len(fresh), 100):  # MLflow takes 100 params per batch
        client.log_batch(run_id, params=fresh[start : start + 100])


class MetricLogger:
    """Per-step metrics, sent every ``flush_every`` calls to ``log`` (``None``: only when ``flush`` is
    called), with the whole history kept for plots. Call ``flush`` (or use it as a context manager) at
    the end.

    ``unsent()`` lists what MLflow has not acknowledged yet, each metric with the timestamp it was
    logged at, and ``resend`` queues such a list again: MLflow keeps one copy of a metric whose key,
    value, timestamp and step are all the same, so sending one twice is harmless. A training loop
    keeps the unsent metrics in the checkpoint that covers their steps and resends them on resume
    (tasks/runtime/loop.py): every step lands exactly once, however the run was cut off.

    A flush that fails keeps its metrics for the next one instead of raising: training
    loops flush right before they checkpoint, and a tracking server that went away must
    not cost the checkpoint. While the server stays away, each flush costs one quick
    probe instead of MLflow's own retries (minutes). ``flush(strict=True)`` raises
    ``TrackingUnavailable`` when metrics are still unsent.
    """

    def __init__(self, run_id: str, flush_every: int | None = 50):
        self.run_id = run_id
        self.flush_every = None if flush_every is None else max(1, flush_every)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._pending: list[Metric] = []
        self._calls = 0
        self._lock = threading.Lock()
        self.failure: str | None = None  # why the last flush failed; None once one succeeds

    def log(self, step: int, **metrics: float) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                value = float(value)
                self.history.setdefault(key, []).append((step, value))
                self._pending.append(Metric(key, value, now, step))
            self._calls += 1
            due = self.flush_every is not None and self._calls % self.flush_every == 0
        if due:
            self.flush()

    def unsent(self) -> list[list]:
        """[key, value, timestamp in ms, step] of every metric not yet acknowledged, in order; a NaN or
        infinite value as its name ("nan", "inf", "-inf"), so the list is plain JSON."""
        with self._lock:
            return [[m.key, m.value if math.isfinite(m.value) else str(m.value), m.timestamp, m.step]
                    for m in self._pending]

    def resend(self, records: list[list]) -> None:
        """Queue metrics listed by ``unsent`` (of this run, perhaps already sent) ahead of anything newer."""
        metrics = [Metric(key, float(value), int(timestamp), int(step)) for key, value, timestamp, step in records]
        with self._lock:
            self._pending[:0] = metrics

    def flush(self, strict: bool = False) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        sent = 0
        try:
            if pending and self.failure is not None:
                check_tracking()  # still away? one quick probe, not MLflow's retries
            client = get_client()
            for sent in range(0, len(pending), 1000):  # MLflow takes 1000 metrics per batch
                with uninterrupted():
                    client.log_batch(self.run_id, metrics=pending[sent : sent + 1000])
            sent, self.failure = len(pending), None
        except Exception as exc:
            with self._lock:  # keep what was not sent, in order, ahead of anything logged since
                self._pending[:0] = pending[sent:]
            self.failure = f"{type(exc).__name__}: {failure_reason(exc)}"
        if strict and self._pending:
            raise TrackingUnavailable(f"{len(self._pending)} metrics of run {self.run_id} could not be sent "
                                      f"to MLflow at {redact_uri(tracking_uri())} ({self.failure})")

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
