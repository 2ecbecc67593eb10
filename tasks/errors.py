"""Which failures are the user's to fix (exit code 2) rather than the system's (exit code 1)."""

from __future__ import annotations

from tasks.config import ConfigError
from tasks.store import CheckpointError
from tasks.tracking import TrackingError

USER_ERRORS = (ValueError, KeyError, ConfigError, CheckpointError, TrackingError, FileNotFoundError)


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS)
