"""A stage's final checkpoint as a served model: its bundle (bundle.py) written from the checkpoint, and logged as an
MLflow model (pyfunc, models-from-code) in the stage's own run, ready to register.

The checkpoint stays the source of truth for resume and caching: the bundle's weights are the checkpoint's own bytes,
checked against its digest (a policy's are the actor's LoRA merged into the base, made from verified weights and
recorded with their own sha256).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import safetensors.torch

import models
import tasks
from tasks.redact import redact_uri
from tasks.serving.bundle import BUNDLE_FORMAT, MODEL_JSON, REWARD_WEIGHTS, TOKENIZER, WEIGHTS, file_entry
from tasks.storage.checkpoints import CheckpointError, checkpoint_file, weights_file
from tasks.storage.inputs import load_policy, resolve_input

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
REQUIREMENTS = ("torch", "einops", "safetensors", "numpy", "pandas", "mlflow")  # what loading and serving import


@dataclass
class LoggedModel:
    model_id: str
    model_uri: str  # models:/<model_id>
    info: dict  # the bundle's model.json


def write_bundle(checkpoint_uri: str, folder: Path, digest: str | None = None) -> dict:
    """Write the served model of a palm, reward or policy checkpoint into `folder`; returns its model.json.

    `digest` (the registry's or the stage's) must be the checkpoint's: the weights served are the ones trained.
    """
    weights, manifest = weights_file(checkpoint_uri)
    if digest is not None and manifest["digest"] != digest:
        raise CheckpointError(f"checkpoint {redact_uri(checkpoint_uri)} has digest {manifest['digest']}, not {digest}")
    kind = manifest["kind"]
    files: dict[str, bytes] = {TOKENIZER: checkpoint_file(checkpoint_uri, TOKENIZER)}  # checked against its manifest
    info = {"format": BUNDLE_FORMAT, "kind": kind, "tokenizer": manifest["tokenizer"],
            "source": {"checkpoint_uri": redact_uri(checkpoint_uri), "digest": manifest["digest"]},
            "checkpoint_bytes": sum(f["bytes"] for f in manifest["files"].values())}
    if kind == "palm":
        info["palm"] = manifest["model_config"]
        files[WEIGHTS] = weights
    elif kind == "reward":
        info["reward"] = _reward_info(manifest)
        files[WEIGHTS] = weights
    elif kind == "policy":
        policy = load_policy(resolve_input(checkpoint_uri, "policy", "policy"), "cpu").merged_policy()
        info["palm"] = manifest["model_config"]["palm"]
        files[WEIGHTS] = safetensors.torch.save({k: v.contiguous() for k, v in policy.state_dict().items()})
        reward = manifest.get("reward_model")
        if reward is None:
            raise CheckpointError(f"policy {redact_uri(checkpoint_uri)} does not record the reward model it was "
                                  "trained against: it cannot serve best-of-n")
        files[REWARD_WEIGHTS], reward_manifest = weights_file(reward["uri"])
        if reward_manifest["digest"] != reward["digest"]:
            raise CheckpointError(f"the reward model at {redact_uri(reward['uri'])} changed since the policy was "
                                  f"trained against it ({reward['digest']} -> {reward_manifest['digest']})")
        info["reward"] = _reward_info(reward_manifest)
        info["reward"]["source"] = {"checkpoint_uri": redact_uri(reward["uri"]), "digest": reward["digest"]}
        info["defaults"] = {"max_new_tokens": manifest["stage_config"].get("max_new_tokens", 64)}
    else:
        raise CheckpointError(f"checkpoint {redact_uri(checkpoint_uri)} is a {kind!r} checkpoint; no served model")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    info["files"] = {name: file_entry(data) for name, data in files.items()}
    info["model_bytes"] = sum(len(data) for name, data in files.items() if name != TOKENIZER)
    (folder / MODEL_JSON).write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def _reward_info(manifest: dict) -> dict:
    config = manifest["model_config"]
    return {"palm": config["palm"], "model_config": {k: v for k, v in config.items() if k != "palm"},
            "rating_scale": manifest.get("rating_scale")}


def log_model(run_id: str, checkpoint_uri: str, digest: str, name: str) -> LoggedModel:
    """Log the checkpoint's served model in the MLflow run `run_id` (its Models tab links it), under `name`.

    Through this pipeline's own client, as Model.log does through MLflow's process-wide settings, which a library
    must leave to its caller."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from tasks.tracking.client import experiment_id, get_client

    client = get_client()
    model = client.create_logged_model(experiment_id(), name=name, source_run_id=run_id,
                                       params=dict(client.get_run(run_id).data.params))
    try:
        with tempfile.TemporaryDirectory(prefix="palm-rlhf-model-") as tmp:
            bundle, local = Path(tmp, "bundle"), Path(tmp, "model")
            info = write_bundle(checkpoint_uri, bundle, digest)
            described = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                              model_id=model.model_id,
                              metadata={"palm_rlhf": {k: info[k] for k in ("kind", "source", "model_bytes",
                                                                            "checkpoint_bytes")}})
            with warnings.catch_warnings(), _quiet_copies():
                # it asks for an input example, whose check would load the model right here
                warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
                mlflow.pyfunc.save_model(
                    str(local), python_model=str(PYFUNC_CODE), artifacts={"bundle": str(bundle)},
                    code_paths=[str(Path(models.__file__).parent), str(Path(tasks.__file__).parent)],
                    signature=signature(info["kind"], info.get("defaults", {})), pip_requirements=requirements(),
                    mlflow_model=described,
                    # what a loader may override (load_model's model_config, MLFLOW_PYFUNC_INFERENCE_CONFIG)
                    model_config={"sampling_precision": "auto"} if info["kind"] != "reward" else None)
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return LoggedModel(model.model_id, f"models:/{model.model_id}", info)


@contextmanager
def _quiet_copies():
    """save_model copies the bundle's files with a progress bar each: noise in a stage's log."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def requirements() -> list[str]:
    pins = []
    for package in REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # 2.13.0+cpu: the build is the deployer's
        except PackageNotFoundError:
            pins.append(package)
    return pins


def signature(kind: str, defaults: dict):
    """The input, output and request parameters the MLflow UI and the scoring server show and accept."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from tasks.serving.generation import GenerationParams

    if kind == "reward":
        return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
                              outputs=Schema([ColSpec("double", "score")]))
    default = GenerationParams.parse({}, defaults)
    return ModelSignature(  # an unnamed column: a plain list of prompts passes MLflow's input check, as a table does
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "completion"), ColSpec("double", "score", required=False)]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", default.max_new_tokens),
                            ParamSpec("temperature", "double", default.temperature),
                            ParamSpec("top_k", "long", default.top_k),
                            ParamSpec("num_samples", "long", default.num_samples),
                            ParamSpec("seed", "long", default.seed),
                            ParamSpec("return_scores", "boolean", default.return_scores)]))


def checkpoint_bundle(checkpoint_uri: str) -> "tempfile.TemporaryDirectory":
    """A temporary folder holding the served model of a checkpoint (for `palm-rlhf generate` on a checkpoint URI)."""
    tmp = tempfile.TemporaryDirectory(prefix="palm-rlhf-bundle-")
    write_bundle(checkpoint_uri, Path(tmp.name))
    return tmp

