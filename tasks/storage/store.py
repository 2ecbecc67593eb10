"""The object store: where it is (``$PALM_RLHF_STORE``), URIs under it, and small whole files beside the checkpoints
(leases, markers), created atomically and exclusively.

Any fsspec filesystem works: a local folder by default, ``s3://`` through s3fs (any S3-compatible endpoint) in
production. Errors name the URI with its credentials removed, and say whether a retry may help (``StorageError``: the
store did not answer) or not (``CheckpointError``: damage, or a request that cannot be done).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tasks.outage import Unavailable, is_outage
from tasks.redact import has_credentials, redact, redact_uri


class CheckpointError(RuntimeError):
    """A checkpoint (or a file beside one) is missing, torn, corrupt, unreachable, or cannot be written as asked."""


class StorageError(CheckpointError, Unavailable):
    """The store did not answer (network, outage, a server error): unlike damage, a retry may help."""


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


def normalize(uri: str) -> str:
    """Plain local paths become absolute ``file://`` URIs, so refs say where they live."""
    if "://" not in uri:
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    return join_uri(uri)


def filesystem(uri: str):
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


def fail(uri: str, problem: str, cls: type[CheckpointError] = CheckpointError) -> CheckpointError:
    return cls(f"checkpoint {redact_uri(uri)}: {problem}")


@contextlib.contextmanager
def io_errors(uri: str, action: str) -> Iterator[None]:
    """Turn storage errors into one CheckpointError naming the URI and the cause class, scrubbed: a StorageError
    (retried) when the store did not answer, a plain CheckpointError when it refused (denied, an invalid request)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # s3fs/botocore raise many unrelated classes; the cause class is kept in the text
        # `from None`: a chained traceback would print the unscrubbed original message.
        cls = StorageError if is_outage(err) else CheckpointError
        raise fail(uri, f"cannot {action} ({type(err).__name__}: {redact(str(err))})", cls) from None


def create_exclusive(fs, path: str, body: bytes) -> bool:
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


def create_file(uri: str, body: bytes) -> bool:
    """Create ``uri`` holding ``body`` unless it exists (atomic, exclusive); True when this call created it."""
    fs, path = filesystem(normalize(uri))
    with io_errors(uri, "create the file"):
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return create_exclusive(fs, path, body)


def check_store() -> None:
    """That the store answers, before a stage spends compute on data it could not keep: its root is listed."""
    root = store_root()
    fs, path = filesystem(normalize(root))
    with io_errors(root, "reach the store"):
        fs.invalidate_cache(path)
        try:
            fs.ls(path, detail=False)
        except FileNotFoundError:  # a store not written to yet
            pass


def read_file(uri: str) -> bytes | None:
    """The bytes of ``uri``, or None when it does not exist."""
    fs, path = filesystem(normalize(uri))
    with io_errors(uri, "read the file"):
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def replace_file(uri: str, body: bytes) -> None:
    fs, path = filesystem(normalize(uri))
    with io_errors(uri, "write the file"):
        fs.pipe_file(path, body)


def remove_file(uri: str) -> None:
    fs, path = filesystem(normalize(uri))
    with io_errors(uri, "remove the file"):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def upload_file(local_path: str, uri: str) -> None:
    """A large local file (a token file) into the store, streamed."""
    fs, path = filesystem(normalize(uri))
    with io_errors(uri, "upload the file"):
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(local_path, path)


def local_copy(uri: str, cache: str) -> str:
    """A local path holding the file at `uri`: the file itself on a local store, else a download into `cache` (made
    once: written beside and renamed, so ranks sharing a machine never read half of it)."""
    fs, path = filesystem(normalize(uri))
    if isinstance(fs, LocalFileSystem):
        return path
    target = os.path.join(cache, path.replace("/", "_"))
    if not os.path.exists(target):
        os.makedirs(cache, exist_ok=True)
        partial = f"{target}.{uuid.uuid4().hex}.part"
        with io_errors(uri, "download the file"):
            fs.get_file(path, partial)
        os.replace(partial, target)
    return target
