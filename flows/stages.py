"""One Prefect flow per stage. Each takes its typed config and its inputs as checkpoint or registry URIs."""

from __future__ import annotations

import re

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.common import compute_options, pin_model, publish, verify
from tasks.config import EvalConfig, PPOConfig, PretrainConfig, RewardConfig
from tasks.evaluate import run_eval
from tasks.ppo import run_ppo
from tasks.pretrain import run_pretrain
from tasks.reward import run_reward
from tasks.stage import StageResult


@task(name="pretrain-train")
def pretrain_task(config: PretrainConfig, parent_run_id: str | None) -> StageResult:
    return run_pretrain(config, parent_run_id=parent_run_id)


@task(name="reward-fit")
def reward_task(config: RewardConfig, pretrained: str, parent_run_id: str | None) -> StageResult:
    return run_reward(config, pretrained, parent_run_id=parent_run_id)


@task(name="ppo-train")
def ppo_task(config: PPOConfig, pretrained: str, reward_model: str, parent_run_id: str | None) -> StageResult:
    return run_ppo(config, pretrained, reward_model, parent_run_id=parent_run_id)


@task(name="eval-best-of-n")
def eval_task(config: EvalConfig, pretrained: str, reward_model: str, policy: str,
              parent_run_id: str | None) -> StageResult:
    return run_eval(config, pretrained, reward_model, policy, parent_run_id=parent_run_id)


def eval_rows(metrics: dict[str, float]) -> list[dict]:
    """One row per policy and n, from metric names like oracle_mean.ppo.best_of_16."""
    rows = []
    for key, value in metrics.items():
        match = re.fullmatch(r"oracle_mean\.(\w+)\.best_of_(\d+)", key)
        if match:
            policy, n = match.groups()
            rows.append({"policy": policy, "n": int(n), "oracle_mean": round(value, 3),
                         "reward_mean": round(metrics[f"reward_mean.{policy}.best_of_{n}"], 3),
                         "kl_per_token": round(metrics[f"kl_per_token.{policy}"], 4),
                         "distinct_2": round(metrics[f"distinct_2.{policy}"], 3)})
    return sorted(rows, key=lambda r: (r["policy"], r["n"]))


def _finish(result: StageResult) -> StageResult:
    if result.checkpoint_uri:
        verify(result.checkpoint_uri)
    publish(result)
    return result


@flow(name="pretrain")
def pretrain_flow(config: PretrainConfig = PretrainConfig(), parent_run_id: str | None = None) -> StageResult:
    """Next-token pretraining on a corpus; registers `palm-pretrained`."""
    return _finish(pretrain_task.with_options(**compute_options())(config, parent_run_id))


@flow(name="reward")
def reward_flow(pretrained: str, config: RewardConfig = RewardConfig(),
                parent_run_id: str | None = None) -> StageResult:
    """Fit the reward model on feedback (simulated when none is given); registers `palm-reward`."""
    pretrained = pin_model(pretrained)
    return _finish(reward_task.with_options(**compute_options())(config, pretrained, parent_run_id))


@flow(name="ppo")
def ppo_flow(pretrained: str, reward_model: str, config: PPOConfig = PPOConfig(),
             parent_run_id: str | None = None) -> StageResult:
    """PPO against the reward model with a KL penalty to the frozen pretrained policy; registers `palm-policy`."""
    pretrained, reward_model = pin_model(pretrained), pin_model(reward_model)
    return _finish(ppo_task.with_options(**compute_options())(config, pretrained, reward_model, parent_run_id))


@flow(name="eval")
def eval_flow(pretrained: str, reward_model: str, policy: str, config: EvalConfig = EvalConfig(),
              parent_run_id: str | None = None) -> StageResult:
    """Best-of-n on held-out prompts for the pretrained and PPO policies; promotes `champion` on a win."""
    pretrained, reward_model, policy = pin_model(pretrained), pin_model(reward_model), pin_model(policy)
    result = eval_task.with_options(**compute_options())(config, pretrained, reward_model, policy, parent_run_id)
    create_table_artifact(eval_rows(result.metrics), key="palm-rlhf-eval-results",
                          description="best-of-n on held-out prompts: oracle rating and reward-model score")
    publish(result)
    return result
