"""Clean stops: SIGTERM (what Kubernetes, systemd, Slurm and `kill` send) is handled like Ctrl-C, and no process the
command started outlives it, however it ends.

In the process that runs the stage, `install()` turns SIGTERM and SIGHUP into `Terminated`, a KeyboardInterrupt: the
stage stops where it is, its MLflow run is marked KILLED, Prefect marks its flow run Crashed (inside a flow Prefect's
own SIGTERM bridge raises `TerminationSignal`, which counts the same), the last complete checkpoint is kept, the
ranks of a data-parallel stage are stopped, Prefect's temporary server is stopped at exit, and the exit code is 143
(130 for Ctrl-C, 129 for SIGHUP). The same command resumes afterwards.

SIGKILL cannot be handled by the process it kills, so on Linux the CLI runs its command one process down:
`supervise()` forks, and the process the user (or the scheduler) sees only waits. Its child runs the command, and the
kernel sends that child SIGTERM the moment the waiting process dies, whatever killed it (PR_SET_PDEATHSIG): SIGKILL
of the CLI becomes the clean stop above. The waiting process is also the subreaper of everything below it
(PR_SET_CHILD_SUBREAPER): should the child itself be killed outright, whatever it started (the temporary server)
is handed to the waiting process, which ends it before exiting with the child's code. It forwards SIGTERM and SIGHUP
to the child (a second one kills it), and SIGINT unless the terminal delivered that to the child already.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
_STOPS = (signal.SIGTERM, signal.SIGHUP)
_stopping = False


class Terminated(KeyboardInterrupt):
    """The command was asked to stop by a signal (SIGTERM, SIGHUP): handled like Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install() -> None:
    """SIGTERM and SIGHUP raise Terminated in the main thread, once: a second signal while the stage is stopping lets
    the stop finish (marking the runs) rather than interrupt it."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _STOPS:
        signal.signal(signum, _stop)


def _stop(signum, frame) -> None:
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise Terminated(signum)


def is_stop(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM or SIGHUP, whether our handler or Prefect's SIGTERM bridge raised it."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    try:
        from prefect.exceptions import TerminationSignal
    except ImportError:
        return False
    return isinstance(exc, TerminationSignal)


def stop_signal(exc: BaseException) -> int:
    """The signal a stop came from (SIGINT for Ctrl-C)."""
    signum = getattr(exc, "signum", None) or getattr(exc, "signal", None)
    return int(signum) if signum else int(signal.SIGINT)


def exit_code(exc: BaseException) -> int:
    return 128 + stop_signal(exc)


# ---------------------------------------------------------------- the waiting process (Linux)


def supervise() -> int | None:
    """Fork. In the child, return None (it goes on to run the command, dying with its parent); in this process, wait
    for it, forward stop signals, end what it left behind, and return its exit code. None everywhere but Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        install()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the line above: its SIGTERM was never sent
            os.kill(os.getpid(), signal.SIGTERM)
        return None
    return _wait(child)


def _wait(child: int) -> int:
    asked = {"count": 0}

    def forward(signum, frame) -> None:
        asked["count"] += 1
        _send(child, signal.SIGKILL if asked["count"] > 1 else signum)

    def forward_interrupt(signum, frame) -> None:
        if not _terminal_sent_it():
            _send(child, signum)

    for signum in _STOPS:
        signal.signal(signum, forward)
    signal.signal(signal.SIGINT, forward_interrupt)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # reaps what was handed to us too
        except ChildProcessError:
            return 1
        if pid == child:
            break
    _end_children()
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _terminal_sent_it() -> bool:
    """Ctrl-C at a terminal reaches every process of its foreground group, the child included."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def _children() -> list[int]:
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


def _end_children(grace_s: float = 5.0) -> None:
    """SIGTERM to whatever is left below this process, SIGKILL after `grace_s`; every one reaped."""
    deadline, told = time.monotonic() + grace_s, set()
    while children := _children():
        late = time.monotonic() > deadline
        for pid in children:
            if late or pid not in told:
                _send(pid, signal.SIGKILL if late else signal.SIGTERM)
                told.add(pid)
        time.sleep(0.1)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
