"""Reward model: a copy of the pretrained PaLM, finetuned through its own LoRA scope, pooled, with a small head.

Three kinds of human feedback train it (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, section 3.5):
- ratings as bins: cross-entropy over `num_binned_output` classes; inference returns the *expected* rating, so one
  sequence always gets one reward (the reference samples a bin, which gives the same text different rewards);
- ratings as scalars (`num_binned_output=0`): mean squared error;
- pairwise preferences: -log sigmoid(r_chosen - r_rejected) (Bradley-Terry).

Two heads read the PaLM's final embeddings:
- "mean-pooled" (the reference's): a linear map of the embeddings averaged over response tokens;
- "per-token": a small MLP scores every response token from its embedding *and its log-likelihood under the model*,
  and the reward is the mean of those scores. How surprising a token is to a language model is the classic fluency
  signal (SLOR, Kann et al. 2018, https://arxiv.org/abs/1809.08731), which a linear map of pooled embeddings cannot
  compute: it needs each position's prediction set against the token that came next. With a nonlinearity per token
  the head can count "tokens the model finds implausible", which is what judgements of misspelt or broken text
  come down to.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import Count, Positive, check_bounds
from models.palm import PaLM


def pairwise_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Bradley-Terry preference loss, mean over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def masked_mean(x: Tensor, mask: Tensor | None, dim: int = 1) -> Tensor:
    """x (b, n, ...) averaged over positions where mask (b, n) is True."""
    if mask is None:
        return x.mean(dim=dim)
    m = mask.to(x.dtype)
    while m.ndim < x.ndim:
        m = m.unsqueeze(-1)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1)


HEADS = ("mean-pooled", "per-token")


@dataclass(frozen=True)
class RewardModelConfig:
    """The reward model's own architecture beside its PaLM's: what the pipeline's reward stage nests (`reward.head=...`
    sets it) and what a reward checkpoint's manifest records."""

    num_binned_output: Count = 0  # 0: a scalar head (MSE on ratings); >= 2: rating bins
    lora_r: Positive = 8
    head: Literal["mean-pooled", "per-token"] = "mean-pooled"
    head_hidden: Positive = 64  # the per-token head's MLP width

    def __post_init__(self):
        check_bounds(self)
        if self.num_binned_output == 1:
            raise ValueError("num_binned_output must be 0 (scalar head) or at least 2 bins")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")


def token_logprobs(logits: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
    """log p(x_t | x_<t) for every position t (b, n), from next-token logits (b, n, V).

    Position 0, and any token that follows padding, has no prediction of its own: 0 (no surprise).
    """
    logp = logits[:, :-1].float().log_softmax(dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # (b, n-1)
    if mask is not None:
        logp = logp * mask[:, :-1].to(logp.dtype)
    return F.pad(logp, (1, 0))


def rating_targets(ratings: Tensor, scale: tuple[float, float], bins: int) -> Tensor:
    """What the head learns from ratings on [low, high]: a scalar head the rating mapped to [-1, 1]; a binned head the
    index of the nearest of `bins` evenly spaced bins."""
    low, high = scale
    unit = (ratings.float() - low) / (high - low)
    return (unit * (bins - 1)).round().long() if bins else unit * 2 - 1


def score_to_rating(score: Tensor, scale: tuple[float, float], bins: int) -> Tensor:
    """A head's score back on the rating scale it was trained on (the inverse of rating_targets)."""
    low, high = scale
    unit = score / (bins - 1) if bins else (score + 1) / 2
    return low + unit * (high - low)


class RewardModel(nn.Module):
    def __init__(self, palm: PaLM, num_binned_output: int = 0, use_lora: bool = True, lora_r: int = 8,
                 reward_lora_scope: str = "reward", head: Literal["mean-pooled", "per-token"] = "mean-pooled",
                 head_hidden: int = 64):
        super().__init__()
        if num_binned_output == 1 or num_binned_output < 0:
            raise ValueError("num_binned_output must be 0 (scalar head) or at least 2 bins")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.palm = copy.deepcopy(palm)
        self.scope = reward_lora_scope if use_lora else None
        if use_lora and reward_lora_scope not in self.palm.finetune_modules:
            self.palm.add_finetune_params(reward_lora_scope, lora_r)
        self.use_lora, self.lora_r, self.num_binned_output = use_lora, lora_r, num_binned_output
        self.head, self.head_hidden = head, head_hidden
        dim, outputs = palm.config.dim, max(num_binned_output, 1)
        # learned markers telling the model which tokens are prompt and which are response
        self.prompt_embed = nn.Parameter(torch.zeros(dim))
        self.response_embed = nn.Parameter(torch.zeros(dim))
        if head == "mean-pooled":
            self.to_pred = nn.Linear(dim, outputs)
        else:  # per token: (embedding, log-likelihood) -> hidden -> outputs
            self.to_pred = nn.Sequential(nn.Linear(dim + 1, head_hidden), nn.GELU(), nn.Linear(head_hidden, outputs))
        last = self.to_pred if head == "mean-pooled" else self.to_pred[-1]
        nn.init.zeros_(last.bias)
        nn.init.normal_(last.weight, std=0.02)

    @classmethod
    def from_config(cls, palm: PaLM, config: RewardModelConfig | dict) -> "RewardModel":
        """A reward model on `palm` with the head a config (or a manifest's model_config) describes."""
        if isinstance(config, dict):
            config = RewardModelConfig(**{k: config[k] for k in RewardModelConfig.__dataclass_fields__})
        return cls(palm, **asdict(config))

    @property
    def config(self) -> RewardModelConfig:
        return RewardModelConfig(self.num_binned_output, self.lora_r, self.head, self.head_hidden)

    @property
    def binned(self) -> bool:
        return self.num_binned_output > 1

    def finetune_parameters(self) -> list[nn.Parameter]:
        """Everything that trains: the LoRA scope (or the whole PaLM without LoRA), both markers and the head."""
        body = self.palm.finetune_parameters(self.scope) if self.use_lora else list(self.palm.parameters())
        return [*body, self.prompt_embed, self.response_embed, *self.to_pred.parameters()]

    def forward(self, x: Tensor, mask: Tensor | None = None, prompt_mask: Tensor | None = None,
                prompt_lengths: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """x (b, n). mask: True for real tokens. prompt_mask: True for prompt tokens (or give prompt_lengths).

        With labels: the loss (bin indices for a binned head, float targets for a scalar head).
        Without: the reward (b,), the expected bin index for a binned head.
        """
        if labels is None:
            return self.score(x, mask=mask, prompt_mask=prompt_mask, prompt_lengths=prompt_lengths)
        pred = self.predict(x, mask=mask, prompt_mask=prompt_mask, prompt_lengths=prompt_lengths)
        if self.binned:
            return F.cross_entropy(pred.float(), labels.long())
        return F.mse_loss(pred.squeeze(-1).float(), labels.float())

    def predict(self, x, mask=None, prompt_mask=None, prompt_lengths=None) -> Tensor:
        """Raw head output: (b, bins) logits or (b, 1) score, pooled as the mean over response tokens (of the
        embeddings for the mean-pooled head, of the per-token outputs for the per-token head)."""
        if self.head == "mean-pooled":
            h, _, pooled_over = self._embed(x, mask, prompt_mask, prompt_lengths)
            return self.to_pred(masked_mean(h, pooled_over))
        per_token, pooled_over = self._per_token(x, mask, prompt_mask, prompt_lengths)
        return masked_mean(per_token, pooled_over)

    @property
    def dense(self) -> bool:
        """Whether the reward splits into per-token rewards (`token_rewards`): the per-token head with a scalar
        output, whose reward is a plain mean of token scores."""
        return self.head == "per-token" and not self.binned

    def token_rewards(self, x, mask=None, prompt_mask=None, prompt_lengths=None, baseline: float = 0.0) -> Tensor:
        """(b, n) each token's share of `score() - baseline`: (token score - baseline) / number of pooled tokens on
        the tokens the reward pools over, 0 elsewhere. A row sums to its score - baseline, and token t's share
        depends on tokens up to t only (the PaLM is causal), so PPO can credit each token with its own share
        instead of the whole score at the end (fine-grained rewards: Wu et al. 2023, https://arxiv.org/abs/2306.01693).
        """
        if not self.dense:
            raise ValueError(f"a reward model with the {self.head} head and {self.num_binned_output} bins has no "
                             "per-token rewards; they need head='per-token' and a scalar output")
        per_token, pooled_over = self._per_token(x, mask, prompt_mask, prompt_lengths)
        weight = pooled_over.float() / pooled_over.sum(-1, keepdim=True).clamp(min=1)
        return (per_token.squeeze(-1).float() - baseline) * weight

    def _embed(self, x, mask, prompt_mask, prompt_lengths):
        """Final embeddings (b, n, d), next-token logits (b, n, V) for the per-token head (else None), and the mask
        of the tokens the reward pools over: the response, or a whole row that has no response tokens."""
        b, n = x.shape
        if prompt_mask is None and prompt_lengths is not None:
            prompt_mask = torch.arange(n, device=x.device)[None] < prompt_lengths[:, None]
        if prompt_mask is None:
            prompt_mask = torch.zeros_like(x, dtype=torch.bool)
        marker = torch.where(prompt_mask[..., None], self.prompt_embed, self.response_embed)
        logits = None
        if self.head == "mean-pooled":
            h = self.palm(x, mask=mask, finetune_scope=self.scope, extra_embed=marker, return_only_embedding=True)
        else:  # the logits come from the same pass (under FSDP the output matrix exists only inside it)
            h, logits = self.palm(x, mask=mask, finetune_scope=self.scope, extra_embed=marker,
                                  return_embedding_and_logits=True)
        real = torch.ones_like(prompt_mask) if mask is None else mask.bool()
        response = real & ~prompt_mask
        # a row without response tokens is pooled over all its tokens; the choice is per row, never per batch
        return h, logits, torch.where(response.any(-1, keepdim=True), response, real)

    def _per_token(self, x, mask, prompt_mask, prompt_lengths) -> tuple[Tensor, Tensor]:
        """The per-token head's outputs (b, n, outputs) and the pooling mask (b, n)."""
        h, logits, pooled_over = self._embed(x, mask, prompt_mask, prompt_lengths)
        logp = token_logprobs(logits, x, mask)  # (b, n)
        return self.to_pred(torch.cat((h, logp[..., None].to(h.dtype)), dim=-1)), pooled_over

    def preference_loss(self, chosen: Tensor, rejected: Tensor, *, chosen_mask=None, rejected_mask=None,
                        chosen_prompt_mask=None, rejected_prompt_mask=None) -> tuple[Tensor, Tensor]:
        """Pairwise loss and accuracy (share of pairs where chosen scores higher) for a batch of pairs."""
        r_c = self.score(chosen, mask=chosen_mask, prompt_mask=chosen_prompt_mask)
        r_r = self.score(rejected, mask=rejected_mask, prompt_mask=rejected_prompt_mask)
        return pairwise_loss(r_c, r_r), (r_c > r_r).float().mean()

    def score(self, x, mask=None, prompt_mask=None, prompt_lengths=None) -> Tensor:
        """Differentiable scalar reward (b,): the expected bin index for a binned head."""
        pred = self.predict(x, mask=mask, prompt_mask=prompt_mask, prompt_lengths=prompt_lengths).float()
        if self.binned:
            bins = torch.arange(self.num_binned_output, device=pred.device, dtype=pred.dtype)
            return pred.softmax(dim=-1) @ bins
        return pred.squeeze(-1)

    def save(self, path) -> None:
        """Weights as safetensors (no pickle), with the head's settings as metadata."""
        from safetensors.torch import save_file

        meta = {"num_binned_output": str(self.num_binned_output), "lora_r": str(self.lora_r), "head": self.head,
                "head_hidden": str(self.head_hidden)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    def load(self, path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))
