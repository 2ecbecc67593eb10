"""One Prefect flow per stage: pin the inputs, run the stage's task, verify its checkpoint, publish its result.

Each flow takes its typed config and its inputs as checkpoint or registry URIs; the work is in the task that
`tasks/<stage>.py` defines.
"""

from __future__ import annotations

from prefect import flow, tags

from tasks.config import EvalConfig, PPOConfig, PretrainConfig, RewardConfig
from tasks.evaluate import eval_task
from tasks.ppo import ppo_task
from tasks.pretrain import pretrain_task
from tasks.reward import reward_task
from tasks.runtime.orchestration import device_tag, pin_model, publish, verify
from tasks.runtime.stage import StageResult


def _finish(result: StageResult) -> StageResult:
    if result.checkpoint_uri:
        verify(result.checkpoint_uri)
    publish(result)
    return result


@flow(name="pretrain")
def pretrain_flow(config: PretrainConfig = PretrainConfig(), parent_run_id: str | None = None) -> StageResult:
    """Next-token pretraining on a corpus; registers `palm-pretrained`."""
    with tags(device_tag(config.runtime)):  # the compute task only
        result = pretrain_task(config, parent_run_id)
    return _finish(result)


@flow(name="reward")
def reward_flow(pretrained: str, config: RewardConfig = RewardConfig(),
                parent_run_id: str | None = None) -> StageResult:
    """Fit the reward model on feedback (simulated when none is given); registers `palm-reward`."""
    pretrained = pin_model(pretrained)
    with tags(device_tag(config.runtime)):  # the compute task only
        result = reward_task(config, pretrained, parent_run_id)
    return _finish(result)


@flow(name="ppo")
def ppo_flow(pretrained: str, reward_model: str, config: PPOConfig = PPOConfig(),
             parent_run_id: str | None = None) -> StageResult:
    """PPO against the reward model with a KL penalty to the frozen pretrained policy; registers `palm-policy`."""
    pretrained, reward_model = pin_model(pretrained), pin_model(reward_model)
    with tags(device_tag(config.runtime)):  # the compute task only
        result = ppo_task(config, pretrained, reward_model, parent_run_id)
    return _finish(result)


@flow(name="eval")
def eval_flow(pretrained: str, reward_model: str, policy: str, config: EvalConfig = EvalConfig(),
              parent_run_id: str | None = None) -> StageResult:
    """Best-of-n on held-out prompts for the pretrained and PPO policies; promotes `champion` on a win."""
    pretrained, reward_model, policy = pin_model(pretrained), pin_model(reward_model), pin_model(policy)
    with tags(device_tag(config.runtime)):  # the compute task only
        result = eval_task(config, pretrained, reward_model, policy, parent_run_id)
    publish(result)
    return result
