"""The run key's lease: one process at a time trains a run key; the others wait, then reuse its result."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from tasks.storage.store import (CheckpointError, StorageError, create_file, join_uri, read_file, remove_file,
                                 replace_file)

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
LEASE_TTL_S = 60.0  # a holder that stops renewing for this long is presumed dead
LEASE_RENEW_S = 10.0
LEASE_POLL_S = 1.0
_HELD: set[str] = set()  # owners of the leases this process holds now (a failed release leaves a file behind)


class RunLease:
    """One process at a time trains a run key: the others wait, then reuse its result.

    Two runs of one run key (a stage rerun racing the pipeline that runs the same stage) would write the same
    checkpoint folders and MLflow run. Bit-identical bytes would make that harmless, but a run key leaves out the
    device and the code version, so bytes can differ. The lease is ``<prefix>/_lease.json``, created exclusively
    (the store's atomic create); its holder renews it every LEASE_RENEW_S and removes it when done. A lease not
    renewed for LEASE_TTL_S, or held by a process of this host that no longer exists (a SIGKILLed stage), is
    abandoned and taken over, so a crash never blocks the rerun that resumes it.
    """

    def __init__(self, prefix: str, stage: str, waiting: str | None = None):
        self.uri, self.stage = join_uri(prefix, LEASE_FILE), stage
        # what the log says the holder is doing while this one waits
        self.waiting = waiting or "is running it with the same configuration and inputs"
        self.holder = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="run-lease", daemon=True)

    def __enter__(self) -> "RunLease":
        told = False
        while not create_file(self.uri, self._body()):
            current = self._read()
            if current is None:  # released between our two calls
                continue
            if current.get("owner") == self.holder["owner"]:  # ours: only the answer to our create was lost
                break
            if _abandoned(current):
                remove_file(self.uri)
                continue
            if not told:
                log.warning("stage %s: %s (pid %s) %s; waiting for it to finish", self.stage, current.get("host"),
                            current.get("pid"), self.waiting)
                told = True
            time.sleep(LEASE_POLL_S)
        _HELD.add(self.holder["owner"])
        self._renewer.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        _HELD.discard(self.holder["owner"])
        if isinstance(exc, StorageError):  # the store just failed us: the lease expires on its own, and a rerun on
            return                         # this host takes it over at once (its holder is gone)
        self._renewer.join()
        try:
            if (self._read() or {}).get("owner") == self.holder["owner"]:
                remove_file(self.uri)
        except CheckpointError:  # the store is away: the lease expires on its own
            pass

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "expires_at": time.time() + LEASE_TTL_S}).encode()

    def _read(self) -> dict | None:
        raw = read_file(self.uri)
        try:
            return None if raw is None else json.loads(raw)
        except ValueError:
            return {}  # garbled: abandoned

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                if (self._read() or {}).get("owner") != self.holder["owner"]:
                    log.warning("stage %s: lost the run lease %s (taken over after a stall)", self.stage, self.uri)
                    return
                replace_file(self.uri, self._body())
            except CheckpointError:  # a store hiccup: try again at the next renewal, well before expiry
                continue


def _abandoned(lease: dict) -> bool:
    if not isinstance(lease.get("expires_at"), (int, float)) or time.time() > lease["expires_at"]:
        return True
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    if lease["pid"] == os.getpid():  # this process: abandoned unless one of its leases still holds it
        return lease.get("owner") not in _HELD
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False
