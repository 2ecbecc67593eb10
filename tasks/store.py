"""Checkpoints on object storage (a local folder, or ``s3://`` through s3fs).

One folder per checkpoint, ``<prefix>/step-<step:08d>/``, holding

    weights.safetensors   the model's tensors (never pickle: loading must not run code)
    state.safetensors     tensors of the trainer state (optimizer moments, RNG states)
    state.json            the rest of the trainer state, with placeholders for those tensors
    manifest.json         written last: configs, lineage, and a sha256 and size per file

A folder without a manifest is not a checkpoint. Object stores have no rename, so the
files go under the checkpoint's own prefix first and the manifest (one PUT) after them;
a crash in between leaves a torn folder that readers skip. Reads check every size and
sha256 before building a tensor, so a checkpoint loads whole or not at all.

``state`` round-trips exactly: dicts (int keys stay ints, as ``optimizer.load_state_dict``
needs), lists, tuples, str/int/bool/None, floats bit for bit (repr round-trips; inf and nan
go as ``float.hex``) and tensors (dtype and shape kept, always contiguous on load).
Dict subclasses such as ``OrderedDict`` come back as plain dicts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

import safetensors.torch
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tasks.redact import has_credentials, redact, redact_uri

FORMAT_VERSION = 1
MANIFEST, WEIGHTS = "manifest.json", "weights.safetensors"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
_REQUIRED = {
    "format_version": int, "kind": str, "model_config": dict, "stage_config": dict, "step": int,
    "parents": list, "data": dict, "files": dict, "digest": str,
}
_STEP_FOLDER = re.compile(r"step-(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MARKERS = ("__tensor__", "__tuple__", "__float__", "__dict__")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointError(RuntimeError):
    """A checkpoint is missing, torn, corrupt, unreachable, or cannot be written as asked."""


class StorageError(CheckpointError):
    """The store could not be read or written (network, outage, permissions): unlike damage, a retry may help."""


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
    state: dict  # as saved; {} when loaded with load_state=False


# ---------------------------------------------------------------- URIs and filesystems


def store_root() -> str:
    """``$PALM_RLHF_STORE``, else ``<$PALM_RLHF_HOME or ./.palm-rlhf>/store`` as an absolute path."""
    explicit = os.environ.get("PALM_RLHF_STORE")
    if explicit:
        return explicit if "://" in explicit else os.path.abspath(os.path.expanduser(explicit))
    home = os.environ.get("PALM_RLHF_HOME") or ".palm-rlhf"
    return os.path.join(os.path.abspath(os.path.expanduser(home)), "store")


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a URI or local path with single slashes."""
    stripped = base.rstrip("/")
    out = base if (stripped == "" or stripped.endswith(":")) else stripped  # keep "/" and "file:///"
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}{'' if out.endswith('/') else '/'}{part}"
    return out


def _normalize(uri: str) -> str:
    """Plain local paths become absolute ``file://`` URIs, so refs say where they live."""
    if "://" not in uri:
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    return join_uri(uri)


def _filesystem(uri: str):
    """(fs, path) for a URI; refuses what fsspec would misread, before any I/O."""
    parts = urlsplit(uri)
    if has_credentials(uri):
        # s3fs would take "KEY:SECRET@bucket" for a bucket name and echo it in errors.
        raise CheckpointError(
            f"{redact_uri(uri)}: credentials inside the URI are not supported; "
            "set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        )
    try:
        return url_to_fs(uri)
    except ImportError as err:
        raise CheckpointError(f"{redact_uri(uri)}: storage protocol {parts.scheme!r} needs a package: {err}") from None
    except ValueError:
        raise CheckpointError(
            f"{redact_uri(uri)}: unknown storage protocol {parts.scheme!r} (use a local path, file:// or s3://)"
        ) from None


def _fail(uri: str, problem: str, cls: type[CheckpointError] = CheckpointError) -> CheckpointError:
    return cls(f"checkpoint {redact_uri(uri)}: {problem}")


@contextlib.contextmanager
def _io(uri: str, action: str) -> Iterator[None]:
    """Turn storage errors into one CheckpointError naming the URI and the cause class, scrubbed."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # s3fs/botocore raise many unrelated classes; the cause class is kept in the text
        # `from None`: a chained traceback would print the unscrubbed original message.
        raise _fail(uri, f"cannot {action} ({type(err).__name__}: {redact(str(err))})", StorageError) from None


# ---------------------------------------------------------------- state <-> (json, tensors)


def _where(path: tuple) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def _encode_state(state: object) -> tuple[object, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON tree with tensor placeholders, and the tensors by path key."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj: object, path: tuple) -> object:
        if isinstance(obj, torch.Tensor):
            key = "/".join(map(str, path)) or "state"
            while key in tensors or key == "__metadata__":  # "a/b" vs {"a": {"b": ..}}
                key += "#"
            tensors[key] = obj
            return {"__tensor__": key}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {"__float__": float(obj).hex()}
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v, path + (i,)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [enc(v, path + (i,)) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in obj):
                return {k: enc(v, path + (k,)) for k, v in obj.items()}
            for k in obj:
                if isinstance(k, torch.Tensor):
                    raise CheckpointError(f"{_where(path)}: a tensor cannot be a dict key in a checkpoint")
            return {"__dict__": [[enc(k, path), enc(v, path + (k,))] for k, v in obj.items()]}
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise CheckpointError(
            f"{_where(path)}: cannot store a {kind} in a checkpoint "
            "(use dicts, lists, tuples, str, int, float, bool, None or torch tensors)"
        )

    return enc(state, ()), tensors


def _decode_state(node: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(node, list):
        return [_decode_state(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1 and next(iter(node)) in _MARKERS:
        ((tag, value),) = node.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__float__":
            return float.fromhex(value)
        if tag == "__tuple__":
            return tuple(_decode_state(v, tensors) for v in value)
        return {_decode_state(k, tensors): _decode_state(v, tensors) for k, v in value}
    return {k: _decode_state(v, tensors) for k, v in node.items()}


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
        raise _fail(uri, f"{name} is not a safetensors file (header length check failed); refusing to load it")
    try:
        header = json.loads(f.read(length))
        body = size - 8 - length
        for key, entry in header.items():
            if key != "__metadata__":
                start, end = entry["data_offsets"]
                if not (isinstance(entry["dtype"], str) and 0 <= start <= end <= body):
                    raise ValueError(key)
    except Exception:
        raise _fail(uri, f"{name} is not a safetensors file (header check failed); refusing to load it") from None


def _verified_bytes(fs, path: str, uri: str, manifest: dict, name: str) -> bytes:
    """One file's bytes, after its size and sha256 match the manifest."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise _fail(uri, f"{MANIFEST} lists no {name}")
    with _io(uri, f"read {name}"):
        try:
            data = fs.cat_file(f"{path}/{name}")
        except FileNotFoundError:
            raise _fail(uri, f"{name} is missing (listed in {MANIFEST})") from None
    _check_size(uri, name, entry, len(data))
    _check_sha256(uri, name, entry, _sha256(data))
    return data


def _check_size(uri: str, name: str, entry: dict, size: int) -> None:
    if size != entry["bytes"]:
        raise _fail(uri, f"{name} size mismatch (manifest says {entry['bytes']} bytes, file has {size}): truncated?")


def _check_sha256(uri: str, name: str, entry: dict, actual: str) -> None:
    if actual != entry["sha256"]:
        raise _fail(uri, f"{name} sha256 mismatch (manifest says {entry['sha256'][:12]}…, file has {actual[:12]}…)")


def _parse_manifest(raw: bytes, uri: str) -> dict:
    def bad(problem: str) -> CheckpointError:
        return _fail(uri, f"{MANIFEST} {problem}", _NoCheckpoint)

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
    fs, path = _filesystem(uri)
    with _io(uri, f"read {MANIFEST}"):
        fs.invalidate_cache(path)  # another process may have just written it
        try:
            raw = fs.cat_file(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            raise _fail(uri, f"no checkpoint at this URI ({MANIFEST} missing)", _NoCheckpoint) from None
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
    overwrite: bool = False,
) -> CheckpointRef:
    """Write ``<prefix>/step-<step:08d>/`` and return its ref.

    Everything is validated and serialized in memory before the first byte is written.
    Saving the same content again returns the existing ref (a retried task is harmless), and
    so does saving the same model with other trainer state (see ``_same_model``); different
    content at an existing step is refused unless ``overwrite=True``, because downstream
    manifests name this checkpoint by URI and digest.
    """
    if type(step) is not int or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    uri = join_uri(_normalize(prefix), f"step-{step:08d}")
    fs, path = _filesystem(uri)
    files = _serialize(weights, state)
    manifest = _build_manifest(files, step, kind, model_config, stage_config, parents, data, extra)
    ref = _ref(uri, manifest)

    with _io(uri, f"read an existing {MANIFEST}"):
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
        if old is not None and not overwrite and _same_model(old, manifest):
            return _ref(uri, old)
        if old is not None and not overwrite:
            raise _fail(uri, "already exists with different content (checkpoints are immutable; pass overwrite=True)")
        with _io(uri, f"remove the old {MANIFEST}"):
            fs.rm_file(f"{path}/{MANIFEST}")  # unpublish first: readers never see new files under the old manifest
    if not _write(fs, path, uri, files, manifest):  # another writer published this step while we wrote
        with _io(uri, f"read the {MANIFEST} published meanwhile"):
            published = _parse_manifest(fs.cat_file(f"{path}/{MANIFEST}"), uri)
        if published != manifest and not _same_model(published, manifest):
            raise _fail(uri, "was published meanwhile by another writer with different content (checkpoints are "
                             "immutable: two runs of one run key must not train at the same time)")
        return _ref(uri, published)
    return ref


def _same_model(old: dict, new: dict) -> bool:
    """The same weights, configs, lineage and metrics: only the trainer state may differ.

    Two identical runs started together write the same step of the same run key. Their trainer
    state can differ in Python's global RNG: it is saved although no stage draws from it, and
    other code in the process can draw from it between checkpoints (a retry's jitter, say).
    The first writer's checkpoint stands for both.
    """

    def model(manifest: dict) -> dict:
        return {**manifest, "files": manifest["files"][WEIGHTS]}

    return model(old) == model(new)


def _write(fs, path: str, uri: str, files: dict[str, bytes], manifest: dict) -> bool:
    """Every file under the checkpoint's own prefix, then the manifest that publishes them; False when another
    writer's manifest got there first (it is never replaced)."""
    if isinstance(fs, LocalFileSystem):  # object stores have no folders; makedirs on s3 would create a bucket
        with _io(uri, "create the checkpoint folder"):
            fs.makedirs(path, exist_ok=True)
    for name, payload in files.items():
        with _io(uri, f"write {name}"):
            fs.pipe_file(f"{path}/{name}", payload)
    with _io(uri, f"write {MANIFEST}"):
        return _create(fs, f"{path}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())


def _create(fs, path: str, body: bytes) -> bool:
    """Write a whole file unless it exists; False when it did. Atomic and exclusive: a hard link on a local
    disk, a conditional PUT (If-None-Match) on S3, so two writers can never both create it and a reader never
    sees half of it."""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}"
        fs.pipe_file(tmp, body)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, body, mode="create")
    except FileExistsError:  # also when our own first attempt landed and only its answer was lost
        return False
    return True


# ---------------------------------------------------------------- small files beside checkpoints (leases)


def create_file(uri: str, body: bytes) -> bool:
    """Create ``uri`` holding ``body`` unless it exists (atomic, exclusive); True when this call created it."""
    fs, path = _filesystem(_normalize(uri))
    with _io(uri, "create the file"):
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return _create(fs, path, body)


def read_file(uri: str) -> bytes | None:
    """The bytes of ``uri``, or None when it does not exist."""
    fs, path = _filesystem(_normalize(uri))
    with _io(uri, "read the file"):
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def replace_file(uri: str, body: bytes) -> None:
    fs, path = _filesystem(_normalize(uri))
    with _io(uri, "write the file"):
        fs.pipe_file(path, body)


def remove_file(uri: str) -> None:
    fs, path = _filesystem(_normalize(uri))
    with _io(uri, "remove the file"):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _serialize(weights: dict, state: dict | None) -> dict[str, bytes]:
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError("weights must be a non-empty dict of name -> tensor")
    for name, tensor in weights.items():
        if not isinstance(name, str) or name == "__metadata__" or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"weights[{name!r}]: expected a str name and a torch.Tensor")
    tree, state_tensors = _encode_state({} if state is None else state)
    try:
        return {
            WEIGHTS: safetensors.torch.save(_storable(weights)),
            STATE_TENSORS: safetensors.torch.save(_storable(state_tensors)),
            STATE_JSON: json.dumps(tree, allow_nan=False).encode(),
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
        if not (isinstance(parent, dict) and isinstance(parent.get("uri"), str) and isinstance(parent.get("digest"), str)):
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
    return _read_manifest(_normalize(uri))[0]


def load_checkpoint(uri: str, *, map_location="cpu", load_state: bool = True) -> Checkpoint:
    """Read, verify (sizes, sha256s, safetensors headers), then build tensors.

    With ``load_state=False`` the state files are neither read nor checked, and ``state`` is {}.
    """
    uri = _normalize(uri)
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
            state = _decode_state(json.loads(raw.pop(STATE_JSON)), tensors)
    except Exception as err:  # sha256s matched, so the writer produced this: say so plainly
        raise _fail(uri, f"verified files could not be decoded ({type(err).__name__}: {err})") from None
    return Checkpoint(ref=_ref(uri, manifest), manifest=manifest, weights=weights, state=state)


def verify_checkpoint(uri: str) -> CheckpointRef:
    """Check every file the manifest lists (size, streamed sha256, safetensors header) without loading tensors."""
    uri = _normalize(uri)
    manifest, fs, path = _read_manifest(uri)
    for name, entry in manifest["files"].items():
        file = f"{path}/{name}"
        with _io(uri, f"read {name}"):
            try:
                _check_size(uri, name, entry, fs.size(file))
            except FileNotFoundError:
                raise _fail(uri, f"{name} is missing (listed in {MANIFEST})") from None
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
    base = _normalize(prefix)
    fs, path = _filesystem(base)
    with _io(base, "list checkpoints"):
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            bucket = path.split("/", 1)[0]
            # no checkpoints yet is normal; a missing bucket is a typo that would silently restart training
            if not isinstance(fs, LocalFileSystem) and not fs.exists(bucket):
                raise _fail(base, f"bucket {bucket!r} does not exist") from None
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
