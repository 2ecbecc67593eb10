"""Training steps, the learning-rate schedule and the random streams a resumed run restores.

Steps take the device and dtype from their arguments (no globals), so DistributedDataParallel can wrap the model and
the same code runs on CPU (fp32) and GPU (bf16 autocast). The learning-rate schedule is a pure function of the step,
so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """bf16 autocast where asked for (on a GPU); a no-op on CPU fp32."""
    device = torch.device(device)
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(loss_fn, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, *, device,
               amp_dtype: torch.dtype | None = None, max_grad_norm: float | None = 1.0) -> dict[str, float]:
    """One optimisation step of loss_fn(); refuses a non-finite loss before touching the weights."""
    with autocast(device, amp_dtype):
        loss = loss_fn()
    if isinstance(loss, tuple):
        loss, extra = loss
    else:
        extra = {}
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}: stopping before the weights are touched")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"gradient norm is {grad_norm.item()}: stopping before the weights are touched")
    optimizer.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), **{k: float(v) for k, v in extra.items()}}


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Tensor]:
    """Every random stream a step can draw from, as tensors named `rng.<stream>`: the named generators a stage
    samples with, and torch's global CPU (and CUDA) streams, which the stages leave alone but a model with dropout
    would draw from. (Python's `random` is no stream of a step: nothing in a step draws from it.)"""
    state = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    state.update({f"rng.{name}": g.get_state() for name, g in (generators or {}).items()})
    return state


def restore_rng(state: dict[str, Tensor], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what capture_rng took (the CUDA streams only where this machine has them)."""
    torch.set_rng_state(state["rng.torch"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for name, g in (generators or {}).items():
        g.set_state(state[f"rng.{name}"])


def finite_or_raise(name: str, value: Tensor | float) -> None:
    v = float(value)
    if not math.isfinite(v):
        raise FloatingPointError(f"{name} is {v}")
