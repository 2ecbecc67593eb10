"""The model registry: register a stage's checkpoint as a model version with its lineage tags, move aliases, and
resolve ``models:/name@alias`` back to the checkpoint it names.

Registry sources. A model version's ``source`` is the checkpoint URI in object storage (credentials removed). MLflow
3.17's SQLite store accepts any source, and a tracking server accepts ``s3://`` and other object-store URIs, but a
server refuses ``file://`` URIs and local paths unless they lie inside the run's own artifact folder
(``mlflow/server/handlers.py::_validate_source_run``; a path traversal guard). For that one case -- a local
checkpoint registered through a server -- the checkpoint's ``manifest.json`` is logged to the run under
``checkpoint/`` and the version's source is ``runs:/<run_id>/checkpoint``. Either way the real location is the
version tag ``checkpoint_uri`` and the content digest is ``checkpoint_digest``: readers use the tags
(``resolve_model_uri``), never ``source``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.tracking.client import TrackingError, check_tracking, clean, get_client, is_remote, quote, tracking_uri

MODEL_VERSIONS_TAG = "mlflow.modelVersions"



def _is_local(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1


def _version_source(checkpoint_uri: str, run_id: str) -> str:
    """The legal ``source`` for a version (see the module docstring)."""
    if not (_is_local(checkpoint_uri) and is_remote(tracking_uri())):
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
                        lineage: dict[str, str], description: str | None = None, model_id: str | None = None) -> str:
    """Register a checkpoint as the next version of ``model_name``; returns the version.

    With ``model_id`` (the MLflow model the stage logged from this checkpoint, as the pipeline always gives) the
    version is that model: it loads, serves and shows its schema; without, it only points at the checkpoint.
    Versions are numbered by the registry itself, so two processes registering at once
    get distinct numbers; the registered model is created on first use.
    """
    client, clean_uri = get_client(), clean(checkpoint_uri)
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {k: clean(v) for k, v in lineage.items()}
    tags.update(checkpoint_uri=clean_uri, checkpoint_digest=digest, mlflow_run_id=run_id)
    source = f"models:/{model_id}" if model_id else _version_source(clean_uri, run_id)
    with _store_resolves_through(tracking_uri()):
        version = client.create_model_version(model_name, source, run_id=run_id, tags=tags, description=description,
                                              model_id=model_id)
    if model_id:  # the logged model's page lists the versions made from it, as mlflow.register_model records them
        _link_logged_model(client, model_id, model_name, str(version.version))
    return str(version.version)


@contextmanager
def _store_resolves_through(uri: str) -> Iterator[None]:
    """A local (SQL) registry store resolves a models:/<model_id> source through MLflow's process-wide tracking URI,
    not its client's (a TODO in mlflow/store/model_registry/sqlalchemy_store.py::create_model_version): for this one
    call it is ours, without touching MLFLOW_TRACKING_URI (which mlflow.set_tracking_uri would rewrite)."""
    from mlflow.tracking._tracking_service import utils

    before, utils._tracking_uri = utils._tracking_uri, uri
    try:
        yield
    finally:
        utils._tracking_uri = before


def _link_logged_model(client: MlflowClient, model_id: str, model_name: str, version: str) -> None:
    versions = json.loads(client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
    versions.append({"name": model_name, "version": version})
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})


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
    versions = client.search_model_versions(f"name = '{quote(name)}'", max_results=5,
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


def _model_id(mv) -> str | None:
    """The logged MLflow model a version is (None for a version that only points at a checkpoint). Some stores keep
    it only in the version's source, models:/<model_id>."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    return source[len("models:/"):] if re.fullmatch(r"models:/m-[0-9a-f]+", source) else None


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
        "model_id": _model_id(mv),
        "tags": tags,
        "aliases": list(getattr(mv, "aliases", []) or []),
    }
