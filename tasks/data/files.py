"""Reading data at fsspec URLs (a local path, ``file://``, ``s3://``, a glob) and the digests that name its content.

Every reader fails with one clear error, naming the file or column, before any training starts; the error class is
the caller's (a corpus error, a feedback error), unless the store did not answer: that is an outage
(`tasks.outage.Unavailable`, retried), not bad data. Bytes are fetched first and parsed after, so the two never mix.
URIs in messages are redacted.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re

import fsspec
import numpy as np
import pandas as pd

from tasks.outage import Unavailable, is_outage
from tasks.redact import redact, redact_uri

TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")


def suffix(path: str) -> str:
    return posixpath.splitext(path.lower())[1]


_URI_CREDENTIALS = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://).*:.*@(?P<rest>[^@]*)$")


def open_filesystem(uri: str, storage_options: dict | None, error: type[ValueError]) -> tuple:
    """(filesystem, path) for a URL, refusing credentials written into it.

    fsspec does not read ``key:secret@`` from a URL: it would treat it as part of the bucket name
    and echo it in its own errors. Credentials belong in the environment or ``storage_options``.
    """
    found = _URI_CREDENTIALS.match(uri)
    if found:  # shown without them: a secret may hold "/" and so escape URL parsing and redact_uri
        shown = f"{found['scheme']}***@{found['rest']}"
        raise error(f"credentials inside a URI are not supported, put them in the environment: {shown}")
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()  # another process may have just written here
    return fs, path


def unreadable(uri: str, exc: BaseException, error: type[ValueError]) -> Exception:
    """Access denied, or a store that did not answer: fsspec's own message names neither the URL nor a fix."""
    cause = f"{type(exc).__name__}: {redact(' '.join(str(exc).split()))}"
    if is_outage(exc):
        return Unavailable(f"cannot read {redact_uri(uri)}: the store did not answer ({cause}); it is retried, and "
                           "the same command resumes once the store is back")
    return error(f"cannot read {redact_uri(uri)}: {cause}; check the storage credentials and endpoint in the "
                 "environment")


def file_kind(fs, path: str, uri: str, error: type[ValueError]) -> str | None:
    """"file", "directory", or None when nothing is there; isfile() would call a denied read "missing"."""
    try:
        return fs.info(path)["type"]
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise unreadable(uri, exc, error) from None


def read_bytes(fs, path: str, error: type[ValueError]) -> bytes:
    """A whole file's bytes; a missing file or a refused read is `error`, a store that did not answer an outage."""
    shown = redact_uri(fs.unstrip_protocol(path))
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise error(f"file not found: {shown}") from None
    except Exception as exc:
        raise unreadable(shown, exc, error) from None


def expand(uri: str, storage_options: dict | None, error: type[ValueError]) -> tuple:
    """The files a URL names: a glob's matches, a folder's files (hidden ones skipped), or the one file."""
    fs, path = open_filesystem(uri, storage_options, error)
    try:
        if fsspec.core.has_magic(path):
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif (kind := file_kind(fs, path, uri, error)) == "directory":
            root = path.rstrip("/")
            paths = sorted(p for p in fs.find(path) if not re.search(r"(^|/)\.", p[len(root):]))
        else:
            paths = [path] if kind == "file" else []
    except error:
        raise
    except Exception as exc:
        raise unreadable(uri, exc, error) from None
    if not paths:
        raise error(f"no file matches {redact_uri(uri)}")
    return fs, paths


def read_table(fs, path: str, error: type[ValueError], **csv_options) -> pd.DataFrame:
    shown = redact_uri(fs.unstrip_protocol(path))
    f = io.BytesIO(read_bytes(fs, path, error))
    try:
        kind = suffix(path)
        if kind == ".parquet":
            return pd.read_parquet(f)
        if kind in (".jsonl", ".json"):  # dtype=False: a response "42" stays text
            return pd.read_json(f, lines=True, dtype=False)
        return pd.read_csv(f, **csv_options)
    except Exception as exc:  # parser errors differ per format; the file name is what a user needs
        raise error(f"cannot read {shown}: {redact(str(exc))}") from None


def require_columns(frame: pd.DataFrame, columns: tuple[str, ...], where: str, error: type[ValueError]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise error(f"{where} has no column {', '.join(map(repr, missing))}; columns present: {list(frame.columns)}")


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value):
    if isinstance(value, (list, tuple, np.ndarray)):  # a list or array inside a cell (token ids), every element
        return [_canonical(v) for v in value]
    if not pd.api.types.is_scalar(value):
        return str(value)
    if pd.isna(value):  # None, NaN, pd.NA and NaT all mean "no value"
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    try:  # 4, 4.0 and numpy scalars are the same rating whichever file format carried them
        return float(value) if not isinstance(value, str) else value
    except (TypeError, ValueError):
        return str(value)


def frame_digest(df: pd.DataFrame) -> str:
    """sha256 over column names and values, independent of dtype details and file format."""
    columns = [str(c) for c in df.columns]
    rows = [[_canonical(v) for v in row] for row in df.itertuples(index=False, name=None)]
    payload = json.dumps([columns, rows], ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()
