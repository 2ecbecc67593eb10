"""The one training loop: pretraining, reward fitting and PPO all run their steps through `train`.

The loop owns what the stages share: resuming from the last complete checkpoint, the non-finite guard and its message,
metrics to MLflow, a checkpoint every `checkpoint_every` steps and at the end (rank 0 writes, the other ranks wait),
the progress bar, and starting the ranks of a data-parallel stage. A stage brings a `Training`: what its step does and
what its checkpoint holds.

Metrics reach MLflow exactly once per step, with the values of the run whose weights are kept: a step's metrics are
sent only after the checkpoint that covers the step is published. That checkpoint lists every metric MLflow has not
acknowledged yet, with the timestamp it was logged at; a resumed run sends that list again before its first step (MLflow
keeps one copy of identical metrics), and the steps after the checkpoint, whose metrics were never sent, are computed
and logged anew. So the MLflow curve grows at each checkpoint; the progress bar shows every step as it happens.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Protocol

import torch

from tasks.runtime import parallel
from tasks.runtime.fingerprint import stage_modules
from tasks.runtime.progress import progress_bar
from tasks.runtime.stage import StageRun
from tasks.storage.checkpoints import Checkpoint, CheckpointRef, load_checkpoint, save_checkpoint


class Training(Protocol):
    """A stage's own part of training. It is pickled to every rank of a data-parallel stage, so it holds settings and
    inputs until `start` builds the models there."""

    steps: int
    checkpoint_every: int
    shown: tuple[str, ...]  # metrics on the progress bar
    may_be_nan: frozenset[str]  # metrics that can be undefined without anything being broken

    def start(self, run: StageRun, resumed: Checkpoint | None) -> None:
        """Build the models and the optimiser on run.device (on every rank), from the checkpoint to continue from when
        there is one: its weights and trainer state (the loop knows its step)."""

    def step(self, step: int) -> dict[str, float]:
        """One training step (0-based); its metrics. A FloatingPointError stops the stage before anything is kept."""

    def describe(self, step: int) -> str:
        """What a person needs beside a non-finite number to see why it happened: "lr 0.003"."""

    def checkpoint(self) -> dict:
        """save_checkpoint's arguments for the state right now: weights, state, kind, model_config, parents, data,
        extra. A collective under FSDP: every rank calls it, rank 0 writes."""

    def report(self, run: StageRun, ref: CheckpointRef, metrics: dict[str, float]) -> dict[str, float]:
        """Rank 0, after the last step: plots and samples for people; the stage's headline metrics."""


def train(run: StageRun, training: Training) -> tuple[CheckpointRef, dict[str, float]]:
    """Train from the last complete checkpoint (or from scratch) to `training.steps`: (final checkpoint, headline
    metrics). With several processes, every rank runs this same loop."""
    if run.runtime.world_size > 1 and not parallel.active():
        from tasks.runtime.launch import launch

        return launch(run, partial(train, training=training))
    ref = run.resume_from
    resumed = load_checkpoint(ref.uri) if ref is not None else None
    if resumed is not None:  # sent before the kill, or not: MLflow keeps one copy either way
        run.metrics.resend(resumed.manifest.get("unsent_metrics", []))
        run.metrics.flush()
    training.start(run, resumed)
    start, metrics = (ref.step, resumed.manifest.get("metrics", {})) if resumed else (0, {})
    with progress_bar(run.stage, training.steps, start) as show:
        for step in range(start, training.steps):
            done = step + 1
            try:  # a non-finite number stops the stage before it is logged or checkpointed
                metrics = training.step(step)
                check_finite(metrics, training.may_be_nan)
            except FloatingPointError as err:
                kept = (f"the last good checkpoint, step {ref.step}, is kept: {ref.uri}" if ref
                        else "no checkpoint was written")
                raise FloatingPointError(f"{run.stage} stopped at step {done} ({training.describe(step)}): {err}; "
                                         f"{kept}") from None
            run.metrics.log(done, **metrics)
            show(done, **{k: metrics[k] for k in training.shown if k in metrics})
            if done % training.checkpoint_every == 0 or done == training.steps:
                ref = _save(run, done, training.checkpoint(), metrics) or ref
                run.metrics.flush()  # covered by a published checkpoint now: never computed (and logged) again
    run.metrics.flush()
    if not parallel.is_main():  # rank 0 reports; the launcher returns its result
        return ref, {}
    return ref, training.report(run, ref, metrics)


def check_finite(metrics: dict[str, float], may_be_nan: frozenset[str] = frozenset()) -> None:
    """FloatingPointError naming the first metric that is inf or NaN (NaN allowed where `may_be_nan` says)."""
    for name, value in metrics.items():
        if not math.isfinite(value) and not (name in may_be_nan and math.isnan(value)):
            raise FloatingPointError(f"{name} is {value}")


def _save(run: StageRun, step: int, fields: dict, metrics: dict[str, float]) -> CheckpointRef | None:
    """Rank 0 writes the checkpoint, with the step's metrics in its manifest (the cache's headline numbers); the
    others wait for it."""
    ref = None
    if parallel.is_main():
        kept = {k: v for k, v in metrics.items() if math.isfinite(v) and not k.endswith("_per_s")}
        fields["extra"] = {**fields.get("extra", {}), "metrics": kept, "unsent_metrics": run.metrics.unsent(),
                           "code": {"fingerprint": run.code, "modules": stage_modules(run.stage)}}
        ref = save_checkpoint(run.prefix, step, stage_config=run.config.model_dump(mode="json"), **fields)
    parallel.barrier()
    return ref


# ---------------------------------------------------------------- trainer state, flat for the checkpoint


def optimizer_state(optimizer: torch.optim.Optimizer | dict) -> dict:
    """An optimiser's state_dict as flat checkpoint state: each moment a tensor `optimizer.<param>.<name>`, the
    settings a JSON value `optimizer.param_groups`."""
    state_dict = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    flat = {"optimizer.param_groups": state_dict["param_groups"]}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            flat[f"optimizer.{index}.{name}"] = value
    return flat


def optimizer_state_dict(state: dict) -> dict:
    """The state_dict `optimizer_state` flattened, for `optimizer.load_state_dict`."""
    nested: dict[int, dict] = {}
    for key, value in state.items():
        if key.startswith("optimizer.") and key != "optimizer.param_groups":
            _, index, name = key.split(".", 2)
            nested.setdefault(int(index), {})[name] = value
    return {"state": dict(sorted(nested.items())), "param_groups": state["optimizer.param_groups"]}


class Throughput:
    """Items per second over the last interval, for the progress bar and the metrics."""

    def __init__(self):
        self.last = time.perf_counter()

    def rate(self, items: float) -> float:
        now = time.perf_counter()
        rate = items / max(now - self.last, 1e-9)
        self.last = now
        return rate
