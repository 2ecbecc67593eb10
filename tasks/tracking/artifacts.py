"""What a run shows people: its input datasets, plots, tables and text, as MLflow artifacts."""

from __future__ import annotations

import json
import warnings
from urllib.parse import urlsplit

from mlflow.entities import Dataset, DatasetInput, InputTag

from tasks.redact import redact
from tasks.tracking.client import TrackingError, clean, get_client

CONTEXT_TAG = "mlflow.data.context"
_TABLES_TAG = "mlflow.loggedArtifacts"  # what the UI reads to show a JSON artifact as a table
_MAX_DIGEST_LEN = 36  # MLflow's limit on a dataset digest (a sha256 does not fit)



def _source_type(uri: str) -> str:
    scheme = urlsplit(uri).scheme
    return "local" if scheme in ("", "file") or len(scheme) == 1 else scheme  # len 1: C:\ paths


def _log_dataset(run_id, *, name, source_uri, digest, context, schema=None, profile=None) -> None:
    # The full digest goes in the profile: a dataset digest column holds 36 characters.
    short = digest if len(digest) <= _MAX_DIGEST_LEN else digest.split(":")[-1][:_MAX_DIGEST_LEN]
    entity = Dataset(
        name=name, digest=short, source_type=_source_type(source_uri),
        source=json.dumps({"uri": clean(source_uri)}), schema=schema,
        profile=json.dumps({**(profile or {}), "digest": digest}),
    )
    get_client().log_inputs(run_id, [DatasetInput(entity, [InputTag(CONTEXT_TAG, context)])])


def log_text_dataset(run_id, *, name, source_uri, digest, context: str, preview: str | None = None):
    """A text corpus as a dataset input of the run (metadata only; the corpus stays put)."""
    profile = {"preview": clean(preview[:500])} if preview else None
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


def log_curves(run_id, history: dict[str, list[tuple[int, float]]], keys: list[str], title: str,
               artifact_file: str) -> None:
    """log_plot of the curves this run has (a tiny run may lack some, e.g. held-out pairs); nothing when none."""
    present = [k for k in keys if history.get(k)]
    if present:
        log_plot(run_id, history, keys=present, title=title, artifact_file=artifact_file)


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
            frame[column] = frame[column].map(lambda v: clean(v) if isinstance(v, str) else v)
    client = get_client()
    client.log_text(run_id, frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
    client.log_text(run_id, frame.to_csv(index=False), artifact_file[: -len(".json")] + ".csv")
    tables = json.loads(client.get_run(run_id).data.tags.get(_TABLES_TAG, "[]"))
    if {"path": artifact_file, "type": "table"} not in tables:
        tables.append({"path": artifact_file, "type": "table"})
        client.set_tag(run_id, _TABLES_TAG, json.dumps(tables))


def log_text(run_id, text: str, artifact_file: str) -> None:
    get_client().log_text(run_id, redact(text), artifact_file)
