"""Training on every rank of a data-parallel stage: the rules each rank follows, and checkpoints across ranks.

- every rank draws the same global batch from the same generator and trains on its contiguous slice (`shard`); DDP
  or FSDP averages the gradients, so a step is the one-process step on the global batch up to float summation order;
- the loss every rank checks and reports is the mean over ranks (`global_loss`), so a non-finite loss stops all ranks
  at the same step, and gradient clipping sees the same global norm everywhere;
- only rank 0 writes checkpoints and MLflow records, and `barrier` holds the others until it has.

In one process every function here is the identity (or a no-op), so a stage's code reads the same either way.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from tasks.config import Runtime


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


def plain_copy(module: nn.Module, build, ref) -> tuple[nn.Module, torch.device]:
    """(model, device) for rank 0's reports after training (sample generations): `module` itself unless FSDP sharded
    it; then a CPU copy built by build() with the weights of `ref`, the checkpoint just written (no collective)."""
    if not _sharded(module):
        return module, next(module.parameters()).device
    from tasks.storage.checkpoints import load_checkpoint

    copy = build()
    copy.load_state_dict(load_checkpoint(ref.uri, load_state=False).weights)
    return copy, torch.device("cpu")
