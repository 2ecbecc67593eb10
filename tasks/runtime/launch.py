"""Starting a data-parallel stage's ranks (one process per GPU, on one or several machines), and a dead rank's error.

When `runtime.nproc_per_node x runtime.nnodes` is above one, the stage checks its inputs and opens its MLflow run as
always; then `tasks.runtime.loop.train` hands itself to `launch`, which starts the workers with `elastic_launch` (the
engine behind torchrun), and each worker runs the same training loop with the process group up:

- every rank resumes from the same checkpoint (node 0's choice, broadcast) and logs to node 0's MLflow run;
- a rank that dies stops the stage at once (the launcher ends the others) with an error naming it; a rank stuck in a
  collective fails it after `runtime.collective_timeout_s`.

Across machines every node runs the same stage command with its own `runtime.node_rank` and node 0's
`runtime.rdzv_endpoint`. The rendezvous is static on purpose: node 0 must hold global rank 0, because its process owns
the MLflow run, the cache decision and the registry; c10d would number the nodes in the order they arrive.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.config import Runtime
from tasks.runtime.signals import Terminated
from tasks.runtime.stage import StageRun, resolve_runtime
from tasks.storage.checkpoints import CheckpointRef
from tasks.tracking.runs import MetricLogger


class WorkerFailed(RuntimeError):
    """A training process ended without a Python exception: a signal (the OOM killer, a lost node), a hard exit."""



def check_devices(runtime: Runtime) -> None:
    """Before any run opens: this machine has a GPU for each rank it is to start."""
    device, _ = resolve_runtime(runtime)
    if device.type == "cuda" and torch.cuda.device_count() < runtime.nproc_per_node:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        raise ValueError(f"runtime.nproc_per_node is {runtime.nproc_per_node} but this machine shows "
                         f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES: {visible})")


def launch(run: StageRun, train_fn) -> tuple[CheckpointRef, dict[str, float]]:
    """Run train_fn(run) on this node's ranks; returns rank 0's (final checkpoint, metrics).

    train_fn must pickle (a module-level function or a functools.partial of one): the workers are fresh processes.
    On a node after 0, `run.run_id` is set from node 0's run once the ranks are done.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rt = run.runtime
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # what this process cached (simulated feedback) would crowd rank 0's GPU
    plan = replace(run, metrics=None, result=None, _finish=None)  # what a worker needs to rebuild the run
    with tempfile.TemporaryDirectory(prefix="palm-rlhf-ranks-") as tmp:
        config = LaunchConfig(
            min_nodes=rt.nnodes, max_nodes=rt.nnodes, nproc_per_node=rt.nproc_per_node, run_id=run.run_key,
            rdzv_backend="static", rdzv_endpoint=rt.rdzv_endpoint or f"127.0.0.1:{_free_port()}",
            rdzv_configs={"rank": rt.node_rank, "timeout": rt.collective_timeout_s},
            max_restarts=0,  # a retry is the orchestrator's call (Prefect), and it resumes from the last checkpoint
            monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs")))
        try:
            with _caller_signal_handlers():
                results = elastic_launch(config, _worker)(plan, train_fn, tmp, os.getpid())
        except ChildFailedError as err:
            raise _stage_error(err, tmp, rt.world_size) from None
        except SignalException as err:  # the launcher stopped the ranks; the stage stops as Ctrl-C would stop it
            if err.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            if err.sigval in (signal.SIGTERM, signal.SIGHUP):
                raise Terminated(err.sigval) from None
            raise
    out = results[min(results)]
    run.run_id = out["run_id"]
    return out["result"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _caller_signal_handlers():
    """The launcher installs its own SIGINT/SIGTERM handlers in the main thread; give the caller's back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n)]
    saved = {s: signal.getsignal(s) for s in signums}
    try:
        yield
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)


# ---------------------------------------------------------------- one worker


class _Unlogged:
    """Ranks after 0 keep their curves to themselves: MLflow hears each step once."""

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log(self, step: int, **metrics: float) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, float(value)))

    def flush(self, strict: bool = False) -> None:
        pass

    def unsent(self) -> list:
        return []

    def resend(self, records: list) -> None:
        pass



def _worker(plan: StageRun, train_fn, error_dir: str, launcher_pid: int) -> dict:
    """One rank: join the process group, take node 0's run and resume point, train, hand back rank 0's result."""
    _die_with_parent(launcher_pid)
    global_rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    try:
        device, amp = _worker_device(plan.runtime, local_rank)
        if global_rank:
            os.environ["PALM_RLHF_PROGRESS"] = "0"  # one progress bar per stage
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=plan.runtime.collective_timeout_s),
                                device_id=device if device.type == "cuda" else None)
        run_id, resume_from = _from_rank0(plan.run_id, plan.resume_from)
        metrics = MetricLogger(run_id, flush_every=None) if global_rank == 0 else _Unlogged()
        run = replace(plan, run_id=run_id, device=device, amp_dtype=amp, metrics=metrics, resume_from=resume_from)
        (result,) = _from_rank0(train_fn(run))
        dist.destroy_process_group()
        return {"result": result, "run_id": run_id}
    except BaseException as exc:
        _keep_error(exc, error_dir, global_rank)
        raise


def _worker_device(runtime: Runtime, local_rank: int) -> tuple[torch.device, torch.dtype | None]:
    device, amp = resolve_runtime(runtime)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // runtime.nproc_per_node))  # no oversubscription
    return device, amp


def _from_rank0(*values):
    """Every rank gets rank 0's values (node 0 decided the run and the resume point; rank 0 wrote the result)."""
    box = list(values)
    dist.broadcast_object_list(box, src=0)
    return box


def _die_with_parent(launcher_pid: int) -> None:
    """Without this a worker outlives a SIGKILLed stage process and goes on training and writing checkpoints."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            return
        if os.getppid() != launcher_pid:  # it was gone before the line above (pid 1 may be it, in a container)
            os._exit(1)


def _keep_error(exc: BaseException, folder: str, global_rank: int) -> None:
    """Save the exception for the launching process, so it raises the same one (a ValueError stays the user's)."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        Path(folder, f"rank-{global_rank}.pickle").write_bytes(data)
    except Exception:
        pass  # the launcher falls back to the message torchelastic recorded


def _kept_error(folder: str, global_rank: int) -> BaseException | None:
    path = Path(folder, f"rank-{global_rank}.pickle")
    try:
        return pickle.loads(path.read_bytes()) if path.exists() else None  # written by our own workers, just now
    except Exception:
        return None


def _stage_error(err, folder: str, world_size: int) -> BaseException:
    """The cause among the failed ranks: an exception raised by training itself first, then a rank that died, and
    last the errors of ranks left waiting on a dead peer in a collective."""
    def cause(item):
        global_rank, failure = item
        exc = _kept_error(folder, global_rank)
        if exc is None:
            order = 1 if failure.exitcode < 0 else 2
        else:
            order = 3 if isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() else 0
        return order, failure.timestamp, global_rank

    global_rank, failure = min(err.failures.items(), key=cause)
    exc = _kept_error(folder, global_rank)
    if exc is not None:
        exc.add_note(f"raised on rank {global_rank} of {world_size}")
        return exc
    if failure.exitcode < 0:
        try:
            how = f"exited with signal {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"exited with signal {-failure.exitcode}"
    else:
        message = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        how = f"failed: {message}" if message and message != "<N/A>" else f"exited with code {failure.exitcode}"
    return WorkerFailed(f"rank {global_rank} of {world_size} {how} (pid {failure.pid}); the stage stopped with it: "
                        "rerun it to resume from the last checkpoint")
