"""Which failures are the user's to fix and which a retry may cure: the CLI's exit codes and Prefect's retries.

    0    done
    1    not the input's fault: a store or tracking server that did not answer (after the retries), a rank that died,
         a non-finite loss, an internal error; rerun the same command to resume
    2    bad input: settings, data, URIs, a damaged or refused checkpoint; never retried: fix the command
    130  interrupted (Ctrl-C); 143 stopped (SIGTERM): rerun the same command to resume

An outage (`tasks.outage.Unavailable`: the store's StorageError, the tracking server's TrackingUnavailable, a data
read that got no answer) is retried; bad input, a damaged checkpoint and a non-finite loss never are.
"""

from __future__ import annotations

from tasks.config import ConfigError
from tasks.outage import Unavailable
from tasks.storage.store import CheckpointError
from tasks.tracking.client import TrackingError

USER_ERRORS = (ValueError, KeyError, ConfigError, CheckpointError, TrackingError, FileNotFoundError)
# Errors that are the caller's to fix (bad settings, data, URIs): retrying would only repeat them.
PERMANENT = (ValueError, TypeError, KeyError, FloatingPointError, ConfigError)


def is_user_error(err: BaseException) -> bool:
    """Exit code 2 (bad input) rather than 1."""
    return isinstance(err, USER_ERRORS) and not isinstance(err, Unavailable)


def exit_code(err: BaseException) -> int:
    return 2 if is_user_error(err) else 1


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect's retry condition: retry what a rerun can fix (a store or server that did not answer), never bad
    input."""
    try:
        state.result()
    except Unavailable:  # a store or tracking server that did not answer may answer the next time
        return True
    except PERMANENT:
        return False
    except (TrackingError, CheckpointError):  # no such model or alias, a changed config; damage, a refused request
        return False
    except Exception:
        return True
    return False
