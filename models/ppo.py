"""PPO for language models as pure functions on (b, T) tensors of per-token values.

T indexes response tokens (actions). `mask` is True for real actions and False after a row's eos, so padding never
reaches a loss. References: Schulman et al. 2017 (clipped surrogate, https://arxiv.org/abs/1707.06347), GAE
(Schulman et al. 2015, https://arxiv.org/abs/1506.02438), the per-token KL penalty to a frozen reference policy and
its adaptive coefficient (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, section 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.config import NonNegative, Positive, PositiveFloat, UnitInterval, check_bounds


@dataclass(frozen=True)
class PPOConfig:
    """PPO's hyperparameters: the pipeline's PPO stage nests this object (`ppo.kl_coef=0.2` sets it)."""

    gamma: UnitInterval = 1.0  # discount over response tokens
    lam: UnitInterval = 0.95  # GAE's lambda
    clip_eps: PositiveFloat = 0.2  # the policy ratio's clip range
    value_clip_eps: PositiveFloat = 0.2
    value_coef: NonNegative = 0.5
    entropy_coef: NonNegative = 0.0
    kl_coef: NonNegative = 0.1  # weight of the per-token KL penalty to the reference policy
    adaptive_kl: bool = False  # move kl_coef toward kl_target (Ziegler et al. 2019)
    kl_target: PositiveFloat = 6.0  # nats per sequence, for the adaptive controller
    kl_horizon: Positive = 10000
    ppo_epochs: Positive = 4  # passes over each batch of rollouts
    max_grad_norm: PositiveFloat = 1.0
    whiten_advantages: bool = True
    dense_rewards: bool = True  # credit each token with its share of the reward, where the reward model has them

    def __post_init__(self):
        check_bounds(self)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit variance over the real tokens; padding stays zero."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask.to(x.dtype)


def kl_penalty_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward: -kl_coef * (log pi - log pi_ref) on every action, plus the score.

    scores (b,): the sequence score, on the last action. scores (b, T): each action's own share of it (dense
    rewards), on that action. The other tensors are (b, T). Returns (b, T), zero on padding.
    """
    m = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * m
    if scores.ndim == 2:
        return rewards + scores.to(rewards.dtype) * m
    last = (mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True)) & mask  # the final real action of each row
    return rewards + scores[:, None].to(rewards.dtype) * last.to(rewards.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens; the value after the last real action is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    """
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nxt = m[:, t + 1] if t + 1 < T else torch.zeros_like(m[:, 0])
        delta = rewards[:, t] + gamma * next_value * nxt - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv * nxt) * m[:, t]
        next_value, next_adv = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * m


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate. Returns (loss, clip fraction, approximate KL old -> new)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).to(logprobs.dtype), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # Schulman's k3 estimator, always >= 0
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float) -> Tensor:
    """0.5 * max((V - R)^2, (V_old + clip(V - V_old) - R)^2), mean over real tokens."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(b, T, vocab) -> (b, T) entropy of the categorical distribution."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """(b, T, vocab), (b, T) -> (b, T) log-probabilities of the taken tokens."""
    return logits.float().log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


class KLController:
    """Fixed coefficient, or Ziegler et al.'s proportional controller toward a target KL when adaptive."""

    def __init__(self, kl_coef: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = kl_coef, adaptive, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.adaptive:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "adaptive": self.adaptive, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.adaptive = float(state["value"]), bool(state["adaptive"])
        self.target, self.horizon = float(state["target"]), int(state["horizon"])
