"""Actor, critic and frozen reference policy on one PaLM, plus batched rollouts and the PPO update.

With LoRA (the default) the pretrained weights stay frozen, the actor and critic train their own scopes, and the
reference policy of the KL penalty is exactly the base model run without a scope: no second copy of the weights.
Without LoRA the actor trains every weight and a frozen copy is kept as the reference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from models.palm import PaLM
from models.ppo import (PPOConfig, entropy_from_logits, gae, gather_logprobs, kl_penalty_rewards, masked_mean,
                        masked_whiten, policy_loss, value_loss)
from models.reward import RewardModel
from models.sampling import in_precision, suppressed as suppressed_logits, token_ids


class ActorCritic(nn.Module):
    """actor_lora_r / critic_lora_r: each scope's LoRA rank (default lora_r). actor_dropout / critic_dropout: dropout
    in the actor's and the critic's forward passes while training (never in sampling or the reference policy)."""

    def __init__(self, palm: PaLM, actor_lora: bool = True, critic_lora: bool = True, lora_r: int = 8, *,
                 actor_lora_r: int | None = None, critic_lora_r: int | None = None, actor_dropout: float = 0.0,
                 critic_dropout: float = 0.0):
        super().__init__()
        for name, rate in (("actor_dropout", actor_dropout), ("critic_dropout", critic_dropout)):
            if not 0 <= rate < 1:
                raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
        self.palm = copy.deepcopy(palm)
        self.actor_lora, self.critic_lora, self.lora_r = actor_lora, critic_lora, lora_r
        self.actor_lora_r = actor_lora_r if actor_lora_r is not None else lora_r
        self.critic_lora_r = critic_lora_r if critic_lora_r is not None else lora_r
        self.actor_dropout, self.critic_dropout = actor_dropout, critic_dropout
        for scope, wanted, r in (("actor", actor_lora, self.actor_lora_r), ("critic", critic_lora, self.critic_lora_r)):
            if wanted and scope not in self.palm.finetune_modules:
                self.palm.add_finetune_params(scope, r)
        self.reference = None if actor_lora else _frozen(copy.deepcopy(palm))
        self.critic_palm = None if critic_lora else copy.deepcopy(palm)
        if actor_lora and critic_lora:
            for p in self.palm.base_parameters():
                p.requires_grad_(False)
        self.value_head = nn.Linear(palm.config.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def actor_scope(self) -> str | None:
        return "actor" if self.actor_lora else None

    def actor_parameters(self) -> list[nn.Parameter]:
        return self.palm.finetune_parameters("actor") if self.actor_lora else self.palm.base_parameters()

    def critic_parameters(self) -> list[nn.Parameter]:
        body = self.palm.finetune_parameters("critic") if self.critic_lora else list(self.critic_palm.parameters())
        return [*body, *self.value_head.parameters()]

    def policy_logits(self, seq: Tensor, mask: Tensor | None) -> Tensor:
        return self.palm(seq, mask=mask, finetune_scope=self.actor_scope,
                         dropout=self.actor_dropout if self.training else 0.0)

    @torch.no_grad()
    def reference_logits(self, seq: Tensor, mask: Tensor | None) -> Tensor:
        if self.reference is not None:
            return self.reference(seq, mask=mask)
        return self.palm(seq, mask=mask)  # the frozen base without the actor's LoRA

    def merged_policy(self) -> PaLM:
        """The policy as one plain PaLM: the actor's LoRA folded into the base weights, no critic, no reference copy.
        Its logits are the actor's (to float rounding); it is what a registered policy serves."""
        if self.actor_lora:
            return merge_finetune(self.palm, "actor")
        plain = PaLM.from_config(self.palm.config)
        plain.load_state_dict(_base_state(self.palm))
        return plain

    def values(self, seq: Tensor, mask: Tensor | None) -> Tensor:
        dropout = self.critic_dropout if self.training else 0.0
        if self.critic_lora:
            h = self.palm(seq, mask=mask, finetune_scope="critic", return_only_embedding=True, dropout=dropout)
        else:
            h = self.critic_palm(seq, mask=mask, return_only_embedding=True, dropout=dropout)
        return self.value_head(h).squeeze(-1)


def _base_state(palm: PaLM) -> dict[str, Tensor]:
    return {k: v for k, v in palm.state_dict().items() if not k.startswith("finetune_modules.")}


@torch.no_grad()
def merge_finetune(palm: PaLM, scope: str) -> PaLM:
    """A plain PaLM with the scope's LoRA deltas folded into the weights they adapt (Hu et al. 2021, section 4.1:
    W' = W + (A B * scale)^T), so it computes palm(x, finetune_scope=scope) with one matmul per projection."""
    merged = PaLM.from_config(palm.config).to(next(palm.parameters()).device)
    merged.load_state_dict(_base_state(palm))
    for layer, lora in zip(merged.layers, palm.finetune_modules[scope]):
        qkv, out = lora["qkv"], lora["out"]
        delta = (qkv.A @ qkv.B * qkv.scale).t()  # (q + k + v outputs, dim): the first rows of the fused projection
        layer.fused_proj.weight[: delta.shape[0]] += delta.to(layer.fused_proj.weight.dtype)
        layer.attn_out.weight += (out.A @ out.B * out.scale).t().to(layer.attn_out.weight.dtype)
    return merged


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


@dataclass
class Experience:
    """One batch of rollouts: per-action scalars only, never a vocabulary-sized distribution."""

    sequences: Tensor  # (b, P + T) left-padded prompt, then response
    sequence_mask: Tensor  # (b, P + T) real tokens
    prompt_mask: Tensor  # (b, P + T) prompt tokens
    action_mask: Tensor  # (b, T) real actions (padding after eos is False)
    logprobs: Tensor  # (b, T) under the policy that sampled them
    ref_logprobs: Tensor  # (b, T) under the frozen reference
    values: Tensor  # (b, T)
    rewards: Tensor  # (b, T) KL penalty plus the score on the last action (or each action's share of it)
    scores: Tensor  # (b,) reward model score of each response
    advantages: Tensor  # (b, T)
    returns: Tensor  # (b, T)
    # the sampling distribution is the policy's logits / temperature: every log-prob of it (the ratio's old and new,
    # the KL to the reference, the entropy) is taken of that distribution, or PPO would be off-policy
    temperature: float = 1.0
    suppressed: tuple[int, ...] = ()  # ids the sampler never emitted: outside the sampling distribution too

    @property
    def num_actions(self) -> int:
        return self.action_mask.shape[1]

    def _tensors(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("temperature", "suppressed")]

    def select(self, idx: Tensor) -> "Experience":
        return Experience(**{name: getattr(self, name)[idx] for name in self._tensors()}, temperature=self.temperature,
                          suppressed=self.suppressed)

    def nbytes(self) -> int:
        return sum(getattr(self, name).element_size() * getattr(self, name).nelement() for name in self._tensors())


def sampling_logits(logits: Tensor, suppressed: tuple[int, ...]) -> Tensor:
    """Logits whose softmax is the sampler's distribution without the `suppressed` ids: those get a finite floor, so
    that log-probs and entropies stay finite (their probability is 0 all the same)."""
    return suppressed_logits(logits.float(), token_ids(suppressed, logits.device), -1e9) if suppressed else logits


def action_outputs(ac: ActorCritic, seq: Tensor, seq_mask: Tensor, T: int, *, with_values: bool = True,
                   with_entropy: bool = False, temperature: float = 1.0, suppressed: tuple[int, ...] = ()):
    """Log-probs (and values, entropies) of the last T tokens of seq, each predicted from the position before it,
    under the sampling distribution: at `temperature`, without the `suppressed` ids."""
    inputs, mask = seq[:, :-1], seq_mask[:, :-1]
    logits = ac.policy_logits(inputs, mask)[:, -T:]
    if temperature != 1.0:
        logits = logits.float() / temperature
    logits = sampling_logits(logits, suppressed)
    actions = seq[:, -T:]
    out = {"logprobs": gather_logprobs(logits, actions)}
    if with_entropy:
        out["entropy"] = entropy_from_logits(logits)
    if with_values:
        out["values"] = ac.values(inputs, mask)[:, -T:]
    return out


@torch.no_grad()
def make_experience(ac: ActorCritic, reward_model: RewardModel, prompts: Tensor, prompt_mask: Tensor, *,
                    max_new_tokens: int, kl_coef: float, cfg: PPOConfig, temperature: float = 1.0,
                    eos_token: int | None = None, pad_value: int = 0,
                    generator: torch.Generator | None = None, suppress_tokens=(),
                    sample_dtype: torch.dtype | None = None) -> Experience:
    """Sample responses for a batch of left-padded prompts and score them.

    Rollouts sample from the full distribution (no top-k) at `temperature`, and every log-prob is of that
    distribution, so the ratio PPO optimises is the sampling policy's own. `sample_dtype` (e.g. bf16) draws the tokens
    from a copy of the policy in that precision; the old log-probs, values and KL still come from the policy as it
    trains, so the importance ratio of the first update is exactly 1.
    """
    if not temperature > 0:
        raise ValueError(f"PPO samples from the policy: temperature must be above 0, got {temperature}")
    suppress_tokens = tuple(suppress_tokens or ())
    sampler = in_precision(ac.palm, sample_dtype)
    gen = sampler.sample(prompts, prompt_mask, max_new_tokens, temperature=temperature, filter_thres=0.0,
                         eos_token=eos_token, pad_value=pad_value, finetune_scope=ac.actor_scope,
                         generator=generator, suppress_tokens=suppress_tokens)
    seq, seq_mask, T = gen.sequences, gen.sequence_mask, gen.tokens.shape[1]
    prompt_part = torch.cat((prompt_mask.bool(), torch.zeros_like(gen.mask)), dim=-1)
    out = action_outputs(ac, seq, seq_mask, T, temperature=temperature, suppressed=suppress_tokens)
    # the reference's distribution as a sampler of it would draw: without the suppressed ids either
    ref_logits = sampling_logits(ac.reference_logits(seq[:, :-1], seq_mask[:, :-1])[:, -T:], suppress_tokens)
    ref_logprobs = gather_logprobs(ref_logits, seq[:, -T:])
    if cfg.dense_rewards and getattr(reward_model, "dense", False):
        # each response token's share of the score (the shares of prompt tokens are 0): the same total, given
        # where it was earned
        token_scores = reward_model.token_rewards(seq, mask=seq_mask, prompt_mask=prompt_part)[:, -T:].float()
        scores = token_scores.sum(-1)
        rewards = kl_penalty_rewards(token_scores, out["logprobs"], ref_logprobs, gen.mask, kl_coef)
    else:
        scores = reward_model.score(seq, mask=seq_mask, prompt_mask=prompt_part).float()
        rewards = kl_penalty_rewards(scores, out["logprobs"], ref_logprobs, gen.mask, kl_coef)
    advantages, returns = gae(rewards, out["values"].float(), gen.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, gen.mask)
    return Experience(seq, seq_mask, prompt_part, gen.mask, out["logprobs"], ref_logprobs, out["values"].float(),
                      rewards, scores, advantages, returns, temperature, suppress_tokens)


def ppo_update(ac: ActorCritic, optimizer: torch.optim.Optimizer, experiences: list[Experience], cfg: PPOConfig,
               minibatch_size: int, generator: torch.Generator | None = None, *,
               old_policy_kl_coef: float = 0.0) -> dict[str, float]:
    """cfg.ppo_epochs passes over the experience in shuffled minibatches. Returns mean statistics.

    old_policy_kl_coef: weight of a KL(sampling policy || current policy) penalty in the loss (the reference's
    kl_div_loss_weight). Experience keeps no distributions, so it is estimated from the sampled actions with
    Schulman's k3 estimator, (r - 1) - log r for r = pi / pi_old, unbiased with an unbiased gradient
    (http://joschu.net/blog/kl-approx.html).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals: dict[str, float] = {}
    count = 0
    for _ in range(cfg.ppo_epochs):
        for exp in experiences:
            order = torch.randperm(exp.sequences.shape[0], generator=generator)
            for start in range(0, len(order), minibatch_size):
                mb = exp.select(order[start:start + minibatch_size].to(exp.sequences.device))
                out = action_outputs(ac, mb.sequences, mb.sequence_mask, mb.num_actions, with_entropy=True,
                                     temperature=mb.temperature, suppressed=mb.suppressed)
                pg_loss, clip_frac, approx_kl = policy_loss(out["logprobs"], mb.logprobs, mb.advantages,
                                                            mb.action_mask, cfg.clip_eps)
                v_loss = value_loss(out["values"].float(), mb.values, mb.returns, mb.action_mask, cfg.value_clip_eps)
                entropy = masked_mean(out["entropy"], mb.action_mask)
                loss = pg_loss + cfg.value_coef * v_loss - cfg.entropy_coef * entropy
                if old_policy_kl_coef:
                    log_ratio = out["logprobs"] - mb.logprobs
                    loss = loss + old_policy_kl_coef * masked_mean(torch.expm1(log_ratio) - log_ratio, mb.action_mask)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"PPO loss is {loss.item()} (policy {pg_loss.item()}, value "
                                             f"{v_loss.item()})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                stats = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.item(),
                         "clip_frac": clip_frac.item(), "approx_kl": approx_kl.item(), "grad_norm": grad_norm.item()}
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
    return {k: v / max(count, 1) for k, v in totals.items()}


def rollout_stats(exp: Experience) -> dict[str, float]:
    """What a person watches during PPO: reward, KL to the reference, response length."""
    kl = ((exp.logprobs - exp.ref_logprobs) * exp.action_mask).sum(-1)
    n = exp.action_mask.sum(-1).float()
    return {"reward": exp.scores.mean().item(), "kl": kl.mean().item(),
            "kl_per_token": (kl.sum() / n.sum().clamp(min=1)).item(), "response_length": n.mean().item()}
