"""Every input checked before the first compute: the files, raters and model URIs a user gives the pipeline or a
stage, read and validated in seconds, with each stage's own one-line errors.

`palm-rlhf run` and the pipeline flow (a deployment run) call `check_pipeline`; `palm-rlhf stage` calls
`check_stage`. Each stage contributes one function, `check_files(config, upstream)` beside its `check_inputs`, that
checks its files against the model it builds on; in a pipeline that model does not exist yet, so they are checked
against the one pretraining is about to make (its context length from the config, its corpus as configured). The
stages run their own checks again for callers that bypass these (a script, a stage deployment).

A store that does not answer is retried (tasks.outage.retrying: each attempt logged); bad input fails at once.
"""

from __future__ import annotations

from tasks import evaluate, ppo, pretrain, reward
from tasks.config import PipelineConfig
from tasks.outage import retrying
from tasks.runtime.launch import check_devices
from tasks.runtime.stage import resolve_runtime
from tasks.storage.inputs import Upstream
from tasks.tracking import client as tracking

STAGES = ("pretrain", "reward", "ppo", "eval")
# A tracking server that does not answer when a command starts is down, not blinking (registry URIs ask it): one line
# at once, exit code 1. The stage's Prefect task retries tracking failures once training has started.
_NOT_RETRIED = (tracking.TrackingUnavailable,)
_passed: set[str] = set()  # configs this process has checked whole: the CLI checks, then its pipeline flow


def check_pipeline(config: PipelineConfig) -> None:
    """Every stage's inputs, before pretraining starts: the corpus, the feedback file or what simulating feedback
    needs, the PPO and evaluation prompts, the raters, the devices; then that the tracking server answers."""
    key = config.model_dump_json()
    if key in _passed:
        return
    retrying("checking the pipeline's inputs", lambda: _check_files(config), unless=_NOT_RETRIED)
    tracking.check_tracking()  # a server that is not up at the start is not a blip: one line, at once
    _passed.add(key)


def _check_files(config: PipelineConfig) -> None:
    for name in STAGES:
        resolve_runtime(getattr(config, name).runtime)
        if name != "eval":
            check_devices(getattr(config, name).runtime)
    pretrain.check_corpus_input(config.pretrain)
    planned = Upstream(config.pretrain.model.max_seq_len, lambda: pretrain.plan_corpus(config.pretrain))
    from_feedback = config.reward.feedback is not None
    reward.check_files(config.reward, planned)
    ppo.check_files(config.ppo, planned, from_feedback=from_feedback)
    simulated_with = None if from_feedback else config.reward.labeler
    evaluate.check_files(config.eval, planned, simulated_with=simulated_with, from_feedback=from_feedback)


def check_stage(name: str, config: PipelineConfig, inputs: dict[str, str]) -> None:
    """One stage's inputs as `palm-rlhf stage` gives them: its settings, files and model URIs."""
    stage_config = getattr(config, name)

    def check() -> None:
        if name == "pretrain":
            pretrain.check_corpus_input(stage_config)
            resolve_runtime(stage_config.runtime)
        elif name == "reward":
            reward.check_inputs(stage_config, inputs["pretrained"])
        elif name == "ppo":
            ppo.check_inputs(stage_config, inputs["pretrained"], inputs["reward_model"])
        else:
            evaluate.resolve_eval_inputs(stage_config, inputs["pretrained"], inputs["reward_model"],
                                         inputs["policy"])
            resolve_runtime(stage_config.runtime)

    retrying(f"checking the inputs of stage {name}", check, unless=_NOT_RETRIED)
    tracking.check_tracking()
