"""`palm-rlhf generate`'s side of serving: open a model by its URI, take prompts from where a user has them, and write
the answers where they want them.

A registry URI opens the MLflow model the stage logged (its bundle, read by the same code the served model runs); a
checkpoint URI builds that bundle from the checkpoint first.
"""

from __future__ import annotations

import json
import posixpath
import sys
import tempfile
from pathlib import Path

import fsspec
import pandas as pd

from tasks.data.prompts import read_prompts
from tasks.redact import redact_uri
from tasks.serving.bundle import Bundle, BundleError, read_bundle
from tasks.serving.generation import GenerationError

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")


def open_model(uri: str, device: str | None = None, sampling_precision: str = "auto") -> Bundle:
    """The served model behind a registry URI (models:/name@alias, models:/name/3) or a checkpoint URI."""
    if uri.startswith("models:/"):
        return read_bundle(_download_bundle(uri), device, sampling_precision)
    from tasks.serving.export import write_bundle

    folder = Path(tempfile.mkdtemp(prefix="palm-rlhf-bundle-"))
    write_bundle(uri, folder)
    return read_bundle(folder, device, sampling_precision)


def _download_bundle(uri: str) -> Path:
    import mlflow
    from mlflow.models import Model

    from tasks.tracking.client import get_client, tracking_uri
    from tasks.tracking.registry import resolve_model_uri

    info = resolve_model_uri(uri)  # an unknown name, alias or version is one clear line, with what does exist
    source = f"models:/{info['name']}/{info['version']}"
    version = f"{info['name']} version {info['version']}"
    if not info.get("model_id"):
        raise BundleError(f"{uri}: {version} points at a checkpoint but holds no MLflow model (registered before "
                          f"models were logged with versions): rerun its stage, or pass its checkpoint URI "
                          f"{info['checkpoint_uri']}")
    root = get_client().get_logged_model(info["model_id"]).artifact_location.rstrip("/")
    folder = Path(tempfile.mkdtemp(prefix="palm-rlhf-model-"))
    download = dict(dst_path=str(folder), tracking_uri=tracking_uri())
    mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", **download)
    flavor = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {})
    bundle = flavor.get("artifacts", {}).get("bundle", {}).get("path")
    if bundle is None:
        raise BundleError(f"{source}: {version} is an MLflow model, but not one this project logged (no bundle)")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{bundle}", **download))


def request_prompts(prompts: list[str], input_url: str | None) -> list[str]:
    """Prompts given as arguments, in a file (JSONL/CSV/Parquet with a `prompt` column, or text lines) at any fsspec
    URL, or one per line on stdin."""
    if prompts and input_url:
        raise GenerationError("give prompts as arguments or --input, not both")
    if input_url:
        return read_prompts(input_url)
    if prompts:
        return list(prompts)
    if sys.stdin.isatty():
        raise GenerationError("no prompts: give them as arguments, one per line on stdin, or --input FILE_URL")
    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not lines:
        raise GenerationError("no prompts on stdin")
    return lines


def check_output(output_url: str | None) -> None:
    """Before any compute: the output file's format is one this writes."""
    if output_url and posixpath.splitext(output_url.lower())[1] not in OUTPUT_SUFFIXES:
        raise GenerationError(f"--output {redact_uri(output_url)}: name a {', '.join(OUTPUT_SUFFIXES)} file")


def write_answers(answers: list[dict], output_url: str | None, as_json: bool) -> None:
    """To the output file (by its suffix), else to stdout: one completion per line, or one JSON object per line."""
    if output_url:
        frame = pd.DataFrame(answers)
        with fsspec.open(output_url, "wb", auto_mkdir=True) as f:
            suffix = posixpath.splitext(output_url.lower())[1]
            if suffix == ".parquet":
                frame.to_parquet(f, index=False)
            elif suffix == ".csv":
                f.write(frame.to_csv(index=False).encode())
            else:
                f.write(frame.to_json(orient="records", lines=True, force_ascii=False).encode())
        return
    for answer in answers:
        print(json.dumps(answer, ensure_ascii=False) if as_json else answer["completion"], flush=True)
