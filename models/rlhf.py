"""RLHFTrainer: PPO of a PaLM against a reward model, with the reference library's API, and best-of-n sampling.

`train` keeps the reference's keywords and defaults; `step` is one PPO iteration (a batch of rollouts, then the
update), which is what the pipeline checkpoints between.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from models.actor_critic import ActorCritic, Experience, make_experience, ppo_update, rollout_stats
from models.palm import PaLM, as_prompt_batch
from models.ppo import KLController, PPOConfig
from models.reward import RewardModel


def select_best_of_n(scores: Tensor, n: int) -> Tensor:
    """scores (p, N) for N samples per prompt -> index of the best among the first n samples of each prompt."""
    if not 1 <= n <= scores.shape[-1]:
        raise ValueError(f"best-of-{n} needs 1 <= n <= {scores.shape[-1]} samples")
    return scores[:, :n].argmax(dim=-1)


# the reference's PPO keywords and the PPOConfig fields they set
PPO_ALIASES = {"eps_clip": "clip_eps", "value_clip": "value_clip_eps", "beta_s": "entropy_coef", "epochs": "ppo_epochs",
               "max_norm": "max_grad_norm"}
# the reference's keywords that cannot apply here, and why
REFUSED = {
    "accelerate_kwargs": "there is no Accelerate here: move the trainer with .to(device), and run several processes "
                         "through the pipeline's runtime (torch.distributed)",
    "critic": "the critic is built from `palm` (its own LoRA scope, or a copy with critic_lora=False)",
    "actor_critic": "the actor-critic is built from `palm` and the LoRA settings",
    "critic_pooled_values": "the critic predicts a value per response token, for GAE, never one pooled value",
    "critic_num_pred_bins": "the critic is a scalar head trained with a clipped squared error, not HL-Gauss bins",
    "hl_gauss_loss_kwargs": "the critic is a scalar head trained with a clipped squared error, not HL-Gauss bins",
}
_UNSET = object()


class RLHFTrainer:
    """Not an nn.Module on purpose: `train` is the reference's training loop, not nn.Module.train(mode).

    Takes the reference's keywords with the reference's meaning, mapped onto this design: prompts as text
    (`prompts` + `tokenizer`, or `prompts_path`, one prompt per line, blank lines skipped; `tokenizer(list of str)`
    returns a (b, n) tensor of ids, every one real, or a list of 1-D id sequences of different lengths),
    `minibatch_size` and `epochs` of the PPO update, `eps_clip`, `value_clip`, `beta_s` (the entropy bonus),
    `max_norm` (None: no clipping; here one norm over actor and critic together), `kl_div_loss_weight` (a penalty on
    the KL from the policy that sampled the rollouts, see ppo_update), AdamW's `betas` and the weight decays
    `actor_wd` / `critic_wd`, the LoRA ranks `actor_lora_r` / `critic_lora_r`, and `actor_dropout` /
    `critic_dropout` while training. `suppress_tokens`: ids the policy never samples (its padding, ids beyond its
    tokenizer's vocabulary), left out of every log-prob PPO takes. `sample_dtype` (e.g. torch.bfloat16): rollouts
    are drawn from a copy of the policy in that precision, their log-probs taken in the policy's own. Keywords that
    cannot apply (REFUSED) raise a TypeError saying why. Keywords left out keep this design's defaults, which differ
    from the reference's where PPOConfig says so.
    """

    def __init__(self, *, palm: PaLM, reward_model: RewardModel, prompt_token_ids: Tensor | list[Tensor] | None = None,
                 prompts_mask: Tensor | None = None, actor_lr: float = 1e-4, critic_lr: float = 1e-4,
                 actor_lora: bool = True, critic_lora: bool = True, lora_r: int = 8, pad_value: int = 0,
                 ppo: PPOConfig | None = None, seed: int = 0, prompts: list[str] | None = None,
                 prompts_path: str | Path | None = None, tokenizer: Callable | None = None,
                 minibatch_size: int | None = None, kl_div_loss_weight: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), actor_wd: float = 0.0, critic_wd: float = 0.0,
                 actor_lora_r: int | None = None, critic_lora_r: int | None = None, actor_dropout: float = 0.0,
                 critic_dropout: float = 0.0, max_norm=_UNSET, suppress_tokens=(),
                 sample_dtype: torch.dtype | None = None, **ppo_kwargs):
        refused = [k for k in ppo_kwargs if k in REFUSED]
        if refused:
            raise TypeError("RLHFTrainer does not take " + "; ".join(f"{k}: {REFUSED[k]}" for k in refused))
        if max_norm is not _UNSET:
            ppo_kwargs["max_norm"] = float("inf") if max_norm is None else max_norm  # None: the reference's no clip
        self.cfg = _ppo_config(ppo, ppo_kwargs)
        if minibatch_size is not None and (isinstance(minibatch_size, bool) or not isinstance(minibatch_size, int)
                                           or minibatch_size < 1):
            raise ValueError(f"minibatch_size must be a positive integer, got {minibatch_size!r}")
        if kl_div_loss_weight < 0:
            raise ValueError(f"kl_div_loss_weight must be at least 0, got {kl_div_loss_weight!r}")
        self.minibatch_size, self.old_policy_kl_coef = minibatch_size, kl_div_loss_weight
        self.actor_critic = ActorCritic(palm, actor_lora=actor_lora, critic_lora=critic_lora, lora_r=lora_r,
                                        actor_lora_r=actor_lora_r, critic_lora_r=critic_lora_r,
                                        actor_dropout=actor_dropout, critic_dropout=critic_dropout)
        self.reward_model = reward_model.eval()
        for p in self.reward_model.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([
            {"params": self.actor_critic.actor_parameters(), "lr": actor_lr, "weight_decay": actor_wd},
            {"params": self.actor_critic.critic_parameters(), "lr": critic_lr, "weight_decay": critic_wd},
        ], betas=betas)
        self.kl = KLController(self.cfg.kl_coef, self.cfg.adaptive_kl, self.cfg.kl_target, self.cfg.kl_horizon)
        self.pad_value = pad_value
        self.suppress_tokens = tuple(int(t) for t in suppress_tokens)  # ids never sampled (padding, unused ids)
        self.sample_dtype = sample_dtype  # rollouts drawn from a copy in this precision (None: the policy's own)
        # prompt choice and minibatch order on the CPU; token sampling on the model's device
        self.data_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator().manual_seed(seed + 1)
        self.prompts, self.prompts_mask = None, None
        prompt_token_ids = _prompt_ids(prompt_token_ids, prompts, prompts_path, tokenizer)
        if prompt_token_ids is not None:
            self.prompts, self.prompts_mask, _ = as_prompt_batch(prompt_token_ids, prompts_mask, pad_value)
            if self.prompts_mask is None:
                self.prompts_mask = torch.ones_like(self.prompts, dtype=torch.bool)

    @property
    def device(self):
        return next(self.actor_critic.parameters()).device

    def to(self, device) -> "RLHFTrainer":
        """Move the models (the optimiser keeps the same parameter objects)."""
        self.actor_critic.to(device)
        self.reward_model.to(device)
        return self

    def generators(self) -> dict[str, torch.Generator]:
        """The random streams a resumed run must restore to continue bit-identically."""
        if self.sample_generator.device != self.device:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.data_generator))
            self.sample_generator = torch.Generator(device=self.device).manual_seed(seed)
        return {"data": self.data_generator, "sample": self.sample_generator}

    # ---- one PPO iteration ---------------------------------------------------------------------------------
    def rollout(self, prompts: Tensor, prompt_mask: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                eos_token: int | None = None) -> tuple[Experience, dict[str, float]]:
        self.actor_critic.eval()
        exp = make_experience(self.actor_critic, self.reward_model, prompts, prompt_mask,
                              max_new_tokens=max_new_tokens, kl_coef=self.kl.value, cfg=self.cfg,
                              temperature=temperature, eos_token=eos_token, pad_value=self.pad_value,
                              generator=self.generators()["sample"], suppress_tokens=self.suppress_tokens,
                              sample_dtype=self.sample_dtype)
        stats = rollout_stats(exp)
        stats["kl_coef"] = self.kl.value
        self.kl.update(stats["kl"], exp.sequences.shape[0])
        return exp, stats

    def learn(self, experiences: list[Experience], minibatch_size: int | None = None) -> dict[str, float]:
        """The PPO update on these rollouts, in minibatches of minibatch_size (default: the trainer's, else each
        batch of rollouts whole)."""
        self.actor_critic.train()
        size = minibatch_size or self.minibatch_size or max(e.sequences.shape[0] for e in experiences)
        return ppo_update(self.actor_critic, self.optimizer, experiences, self.cfg, size, self.data_generator,
                          old_policy_kl_coef=self.old_policy_kl_coef)

    def step(self, prompts: Tensor, prompt_mask: Tensor, max_new_tokens: int, *, minibatch_size: int | None = None,
             temperature: float = 1.0, eos_token: int | None = None) -> dict[str, float]:
        exp, stats = self.rollout(prompts, prompt_mask, max_new_tokens, temperature=temperature, eos_token=eos_token)
        return {**stats, **self.learn([exp], minibatch_size)}

    # ---- the reference API ---------------------------------------------------------------------------------
    def train(self, num_episodes: int = 50000, max_timesteps: int = 500, update_timesteps: int = 5000,
              max_batch_size: int = 16, max_seq_len: int = 2048, eos_token: int | None = None,
              temperature: float = 1.0) -> list[dict[str, float]]:
        """num_episodes * max_timesteps rollouts in batches of max_batch_size; a PPO update every update_timesteps,
        in minibatches of the trainer's minibatch_size (default max_batch_size).

        max_seq_len bounds prompt plus response.
        """
        if self.prompts is None:
            raise ValueError("RLHFTrainer.train needs prompt_token_ids")
        P = self.prompts.shape[1]
        if max_seq_len <= P:
            raise ValueError(f"max_seq_len ({max_seq_len}) must exceed the prompt length ({P})")
        total = num_episodes * max_timesteps
        history, pending, collected = [], [], 0
        for done in range(0, total, max_batch_size):
            b = min(max_batch_size, total - done)
            idx = torch.randint(0, self.prompts.shape[0], (b,), generator=self.data_generator).to(self.device)
            exp, stats = self.rollout(self.prompts[idx], self.prompts_mask[idx], max_seq_len - P,
                                      temperature=temperature, eos_token=eos_token)
            pending.append(exp)
            collected += b
            if collected >= update_timesteps or done + b >= total:
                stats.update(self.learn(pending, self.minibatch_size or max_batch_size))
                pending, collected = [], 0
            history.append(stats)
        return history

    @torch.no_grad()
    def generate(self, seq_len: int, prompt: Tensor, num_samples: int = 10, temperature: float = 1.0,
                 filter_thres: float = 0.9, eos_token: int | None = None) -> Tensor:
        """Best-of-n: sample num_samples responses and return the one the reward model scores highest."""
        prompt = prompt.reshape(1, -1).to(self.device)
        P = prompt.shape[1]
        if seq_len <= P:
            raise ValueError(f"seq_len ({seq_len}) must be longer than the prompt ({P} tokens)")
        palm = self.actor_critic.palm
        gen = palm.sample(prompt.expand(num_samples, -1), None, seq_len - P, temperature=temperature,
                          filter_thres=filter_thres, eos_token=eos_token, pad_value=self.pad_value,
                          finetune_scope=self.actor_critic.actor_scope, generator=self.generators()["sample"],
                          suppress_tokens=self.suppress_tokens)
        prompt_part = torch.cat((gen.prompt_mask.bool(), torch.zeros_like(gen.mask)), dim=-1)
        scores = self.reward_model.score(gen.sequences, mask=gen.sequence_mask, prompt_mask=prompt_part)
        best = int(select_best_of_n(scores[None], num_samples)[0])
        return gen.tokens[best][gen.mask[best]]


def _ppo_config(ppo: PPOConfig | None, kwargs: dict) -> PPOConfig:
    """PPOConfig from `ppo` or from keywords (PPOConfig's names or the reference's aliases), never both."""
    if ppo is not None and kwargs:
        raise ValueError(f"give PPO's settings as ppo=PPOConfig(...) or as keywords ({', '.join(sorted(kwargs))}), "
                         "not both")
    fields, given_as = {}, {}
    for key, value in kwargs.items():
        name = PPO_ALIASES.get(key, key)
        if name in fields:
            raise ValueError(f"{given_as[name]} and {key} set the same PPO setting ({name}): give one")
        fields[name], given_as[name] = value, key
    return ppo or PPOConfig(**fields)


def _prompt_ids(ids, prompts, prompts_path, tokenizer):
    """Token ids from exactly one of prompt_token_ids, prompts (+ tokenizer) or prompts_path (+ tokenizer)."""
    given = [name for name, v in (("prompt_token_ids", ids), ("prompts", prompts), ("prompts_path", prompts_path))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give the prompts one way, not {' and '.join(given)}")
    if prompts_path is not None:
        prompts = [line for line in Path(prompts_path).read_text().splitlines() if line.strip()]
    if prompts is None:
        return ids
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer: tokenizer(list of str) -> token ids")
    if not prompts:
        raise ValueError("no prompts: the list (or file) is empty")
    ids = tokenizer(list(prompts))
    if isinstance(ids, Tensor):
        return ids.long()
    return [torch.as_tensor(p, dtype=torch.long) for p in ids]
