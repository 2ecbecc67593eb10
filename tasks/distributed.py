"""Data-parallel stages on torch.distributed: the launch, the rules every rank follows, and a dead rank's error.

A stage's plain function (`run_pretrain`, ...) stays the entry point. When `runtime.nproc_per_node x runtime.nnodes`
is above one it checks its inputs and opens its MLflow run as always, then starts the workers with `elastic_launch`
(the engine behind torchrun); each worker runs the stage's training function with the process group up:

- every rank draws the same global batch from the same generator and trains on its contiguous slice (`shard`); DDP
  or FSDP averages the gradients, so a step is the one-process step on the global batch up to float summation order;
- the loss every rank checks and reports is the mean over ranks (`global_loss`), so a non-finite loss stops all ranks
  at the same step, and gradient clipping sees the same global norm everywhere;
- every rank resumes from the same checkpoint (node 0's choice, broadcast); only rank 0 writes checkpoints and MLflow
  records, and `barrier` holds the others until it has;
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
import random
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tasks import stage as stages
from tasks import tracking
from tasks.config import Runtime
from tasks.stage import StageResult, StageRun, cached_result, resolve_runtime, run_key, stage_prefix
from tasks.store import CheckpointRef


class WorkerFailed(RuntimeError):
    """A training process ended without a Python exception: a signal (the OOM killer, a lost node), a hard exit."""


# ---------------------------------------------------------------- where this process stands


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Hold every rank until rank 0 has written what the others may read next (a checkpoint)."""
    if active():
        dist.barrier()


# ---------------------------------------------------------------- the stage entry


def execute(stage: str, config, *, inputs: dict, model_name: str | None, train_fn, lineage: dict,
            parent_run_id: str | None = None, log_inputs=None) -> StageResult:
    """`tasks.stage.execute`, training on `config.runtime`'s processes when there are more than one.

    train_fn(run) -> (CheckpointRef, metrics) must pickle (a module-level function or a functools.partial of one):
    the workers are fresh processes.
    """
    runtime = config.runtime
    if runtime.world_size > 1:
        _check_devices(runtime)
    kwargs = dict(inputs=inputs, model_name=model_name, lineage=lineage, parent_run_id=parent_run_id,
                  log_inputs=log_inputs)
    if runtime.world_size == 1:
        return stages.execute(stage, config, train_fn=train_fn, **kwargs)
    if runtime.node_rank > 0:
        return _join(stage, config, inputs, model_name, train_fn)
    return stages.execute(stage, config, train_fn=partial(_launch_run, runtime=runtime, train_fn=train_fn), **kwargs)


def _check_devices(runtime: Runtime) -> None:
    device, _ = resolve_runtime(runtime)
    if device.type == "cuda" and torch.cuda.device_count() < runtime.nproc_per_node:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        raise ValueError(f"runtime.nproc_per_node is {runtime.nproc_per_node} but this machine shows "
                         f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES: {visible})")


def _launch_run(run: StageRun, *, runtime: Runtime, train_fn):
    plan = _Plan(run.stage, run.run_key, run.prefix, run.run_id, run.resume_from, runtime)
    return launch(plan, train_fn)["result"]


def _join(stage: str, config, inputs: dict, model_name: str | None, train_fn) -> StageResult:
    """A node after 0 adds its workers to node 0's stage, unless node 0 will find the stage done and start nothing."""
    key = run_key(stage, config, inputs)
    hit = cached_result(stage, key, config.steps, model_name)
    if hit is not None:
        return hit
    out = launch(_Plan(stage, key, stage_prefix(stage, key), None, None, config.runtime), train_fn)
    ref, metrics = out["result"]
    return StageResult(stage=stage, checkpoint_uri=ref.uri, digest=ref.digest, mlflow_run_id=out["run_id"],
                       model_name=model_name, run_key=key, metrics=metrics)


@dataclass(frozen=True)
class _Plan:
    """What a worker needs to rebuild the StageRun; run_id and resume_from come from node 0 (broadcast)."""

    stage: str
    run_key: str
    prefix: str
    run_id: str | None
    resume_from: CheckpointRef | None
    runtime: Runtime
    error_dir: str = ""
    launcher_pid: int = 0


def launch(plan: _Plan, train_fn) -> dict:
    """Run train_fn on this node's ranks; returns {"result": rank 0's (ref, metrics), "run_id": ...}."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rt = plan.runtime
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # what this process cached (simulated feedback) would crowd rank 0's GPU
    with tempfile.TemporaryDirectory(prefix="palm-rlhf-ranks-") as tmp:
        config = LaunchConfig(
            min_nodes=rt.nnodes, max_nodes=rt.nnodes, nproc_per_node=rt.nproc_per_node, run_id=plan.run_key,
            rdzv_backend="static", rdzv_endpoint=rt.rdzv_endpoint or f"127.0.0.1:{_free_port()}",
            rdzv_configs={"rank": rt.node_rank, "timeout": rt.collective_timeout_s},
            max_restarts=0,  # a retry is the orchestrator's call (Prefect), and it resumes from the last checkpoint
            monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs")))
        try:
            with _caller_signal_handlers():
                results = elastic_launch(config, _worker)(replace(plan, error_dir=tmp, launcher_pid=os.getpid()),
                                                          train_fn)
        except ChildFailedError as err:
            raise _stage_error(err, tmp, rt.world_size) from None
        except SignalException as err:
            if err.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise
    return results[min(results)]


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


def _worker(plan: _Plan, train_fn) -> dict:
    """One rank: join the process group, take node 0's run and resume point, train, hand back rank 0's result."""
    _die_with_parent(plan.launcher_pid)
    global_rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    try:
        device, amp = _worker_device(plan.runtime, local_rank)
        if global_rank:
            os.environ["PALM_RLHF_PROGRESS"] = "0"  # one progress bar per stage
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=plan.runtime.collective_timeout_s),
                                device_id=device if device.type == "cuda" else None)
        run_id, resume_from = _from_rank0(plan.run_id, plan.resume_from)
        metrics = tracking.MetricLogger(run_id) if global_rank == 0 else _Unlogged()
        run = StageRun(plan.stage, plan.run_key, plan.prefix, run_id, device, amp, metrics, resume_from=resume_from)
        random.seed(plan.run_key)  # as tasks.stage.execute seeds it: identical runs save identical RNG states
        (result,) = _from_rank0(train_fn(run))
        dist.destroy_process_group()
        return {"result": result, "run_id": run_id}
    except BaseException as exc:
        _keep_error(exc, plan.error_dir, global_rank)
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


# ---------------------------------------------------------------- training on every rank


def shard(batch):
    """This rank's contiguous slice of a global batch (tensor, list, index): equal slices, in rank order."""
    if not active():
        return batch
    n = len(batch) // world()
    return batch[rank() * n:(rank() + 1) * n]


def global_loss(loss_fn):
    """loss_fn() on this rank's slice -> the same loss whose value is the mean over ranks.

    The gradient stays the local one (DDP and FSDP average gradients themselves); the value is what train_step checks
    and reports, so a non-finite loss on any rank stops every rank at the same step instead of leaving them waiting.
    Extra statistics (loss, {"accuracy": ...}) are averaged too.
    """
    if not active():
        return loss_fn

    def mean_over_ranks():
        out = loss_fn()
        loss, extra = out if isinstance(out, tuple) else (out, {})
        values = torch.stack([loss.detach().float(),
                              *(torch.as_tensor(v).detach().float().to(loss.device) for v in extra.values())])
        dist.all_reduce(values)
        values = values / world()
        mean_loss = loss + (values[0] - loss.detach().float()).to(loss.dtype)
        return (mean_loss, dict(zip(extra, values[1:]))) if isinstance(out, tuple) else mean_loss

    return mean_over_ranks


def mean(stats: dict[str, float]) -> dict[str, float]:
    """The mean of each statistic over ranks (every rank holds an equal share of the batch)."""
    if not active():
        return stats
    values = torch.tensor([float(v) for v in stats.values()], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values)
    return dict(zip(stats, (values / world()).tolist()))


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class LossModule(nn.Module):
    """forward(*args) = loss_fn(module, *args), so DDP sees a loss that is not the module's own forward."""

    def __init__(self, module: nn.Module, loss_fn):
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(self.module, *args, **kwargs)


def data_parallel(module: nn.Module, runtime: Runtime) -> nn.Module:
    """What to call for the loss: `module` in one process; DDP around it; or, with fsdp, `module` itself sharded in
    place: each block of every PaLM inside it, then the PaLM, then `module` for the weights around it (a reward head).
    Calls that do not go through its forward (evaluation) need `gathered(module)` under FSDP."""
    if not active():
        return module
    if runtime.strategy == "ddp":
        device = next(module.parameters()).device
        # The only buffers (rotary frequencies) never change: nothing to send before each forward.
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                                   forward_sync_buffers=False)
    from torch.distributed.fsdp import fully_shard

    from models.palm import PaLM

    for palm in [m for m in module.modules() if isinstance(m, PaLM)]:
        for block in palm.layers:
            fully_shard(block)
        fully_shard(palm)
    if not isinstance(module, PaLM):
        fully_shard(module)
    return module


@contextmanager
def gathered(module: nn.Module):
    """The weights FSDP keeps at `module`'s own level whole for the block (the PaLMs inside gather theirs in their
    forward): for calls that bypass its forward, such as evaluation. Every rank must make the same calls."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


class GradientAverager:
    """Averages the gradients of `params` over the ranks as soon as a backward pass has produced all of them, before
    the caller clips and steps: the all-reduce half of DDP for training loops that do not go through a forward
    (PPO's update calls the actor and the critic by name)."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.ready = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._accumulated)

    def _accumulated(self, _param) -> None:
        self.ready += 1
        if self.ready < len(self.params):
            return
        self.ready = 0
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= world()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def check(self) -> None:
        """A parameter that got no gradient would leave the ranks' weights apart: say so."""
        if self.ready:
            raise RuntimeError(f"{len(self.params) - self.ready} trainable parameters got no gradient in the last "
                               "backward pass, so gradients were not averaged across ranks")


# ---------------------------------------------------------------- checkpoints across ranks


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Weights and optimizer state as one process holds them, for rank 0 to write. Under FSDP this gathers the shards
    (a collective: call it on every rank); the optimizer state keeps the one-process layout so any world size and
    strategy can resume from it."""
    if not _sharded(module):
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    named = get_optimizer_state_dict(module, optimizer, options=options)
    if not is_main():
        return {}, {}
    position = {name: i for i, name in enumerate(_param_names(module, optimizer))}
    return weights, {"state": {position[n]: s for n, s in named["state"].items()},
                     "param_groups": [{**g, "params": [position[n] for n in g["params"]]}
                                      for g in named["param_groups"]]}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a one-process optimizer state (as `full_state` writes it) into a plain, DDP or FSDP optimizer."""
    if not _sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(module, optimizer)
    named = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, named, options=StateDictOptions(full_state_dict=True))


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: the order its one-process state numbers them."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def plain_copy(module: nn.Module, build) -> tuple[nn.Module | None, torch.device | None]:
    """(model, device) for rank 0's reports after training (sample generations): `module` itself unless FSDP sharded
    it; then a CPU copy built by build() from the gathered weights (a collective: call on every rank)."""
    if not _sharded(module):
        return module, next(module.parameters()).device
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None, None
    copy = build()
    copy.load_state_dict(weights)
    return copy, torch.device("cpu")
