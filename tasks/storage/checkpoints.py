"""Checkpoints on object storage (a local folder, or ``s3://`` through s3fs).

One folder per checkpoint, ``<prefix>/step-<step:08d>/``, holding

    weights.safetensors   the model's tensors (never pickle: loading must not run code)
    state.safetensors     the trainer state's tensors (optimizer moments, random streams)
    state.json            the trainer state's plain values (optimizer settings, the KL controller)
    manifest.json         written last: configs, lineage, and a sha256 and size per file

A folder without a manifest is not a checkpoint. Object stores have no rename, so the
files go under the checkpoint's own prefix first and the manifest (one PUT) after them;
a crash in between leaves a torn folder that readers skip. Reads check every size and
sha256 before building a tensor, so a checkpoint loads whole or not at all.

The trainer ``state`` is flat: each name holds a tensor (kept in state.safetensors, dtype and
shape exact) or a plain JSON value (kept in state.json). Nested trainer state such as an
optimizer's is flattened by its owner (``tasks.runtime.loop``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem

from tasks.redact import redact_uri
from tasks.storage.store import (CheckpointError, StorageError, create_exclusive, fail, filesystem, io_errors,
                                 join_uri, normalize)

__all__ = ["Checkpoint", "CheckpointError", "CheckpointRef", "StorageError", "checkpoint_file", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "read_manifest", "save_checkpoint", "verify_checkpoint",
           "weights_file"]

FORMAT_VERSION = 1
MANIFEST, WEIGHTS = "manifest.json", "weights.safetensors"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
_REQUIRED = {
    "format_version": int, "kind": str, "model_config": dict, "stage_config": dict, "step": int,
    "parents": list, "data": dict, "files": dict, "digest": str,
}
_STEP_FOLDER = re.compile(r"step-(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class _NoCheckpoint(CheckpointError):
    """Missing or unreadable manifest: the folder is not (yet) a checkpoint; listings skip it."""


@dataclass(frozen=True)
class CheckpointRef:
    uri: str  # folder of one checkpoint: file:///.../step-00000040 or s3://bucket/.../step-00000040
    digest: str  # "sha256:<hex>" of weights.safetensors: the model's content identity
    step: int


@dataclass
class Checkpoint:
    ref: CheckpointRef
    manifest: dict
    weights: dict[str, torch.Tensor]
    state: dict  # name -> tensor or JSON value, as saved; {} when loaded with load_state=False


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, one storage per tensor: safetensors refuses views and shared memory
    (tied embeddings, optimizer views); copy only the tensors that need it."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        t = tensor.detach().to("cpu")
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not whole or (t.numel() and storage.data_ptr() in seen):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


# ---------------------------------------------------------------- verification helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _streamed_sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_safetensors(f: BinaryIO, size: int, uri: str, name: str) -> None:
    """Check the safetensors layout from the first bytes, so a pickle (or anything else) is
    named for what it is before any parser sees it."""
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= length <= min(_MAX_HEADER, size - 8):
        raise fail(uri, f"{name} is not a safetensors file (header length check failed); refusing to load it")
    try:
        header = json.loads(f.read(length))
        body = size - 8 - length
        for key, entry in header.items():
            if key != "__metadata__":
                start, end = entry["data_offsets"]
                if not (isinstance(entry["dtype"], str) and 0 <= start <= end <= body):
                    raise ValueError(key)
    except Exception:
        raise fail(uri, f"{name} is not a safetensors file (header check failed); refusing to load it") from None


def _verified_bytes(fs, path: str, uri: str, manifest: dict, name: str) -> bytes:
    """One file's bytes, after its size and sha256 match the manifest."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise fail(uri, f"{MANIFEST} lists no {name}")
    with io_errors(uri, f"read {name}"):
        try:
            data = fs.cat_file(f"{path}/{name}")
        except FileNotFoundError:
            raise fail(uri, f"{name} is missing (listed in {MANIFEST})") from None
    _check_size(uri, name, entry, len(data))
    _check_sha256(uri, name, entry, _sha256(data))
    return data


def _check_size(uri: str, name: str, entry: dict, size: int) -> None:
    if size != entry["bytes"]:
        raise fail(uri, f"{name} size mismatch (manifest says {entry['bytes']} bytes, file has {size}): truncated?")


def _check_sha256(uri: str, name: str, entry: dict, actual: str) -> None:
    if actual != entry["sha256"]:
        raise fail(uri, f"{name} sha256 mismatch (manifest says {entry['sha256'][:12]}…, file has {actual[:12]}…)")


def _parse_manifest(raw: bytes, uri: str) -> dict:
    def bad(problem: str) -> CheckpointError:
        return fail(uri, f"{MANIFEST} {problem}", _NoCheckpoint)

    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise bad(f"is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise bad("is not a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise bad(f"lacks {key!r}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise bad(f"has a {type(manifest[key]).__name__} for {key!r}, expected {kind.__name__}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise bad(f"has format_version {manifest['format_version']}; this code reads {FORMAT_VERSION}")
    for name, entry in manifest["files"].items():
        ok = isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
        if not ok or type(entry.get("bytes")) is not int or "/" in name or name.startswith("."):
            raise bad(f"has an invalid files entry for {name!r}")
    if WEIGHTS not in manifest["files"]:
        raise bad(f"lists no {WEIGHTS}")
    if manifest["digest"] != "sha256:" + manifest["files"][WEIGHTS]["sha256"]:
        raise bad(f"digest does not match the sha256 of {WEIGHTS}")
    return manifest


def _read_manifest(uri: str) -> tuple[dict, object, str]:
    fs, path = filesystem(uri)
    with io_errors(uri, f"read {MANIFEST}"):
        fs.invalidate_cache(path)  # another process may have just written it
        try:
            raw = fs.cat_file(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            raise fail(uri, f"no checkpoint at this URI ({MANIFEST} missing)", _NoCheckpoint) from None
    return _parse_manifest(raw, uri), fs, path


def _ref(uri: str, manifest: dict) -> CheckpointRef:
    return CheckpointRef(uri=uri, digest=manifest["digest"], step=manifest["step"])


# ---------------------------------------------------------------- public API


def save_checkpoint(
    prefix: str,
    step: int,
    weights: dict[str, torch.Tensor],
    *,
    kind: str,
    model_config: dict,
    stage_config: dict | None = None,
    state: dict | None = None,
    parents: list[dict | CheckpointRef] = (),
    data: dict[str, str] | None = None,
    extra: dict | None = None,
    files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> CheckpointRef:
    """Write ``<prefix>/step-<step:08d>/`` and return its ref.

    ``files`` are other whole files the checkpoint carries (its tokenizer.json), checked like the rest on every read.
    Everything is validated and serialized in memory before the first byte is written.
    Saving the same content again returns the existing ref (a retried task is harmless);
    different content at an existing step is refused unless ``overwrite=True``, because
    downstream manifests name this checkpoint by URI and digest.
    """
    if type(step) is not int or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    uri = join_uri(normalize(prefix), f"step-{step:08d}")
    fs, path = filesystem(uri)
    files = {**_serialize(weights, state), **_extra_files(files)}
    manifest = _build_manifest(files, step, kind, model_config, stage_config, parents, data, extra)
    ref = _ref(uri, manifest)

    with io_errors(uri, f"read an existing {MANIFEST}"):
        fs.invalidate_cache(path)
        try:
            existing = fs.cat_file(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            existing = None
    if existing is not None:
        try:
            old = _parse_manifest(existing, uri)
        except _NoCheckpoint:
            old = None  # a garbled manifest publishes nothing: replace it like a torn folder
        if old == manifest:
            return ref
        if old is not None and not overwrite:
            raise fail(uri, "already exists with different content (checkpoints are immutable; pass overwrite=True)")
        with io_errors(uri, f"remove the old {MANIFEST}"):
            fs.rm_file(f"{path}/{MANIFEST}")  # unpublish first: readers never see new files under the old manifest
    if not _write(fs, path, uri, files, manifest):  # another writer published this step while we wrote
        with io_errors(uri, f"read the {MANIFEST} published meanwhile"):
            published = _parse_manifest(fs.cat_file(f"{path}/{MANIFEST}"), uri)
        if published != manifest:
            raise fail(uri, "was published meanwhile by another writer with different content (checkpoints are "
                             "immutable: two runs of one run key must not train at the same time)")
        return _ref(uri, published)
    return ref


def _write(fs, path: str, uri: str, files: dict[str, bytes], manifest: dict) -> bool:
    """Every file under the checkpoint's own prefix, then the manifest that publishes them; False when another
    writer's manifest got there first (it is never replaced)."""
    if isinstance(fs, LocalFileSystem):  # object stores have no folders; makedirs on s3 would create a bucket
        with io_errors(uri, "create the checkpoint folder"):
            fs.makedirs(path, exist_ok=True)
    for name, payload in files.items():
        with io_errors(uri, f"write {name}"):
            fs.pipe_file(f"{path}/{name}", payload)
    with io_errors(uri, f"write {MANIFEST}"):
        return create_exclusive(fs, f"{path}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())


def _extra_files(files: dict[str, bytes] | None) -> dict[str, bytes]:
    for name, data in (files or {}).items():
        if name in (WEIGHTS, STATE_TENSORS, STATE_JSON, MANIFEST) or "/" in name or name.startswith(".") or not name:
            raise CheckpointError(f"files: {name!r} is not a name a checkpoint can carry beside its own files")
        if not isinstance(data, bytes):
            raise CheckpointError(f"files[{name!r}]: expected bytes, got {type(data).__name__}")
    return dict(files or {})


def _serialize(weights: dict, state: dict | None) -> dict[str, bytes]:
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError("weights must be a non-empty dict of name -> tensor")
    for name, tensor in weights.items():
        if not isinstance(name, str) or name == "__metadata__" or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"weights[{name!r}]: expected a str name and a torch.Tensor")
    state = state or {}
    state_tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    for name in state:
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"state[{name!r}]: state names must be strings")
    try:
        state_json = json.dumps(values, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the trainer state's plain values are not JSON ({err}): flatten nested state into "
                              "tensors and JSON values") from None
    try:
        return {
            WEIGHTS: safetensors.torch.save(_storable(weights)),
            STATE_TENSORS: safetensors.torch.save(_storable(state_tensors)),
            STATE_JSON: state_json,
        }
    except Exception as err:  # e.g. a sparse or quantized tensor safetensors has no dtype for
        raise CheckpointError(f"cannot serialize the checkpoint tensors ({type(err).__name__}: {err})") from None


def _build_manifest(files, step, kind, model_config, stage_config, parents, data, extra) -> dict:
    if not isinstance(kind, str) or not kind:
        raise CheckpointError(f"kind must be a non-empty str, got {kind!r}")
    links = []
    for parent in parents:
        if isinstance(parent, CheckpointRef):
            parent = {"uri": parent.uri, "digest": parent.digest}
        if not (isinstance(parent, dict) and all(isinstance(parent.get(k), str) for k in ("uri", "digest"))):
            raise CheckpointError(f"parents: each entry needs a str 'uri' and 'digest', got {parent!r}")
        links.append({**parent, "uri": redact_uri(parent["uri"])})
    data = dict(data or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise CheckpointError("data must map dataset names (str) to digests (str)")
    manifest = {
        "format_version": FORMAT_VERSION, "kind": kind, "step": step, "parents": links, "data": data,
        "files": {name: {"sha256": _sha256(body), "bytes": len(body)} for name, body in files.items()},
        "digest": "sha256:" + _sha256(files[WEIGHTS]),
    }
    for key, value in (("model_config", model_config), ("stage_config", stage_config or {})):
        if not isinstance(value, dict):
            raise CheckpointError(f"{key} must be a dict, got {type(value).__name__}")
        manifest[key] = value
    clash = sorted(set(extra or {}) & (set(manifest) | set(_REQUIRED)))
    if clash:
        raise CheckpointError(f"extra keys {clash} would overwrite the manifest's own fields")
    manifest.update(extra or {})
    for key, value in manifest.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"manifest field {key!r} is not plain JSON ({err})") from None
    return json.loads(json.dumps(manifest))  # tuples -> lists now, so a re-save compares equal


def read_manifest(uri: str) -> dict:
    """The manifest alone, parsed and checked for required keys: cheap, for lineage and architecture."""
    return _read_manifest(normalize(uri))[0]


def load_checkpoint(uri: str, *, map_location="cpu", load_state: bool = True) -> Checkpoint:
    """Read, verify (sizes, sha256s, safetensors headers), then build tensors.

    With ``load_state=False`` the state files are neither read nor checked, and ``state`` is {}.
    """
    uri = normalize(uri)
    manifest, fs, path = _read_manifest(uri)
    names = [WEIGHTS, STATE_TENSORS, STATE_JSON] if load_state else [WEIGHTS]
    raw = {name: _verified_bytes(fs, path, uri, manifest, name) for name in names}
    for name in names:
        if name.endswith(".safetensors"):
            _check_safetensors(io.BytesIO(raw[name]), len(raw[name]), uri, name)
    try:
        weights = {k: v.to(map_location) for k, v in safetensors.torch.load(raw.pop(WEIGHTS)).items()}
        state = {}
        if load_state:
            tensors = {k: v.to(map_location) for k, v in safetensors.torch.load(raw.pop(STATE_TENSORS)).items()}
            state = {**json.loads(raw.pop(STATE_JSON)), **tensors}
    except Exception as err:  # sha256s matched, so the writer produced this: say so plainly
        raise fail(uri, f"verified files could not be decoded ({type(err).__name__}: {err})") from None
    return Checkpoint(ref=_ref(uri, manifest), manifest=manifest, weights=weights, state=state)


def checkpoint_file(uri: str, name: str) -> bytes:
    """One file a checkpoint carries (its tokenizer.json, say), checked against its manifest."""
    uri = normalize(uri)
    manifest, fs, path = _read_manifest(uri)
    return _verified_bytes(fs, path, uri, manifest, name)


def weights_file(uri: str) -> tuple[bytes, dict]:
    """The bytes of a checkpoint's weights.safetensors, checked against its manifest (size, sha256, safetensors
    header), and the manifest: for handing the weights on unchanged (a registered model's files)."""
    uri = normalize(uri)
    manifest, fs, path = _read_manifest(uri)
    data = _verified_bytes(fs, path, uri, manifest, WEIGHTS)
    _check_safetensors(io.BytesIO(data), len(data), uri, WEIGHTS)
    return data, manifest


def verify_checkpoint(uri: str) -> CheckpointRef:
    """Check every file the manifest lists (size, streamed sha256, safetensors header) without loading tensors."""
    uri = normalize(uri)
    manifest, fs, path = _read_manifest(uri)
    for name, entry in manifest["files"].items():
        file = f"{path}/{name}"
        with io_errors(uri, f"read {name}"):
            try:
                _check_size(uri, name, entry, fs.size(file))
            except FileNotFoundError:
                raise fail(uri, f"{name} is missing (listed in {MANIFEST})") from None
            _check_sha256(uri, name, entry, _streamed_sha256(fs, file))
            if name.endswith(".safetensors"):
                with fs.open(file, "rb") as f:
                    _check_safetensors(f, entry["bytes"], uri, name)
    return _ref(uri, manifest)


def list_checkpoints(prefix: str) -> list[CheckpointRef]:
    """Complete checkpoints under ``prefix`` by ascending step; torn folders are skipped."""
    return list(reversed(list(_complete_desc(prefix))))


def latest_checkpoint(prefix: str) -> CheckpointRef | None:
    """The highest step whose manifest exists and parses (files are not hashed: use verify/load)."""
    return next(_complete_desc(prefix), None)


def _complete_desc(prefix: str) -> Iterator[CheckpointRef]:
    base = normalize(prefix)
    fs, path = filesystem(base)
    with io_errors(base, "list checkpoints"):
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            bucket = path.split("/", 1)[0]
            # no checkpoints yet is normal; a missing bucket is a typo that would silently restart training
            if not isinstance(fs, LocalFileSystem) and not fs.exists(bucket):
                raise fail(base, f"bucket {bucket!r} does not exist") from None
            return
    steps = []
    for entry in entries:
        match = _STEP_FOLDER.fullmatch(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            steps.append((int(match.group(1)), match.group(0)))
    for _, name in sorted(steps, reverse=True):
        uri = join_uri(base, name)
        try:
            manifest = _read_manifest(uri)[0]
        except _NoCheckpoint:
            continue
        yield _ref(uri, manifest)
