"""The whole pipeline: pretrain -> fit reward model -> PPO -> best-of-n evaluation.

Each stage is its own flow (runnable alone, see flows/stages.py); this one only chains them under one MLflow parent
run. Stages hand each other registry URIs pinned to a version, so lineage names exact models. A stage whose config
and inputs are unchanged is reused, not retrained: change only a PPO setting and pretraining and the reward model
come back from the store.
"""

from __future__ import annotations

from prefect import flow

from flows.stages import eval_flow, ppo_flow, pretrain_flow, reward_flow
from tasks.config import PipelineConfig, apply_overrides, preset as make_preset
from tasks.preflight import check_pipeline
from tasks.runtime.orchestration import close_pipeline_run, open_pipeline_run
from tasks.runtime.signals import is_stop
from tasks.runtime.stage import StageResult


def build_config(preset: str = "demo", overrides: list[str] | None = None,
                 config: PipelineConfig | None = None) -> PipelineConfig:
    return apply_overrides(config or make_preset(preset), overrides or [])


def model_uri(result: StageResult) -> str:
    return f"models:/{result.model_name}/{result.model_version}"


@flow(name="palm-rlhf-pipeline")
def pipeline(preset: str = "demo", overrides: list[str] | None = None,
             config: PipelineConfig | None = None) -> dict[str, StageResult]:
    """Run all four stages. Give a preset ("tiny", "demo") plus `stage.key=value` overrides, or a whole config."""
    cfg = build_config(preset, overrides, config)
    check_pipeline(cfg)  # every stage's inputs, before anything is written (done already when the CLI started it)
    parent = open_pipeline_run(preset if config is None else "custom", list(overrides or []))
    results, stopped = None, False
    try:
        pretrained = pretrain_flow(cfg.pretrain, parent_run_id=parent)
        reward = reward_flow(model_uri(pretrained), cfg.reward, parent_run_id=parent)
        policy = ppo_flow(model_uri(pretrained), model_uri(reward), cfg.ppo, parent_run_id=parent)
        evaluation = eval_flow(model_uri(pretrained), model_uri(reward), model_uri(policy), cfg.eval,
                               parent_run_id=parent)
        results = {"pretrain": pretrained, "reward": reward, "ppo": policy, "eval": evaluation}
        return results
    except BaseException as exc:
        stopped = is_stop(exc)
        raise
    finally:
        close_pipeline_run(parent, results, stopped=stopped)
