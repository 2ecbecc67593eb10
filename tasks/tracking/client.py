"""MLflow configuration: which server, the client, the experiment, and telling an outage from other errors.

Configuration: ``MLFLOW_TRACKING_URI`` (and ``MLFLOW_REGISTRY_URI``) as MLflow users expect; otherwise an embedded
``sqlite:///<home>/mlflow.db`` with artifacts in ``<home>/mlartifacts``, home being ``$PALM_RLHF_HOME`` or
``./.palm-rlhf``. A local database named in ``MLFLOW_TRACKING_URI`` keeps its artifacts there too, not in MLflow's
``./mlruns`` of whatever directory a worker happens to run in. The experiment is ``$PALM_RLHF_EXPERIMENT`` (default
``palm-rlhf``).

Stages may run in Prefect worker threads, so everything goes through ``MlflowClient`` with explicit run ids; the
fluent ``mlflow.start_run`` state is process-global and is never touched here.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.outage import Unavailable
from tasks.redact import has_credentials, redact, redact_uri


class TrackingError(RuntimeError):
    """The tracking server or registry cannot do what the pipeline asked."""


class TrackingUnavailable(TrackingError, Unavailable):
    """The tracking server does not answer: worth retrying later, unlike other tracking errors."""


# --------------------------------------------------------------------------- configuration


def _home() -> Path:
    return Path(os.environ.get("PALM_RLHF_HOME") or ".palm-rlhf").expanduser().resolve()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded SQLite file under the project home."""
    uri = _setting("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = _home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def _setting(name: str) -> str:
    """A URI from the environment, refused when it carries credentials: MLflow prints the tracking URI (run links
    on stdout) and repeats it in its error messages, so they would end up in logs."""
    uri = os.environ.get(name, "").strip()
    if uri and has_credentials(uri):
        raise TrackingError(
            f"{name} {redact_uri(uri)}: credentials inside the URI are not supported; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, instead"
        )
    return uri


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks", "databricks-uc")


def _artifact_root(uri: str) -> str | None:
    """Where a local store keeps artifacts; MLflow's own default is ./mlruns of the cwd."""
    if is_remote(uri):
        return None  # the server decides (--artifacts-destination)
    return (_home() / "mlartifacts").as_uri()


@lru_cache(maxsize=8)
def _client(uri: str, registry: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=registry)


def get_client() -> MlflowClient:
    return _client(tracking_uri(), _setting("MLFLOW_REGISTRY_URI") or None)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def uninterrupted():
    """Hold Ctrl-C, SIGTERM and SIGHUP until the write inside has finished; they take effect right after.

    A stop raised in the middle of a write to a SQLite tracking store leaves that connection's transaction open,
    and the write that marks the run KILLED then fails with "database is locked": the run would stay RUNNING.
    Only local stores are held this way (a write to a server that is away retries for minutes, and a stop must
    not wait for that). The Python-level handlers are swapped, not the signal mask: any thread may take a signal
    sent to the process, but its handler always runs in the main thread, the only one that can swap handlers."""
    if threading.current_thread() is not threading.main_thread() or is_remote(tracking_uri()):
        yield
        return
    received: list[int] = []
    held = {}
    for signum in _STOP_SIGNALS:
        if signal.getsignal(signum) is not None:  # None: installed outside Python, cannot be put back
            held[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in received:
            handler = held[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def check_tracking() -> None:
    """Fail in a second or two, with one line, when tracking cannot be reached."""
    uri = tracking_uri()
    try:
        if is_remote(uri) and not uri.startswith("databricks"):
            _probe_server(uri)
        else:
            get_client().search_experiments(max_results=1)
    except Exception as exc:  # any failure here means: do not start the compute
        raise TrackingUnavailable(
            f"MLflow tracking at {redact_uri(uri)} is unreachable ({failure_reason(exc)}); "
            "start the server or fix MLFLOW_TRACKING_URI"
        ) from None


def reachable() -> bool:
    """One quick probe (no retries): does the tracking server answer right now?"""
    try:
        check_tracking()
    except TrackingUnavailable:
        return False
    return True


def is_tracking_failure(exc: BaseException) -> bool:
    """An error raised by talking to MLflow (as opposed to one of the stage's own)."""
    import requests

    return isinstance(exc, (MlflowException, TrackingError, requests.RequestException))


def failure_reason(exc: BaseException) -> str:
    """The gist of a failed probe; MLflow's own message nests three layers of urllib3."""
    text = str(exc)
    if "NameResolution" in text or "Failed to resolve" in text:
        return "host name not found"
    if "refused" in text or "Failed to establish" in text:
        return "connection refused"
    if "timed out" in text.lower():
        return "no answer within 5 s"
    if code := re.search(r"error code (\d+)", text):
        if code.group(1) in ("401", "403"):
            return f"HTTP {code.group(1)}: check MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN"
        return f"HTTP {code.group(1)}: is this an MLflow server?"
    return redact(text.splitlines()[0] if text else type(exc).__name__)[:200]


def _probe_server(uri: str) -> None:
    # One request, no retries: MLflow's defaults (7 retries, exponential backoff, 120 s
    # timeout) would turn a typo in the URI into minutes of silence.
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    endpoint = "/api/2.0/mlflow/experiments/search"
    response = http_request(
        get_default_host_creds(uri), endpoint, "POST", max_retries=0, backoff_factor=0,
        timeout=5, json={"max_results": 1},
    )
    verify_rest_response(response, endpoint)


# The MLflow UI opens an experiment in the view its kind names; without one it guesses (and may pick the GenAI view).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id() -> str:
    """The pipeline's experiment, created on first use (safe if two processes race)."""
    client, name = get_client(), os.environ.get("PALM_RLHF_EXPERIMENT") or "palm-rlhf"
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it "
                            "(mlflow experiments restore) or set PALM_RLHF_EXPERIMENT")
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    try:
        root = _artifact_root(tracking_uri())
        location = f"{root}/{_slug(name)}" if root else None
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "experiment"




def clean(value: object) -> str:
    """A value safe to store: secrets scrubbed, and a URI's secret query keys masked."""
    text = str(value)
    if "://" in text and not any(c.isspace() for c in text):
        text = redact_uri(text)
    return redact(text)


def quote(value: str) -> str:
    """A value inside single quotes of an MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")
