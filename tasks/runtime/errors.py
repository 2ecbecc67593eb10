"""Which failures are the user's to fix and which a retry may cure: the CLI's exit codes and Prefect's retries."""

from __future__ import annotations

from tasks.config import ConfigError
from tasks.storage.store import CheckpointError, StorageError
from tasks.tracking.client import TrackingError, TrackingUnavailable

USER_ERRORS = (ValueError, KeyError, ConfigError, CheckpointError, TrackingError, FileNotFoundError)
# Errors that are the caller's to fix (bad settings, data, URIs): retrying would only repeat them.
PERMANENT = (ValueError, TypeError, KeyError, FloatingPointError, ConfigError)


def is_user_error(err: BaseException) -> bool:
    """Exit code 2 (bad input) rather than 1."""
    return isinstance(err, USER_ERRORS)


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect's retry condition: retry what a rerun can fix (a storage or network error), never bad input."""
    try:
        state.result()
    except PERMANENT:
        return False
    except TrackingUnavailable:  # a tracking server that is restarting answers again
        return True
    except TrackingError:  # no such model or alias, a deleted experiment, a changed config
        return False
    except StorageError:  # a store that failed to answer may answer the next time
        return True
    except CheckpointError:  # a damaged or refused checkpoint stays so
        return False
    except Exception:
        return True
    return False
