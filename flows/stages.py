"""One Prefect flow per stage. Each takes its typed config and its inputs as checkpoint or registry URIs."""

from __future__ import annotations

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
    rows = [{"metric": k, "value": round(v, 4)} for k, v in sorted(result.metrics.items())]
    create_table_artifact(rows, key="palm-rlhf-eval-results", description="best-of-n evaluation")
    publish(result)
    return result
