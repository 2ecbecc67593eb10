"""MLflow runs, metrics, datasets and the model registry for the pipeline.

One parent run per pipeline run, one nested run per stage (tag ``mlflow.parentRunId``).
Stages may run in Prefect worker threads, so everything goes through ``MlflowClient``
with explicit run ids; the fluent ``mlflow.start_run`` state is process-global and is
never touched here.

Configuration: ``MLFLOW_TRACKING_URI`` (and ``MLFLOW_REGISTRY_URI``) as MLflow users
expect; otherwise an embedded ``sqlite:///<home>/mlflow.db`` with artifacts in
``<home>/mlartifacts``, home being ``$PALM_RLHF_HOME`` or ``./.palm-rlhf``. A local
database named in ``MLFLOW_TRACKING_URI`` keeps its artifacts there too, not in MLflow's
``./mlruns`` of whatever directory a worker happens to run in. The experiment is
``$PALM_RLHF_EXPERIMENT`` (default ``palm-rlhf``).

Registry sources. A model version's ``source`` is the checkpoint URI in object storage
(credentials removed). MLflow 3.17's SQLite store accepts any source, and a tracking
server accepts ``s3://`` and other object-store URIs, but a server refuses ``file://``
URIs and local paths unless they lie inside the run's own artifact folder
(``mlflow/server/handlers.py::_validate_source_run``; a path traversal guard). For
that one case -- a local checkpoint registered through a server -- the checkpoint's
``manifest.json`` is logged to the run under ``checkpoint/`` and the version's source
is ``runs:/<run_id>/checkpoint``. Either way the real location is the version tag
``checkpoint_uri`` and the content digest is ``checkpoint_digest``: readers use the
tags (``resolve_model_uri``), never ``source``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.redact import has_credentials, redact, redact_uri

PARENT_TAG = "mlflow.parentRunId"
CONTEXT_TAG = "mlflow.data.context"
_TABLES_TAG = "mlflow.loggedArtifacts"  # what the UI reads to show a JSON artifact as a table
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_MAX_DIGEST_LEN = 36  # MLflow's limit on a dataset digest (a sha256 does not fit)


class TrackingError(RuntimeError):
    """The tracking server or registry cannot do what the pipeline asked."""


class TrackingUnavailable(TrackingError):
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


def _is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks", "databricks-uc")


def _artifact_root(uri: str) -> str | None:
    """Where a local store keeps artifacts; MLflow's own default is ./mlruns of the cwd."""
    if _is_remote(uri):
        return None  # the server decides (--artifacts-destination)
    return (_home() / "mlartifacts").as_uri()


@lru_cache(maxsize=8)
def _client(uri: str, registry: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=registry)


def get_client() -> MlflowClient:
    return _client(tracking_uri(), _setting("MLFLOW_REGISTRY_URI") or None)


def check_tracking() -> None:
    """Fail in a second or two, with one line, when tracking cannot be reached."""
    uri = tracking_uri()
    try:
        if _is_remote(uri) and not uri.startswith("databricks"):
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


def experiment_id() -> str:
    """The pipeline's experiment, created on first use (safe if two processes race)."""
    client, name = get_client(), os.environ.get("PALM_RLHF_EXPERIMENT") or "palm-rlhf"
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it "
                            "(mlflow experiments restore) or set PALM_RLHF_EXPERIMENT")
    if found is not None:
        return found.experiment_id
    try:
        root = _artifact_root(tracking_uri())
        location = f"{root}/{_slug(name)}" if root else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "experiment"


# --------------------------------------------------------------------------- runs


def _clean(value: object) -> str:
    """A value safe to store: secrets scrubbed, and a URI's secret query keys masked."""
    text = str(value)
    if "://" in text and not any(c.isspace() for c in text):
        text = redact_uri(text)
    return redact(text)


def start_run(name: str, *, parent_run_id: str | None = None, tags: dict = {}) -> str:
    all_tags = {k: _clean(v) for k, v in tags.items()}
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
    clauses = [f"tags.`{key}` = '{_quote(_clean(value))}'" for key, value in tags.items()]
    runs = get_client().search_runs(
        [experiment_id()], filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


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


def log_params(run_id: str, params: dict) -> None:
    """Flattened ``a.b.c`` params; logging the same values again (a resume) is a no-op."""
    client = get_client()
    wanted = {k: _clean(v)[:_MAX_PARAM_LEN] for k, v in _flatten(params).items()}
    logged = client.get_run(run_id).data.params
    changed = [k for k, v in wanted.items() if k in logged and logged[k] != v]
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
    """Per-step metrics, sent every ``flush_every`` calls to ``log``, with the whole
    history kept for plots. Call ``flush`` (or use it as a context manager) at the end.

    A flush that fails keeps its metrics for the next one instead of raising: training
    loops flush right before they checkpoint, and a tracking server that went away must
    not cost the checkpoint. While the server stays away, each flush costs one quick
    probe instead of MLflow's own retries (minutes). ``flush(strict=True)`` raises
    ``TrackingUnavailable`` when metrics are still unsent.
    """

    def __init__(self, run_id: str, flush_every: int = 50):
        self.run_id = run_id
        self.flush_every = max(1, flush_every)
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
            due = self._calls % self.flush_every == 0
        if due:
            self.flush()

    def flush(self, strict: bool = False) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        sent = 0
        try:
            if pending and self.failure is not None:
                check_tracking()  # still away? one quick probe, not MLflow's retries
            client = get_client()
            for sent in range(0, len(pending), 1000):  # MLflow takes 1000 metrics per batch
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


# --------------------------------------------------------------------------- datasets and artifacts


def _source_type(uri: str) -> str:
    scheme = urlsplit(uri).scheme
    return "local" if scheme in ("", "file") or len(scheme) == 1 else scheme  # len 1: C:\ paths


def _log_dataset(run_id, *, name, source_uri, digest, context, schema=None, profile=None) -> None:
    # The full digest goes in the profile: a dataset digest column holds 36 characters.
    short = digest if len(digest) <= _MAX_DIGEST_LEN else digest.split(":")[-1][:_MAX_DIGEST_LEN]
    entity = Dataset(
        name=name, digest=short, source_type=_source_type(source_uri),
        source=json.dumps({"uri": _clean(source_uri)}), schema=schema,
        profile=json.dumps({**(profile or {}), "digest": digest}),
    )
    get_client().log_inputs(run_id, [DatasetInput(entity, [InputTag(CONTEXT_TAG, context)])])


def log_text_dataset(run_id, *, name, source_uri, digest, context: str, preview: str | None = None):
    """A text corpus as a dataset input of the run (metadata only; the corpus stays put)."""
    profile = {"preview": _clean(preview[:500])} if preview else None
    _log_dataset(run_id, name=name, source_uri=source_uri, digest=digest, context=context,
                 profile=profile)


def log_frame_dataset(run_id, frame, *, name, source_uri, digest, context: str):
    """A pandas table as a dataset input of the run, with MLflow's schema and row counts."""
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource

    # MLflow warns on every integer column when it infers a schema; it is not actionable here.
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    described = mlflow.data.from_pandas(frame, source=CodeDatasetSource({}), name=name, digest=digest)
    described = described.to_dict()
    _log_dataset(run_id, name=name, source_uri=source_uri, digest=digest, context=context,
                 schema=described.get("schema"), profile=json.loads(described.get("profile") or "{}"))


def log_plot(run_id, history: dict[str, list[tuple[int, float]]], *, keys: list[str], title: str,
             artifact_file: str) -> None:
    """One line chart per metric, stacked and sharing the step axis, as a PNG artifact."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    missing = [k for k in keys if not history.get(k)]
    if missing:
        raise TrackingError(f"log_plot: no history for {missing}; have {sorted(history)}")
    # A bare Figure with its own Agg canvas: pyplot's global figure list is not thread-safe.
    figure = Figure(figsize=(7, 2.2 * len(keys)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        steps, values = zip(*history[key])
        ax.plot(steps, values, linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    get_client().log_figure(run_id, figure, artifact_file)


def log_table(run_id, frame, artifact_file: str) -> None:
    """A table the MLflow UI shows (JSON, split orient) plus a CSV copy beside it.

    Written directly rather than with ``MlflowClient.log_table``, which appends to an
    existing file: a resumed stage would double its rows.
    """
    if not artifact_file.endswith(".json"):
        raise TrackingError(f"log_table: artifact_file must end in .json, got {artifact_file!r}")
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object or str(frame[column].dtype) in ("str", "string"):
            frame[column] = frame[column].map(lambda v: _clean(v) if isinstance(v, str) else v)
    client = get_client()
    client.log_text(run_id, frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
    client.log_text(run_id, frame.to_csv(index=False), artifact_file[: -len(".json")] + ".csv")
    tables = json.loads(client.get_run(run_id).data.tags.get(_TABLES_TAG, "[]"))
    if {"path": artifact_file, "type": "table"} not in tables:
        tables.append({"path": artifact_file, "type": "table"})
        client.set_tag(run_id, _TABLES_TAG, json.dumps(tables))


def log_text(run_id, text: str, artifact_file: str) -> None:
    get_client().log_text(run_id, redact(text), artifact_file)


# --------------------------------------------------------------------------- registry


def _is_local(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1


def _version_source(checkpoint_uri: str, run_id: str) -> str:
    """The legal ``source`` for a version (see the module docstring)."""
    if not (_is_local(checkpoint_uri) and _is_remote(tracking_uri())):
        return checkpoint_uri
    import fsspec

    manifest = checkpoint_uri.rstrip("/") + "/manifest.json"
    try:
        with fsspec.open(manifest, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise TrackingError(f"cannot register {checkpoint_uri}: no {manifest}") from None
    get_client().log_text(run_id, text, "checkpoint/manifest.json")
    return f"runs:/{run_id}/checkpoint"


def register_checkpoint(model_name: str, *, checkpoint_uri: str, digest: str, run_id: str,
                        lineage: dict[str, str], description: str | None = None) -> str:
    """Register a checkpoint as the next version of ``model_name``; returns the version.

    Versions are numbered by the registry itself, so two processes registering at once
    get distinct numbers; the registered model is created on first use.
    """
    client, clean_uri = get_client(), _clean(checkpoint_uri)
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {k: _clean(v) for k, v in lineage.items()}
    tags.update(checkpoint_uri=clean_uri, checkpoint_digest=digest, mlflow_run_id=run_id)
    version = client.create_model_version(
        model_name, _version_source(clean_uri, run_id), run_id=run_id, tags=tags,
        description=description,
    )
    return str(version.version)


def set_alias(model_name: str, alias: str, version) -> None:
    get_client().set_registered_model_alias(model_name, alias, str(version))


def get_alias(model_name: str, alias: str) -> str | None:
    try:
        return str(get_client().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    else:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise TrackingError(
        f"bad model URI {uri!r}: use models:/<name>@<alias> or models:/<name>/<version>"
    )


def _what_exists(client: MlflowClient, name: str) -> str:
    model = client.get_registered_model(name)
    aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
    versions = client.search_model_versions(f"name = '{_quote(name)}'", max_results=5,
                                            order_by=["version_number DESC"])
    latest = ", ".join(f"v{mv.version}" for mv in versions) or "none"
    return f"aliases: {aliases}; latest versions: {latest}"


def _model_version(client: MlflowClient, uri: str):
    name, version, alias = _parse_model_uri(uri)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise TrackingError(f"{uri}: no registered model {name!r}; registered: {known or 'none'}") from None
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        missing = f"alias @{alias}" if alias else f"version {version}"
        raise TrackingError(f"{uri}: {name} has no {missing}; {_what_exists(client, name)}") from None


def resolve_model_uri(uri: str) -> dict:
    """What a stage needs to load a model, from a registry URI or a plain checkpoint URI."""
    if not uri.startswith("models:/"):
        return {"name": None, "version": None, "checkpoint_uri": uri, "digest": None,
                "run_id": None, "tags": {}, "aliases": []}
    check_tracking()  # a clear line in seconds, not MLflow's minutes of retries, when the server is away
    mv = _model_version(get_client(), uri)
    tags = dict(mv.tags)
    return {
        "name": mv.name,
        "version": str(mv.version),
        "checkpoint_uri": tags.get("checkpoint_uri", mv.source),
        "digest": tags.get("checkpoint_digest"),
        "run_id": mv.run_id or tags.get("mlflow_run_id"),
        "tags": tags,
        "aliases": list(getattr(mv, "aliases", []) or []),
    }
