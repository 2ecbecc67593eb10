"""Outages, told apart from bad input: a store or server that did not answer is worth another try; a file that is
not there, a key that is refused, a table that does not parse is the user's to fix, and trying again only repeats it.

Every read of data (corpus, feedback, prompts), every store operation and every call to the tracking server sorts
its failures with `is_outage`. An outage becomes an `Unavailable` (the store's `StorageError` and the tracking
server's `TrackingUnavailable` are ones too): exit code 1, retried; the rest keep their own classes: exit code 2, never
retried (tasks/runtime/errors.py). `retrying` is the bounded retry of a step that only reads, with each attempt logged.

Sits at the bottom of `tasks/` with redact.py: it imports nothing of the pipeline.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Callable, TypeVar

log = logging.getLogger("tasks.outage")
T = TypeVar("T")

# What a store answers for a request it understood and refuses, or could never serve: no retry changes that.
_REFUSED = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)
_REFUSED_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENAMETOOLONG, errno.ENOSYS,
                   errno.EEXIST, errno.ENOTDIR, errno.EISDIR, getattr(errno, "EMSGSIZE", errno.EINVAL),
                   getattr(errno, "EREMCHG", errno.ENOENT), getattr(errno, "ENOTEMPTY", errno.EINVAL)}
# Network failures of the HTTP stacks under s3fs and MLflow (botocore, aiohttp, requests, urllib3), by class name:
# none of them is an OSError, and importing each library to name its classes would make this module heavy.
_NETWORK_CLASSES = {"ConnectionError", "HTTPClientError", "Timeout", "TimeoutError", "ClientConnectionError",
                    "ClientPayloadError", "ProtocolError", "NewConnectionError", "MaxRetryError"}
RETRY_DELAYS_S = (2.0, 5.0, 15.0)


class Unavailable(RuntimeError):
    """A store or server did not answer (an outage, the network, a server error): unlike bad input, a retry may help.
    Exit code 1."""


def is_outage(exc: BaseException) -> bool:
    """Whether a failed request is the service's failure (retry) rather than one the request itself caused."""
    if isinstance(exc, Unavailable):
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, _REFUSED):
        return False
    if isinstance(exc, OSError):  # s3fs: 503 SlowDown is EBUSY, 500 EREMOTEIO, an unknown answer EIO
        return exc.errno not in _REFUSED_ERRNOS
    return any(cls.__name__ in _NETWORK_CLASSES for cls in type(exc).__mro__)


def retrying(what: str, attempt: Callable[[], T], delays_s: tuple[float, ...] = RETRY_DELAYS_S,
             unless: tuple[type[BaseException], ...] = ()) -> T:
    """`attempt()`, again after each delay while it fails with an outage (other than those `unless` names); each
    failure logged with what comes next.

    Only for steps that read (or are otherwise safe to repeat from the start). Bad input is raised at once."""
    for tries, delay in enumerate((*delays_s, None), start=1):
        try:
            return attempt()
        except Unavailable as exc:
            if isinstance(exc, unless):
                raise
            if delay is None:
                log.warning("%s: attempt %d of %d failed (%s); giving up", what, tries, tries, _gist(exc))
                raise
            log.warning("%s: attempt %d of %d failed (%s); trying again in %g s", what, tries, len(delays_s) + 1,
                        _gist(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _gist(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__
