"""Reward model: a copy of the pretrained PaLM, finetuned through its own LoRA scope, pooled, with a small head.

Three kinds of human feedback train it (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, section 3.5):
- ratings as bins: cross-entropy over `num_binned_output` classes; inference returns the *expected* rating, so one
  sequence always gets one reward (the reference samples a bin, which gives the same text different rewards);
- ratings as scalars (`num_binned_output=0`): mean squared error;
- pairwise preferences: -log sigmoid(r_chosen - r_rejected) (Bradley-Terry).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class RewardModel(nn.Module):
    def __init__(self, palm: PaLM, num_binned_output: int = 0, use_lora: bool = True, lora_r: int = 8,
                 reward_lora_scope: str = "reward"):
        super().__init__()
        if num_binned_output == 1 or num_binned_output < 0:
            raise ValueError("num_binned_output must be 0 (scalar head) or at least 2 bins")
        self.palm = copy.deepcopy(palm)
        self.scope = reward_lora_scope if use_lora else None
        if use_lora and reward_lora_scope not in self.palm.finetune_modules:
            self.palm.add_finetune_params(reward_lora_scope, lora_r)
        self.use_lora, self.lora_r, self.num_binned_output = use_lora, lora_r, num_binned_output
        dim = palm.config.dim
        # learned markers telling the model which tokens are prompt and which are response
        self.prompt_embed = nn.Parameter(torch.zeros(dim))
        self.response_embed = nn.Parameter(torch.zeros(dim))
        self.to_pred = nn.Linear(dim, max(num_binned_output, 1))
        nn.init.zeros_(self.to_pred.bias)
        nn.init.normal_(self.to_pred.weight, std=0.02)

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
        """Raw head output: (b, bins) logits or (b, 1) score. Pools the mean over response tokens."""
        b, n = x.shape
        if prompt_mask is None and prompt_lengths is not None:
            prompt_mask = torch.arange(n, device=x.device)[None] < prompt_lengths[:, None]
        if prompt_mask is None:
            prompt_mask = torch.zeros_like(x, dtype=torch.bool)
        marker = torch.where(prompt_mask[..., None], self.prompt_embed, self.response_embed)
        h = self.palm(x, mask=mask, finetune_scope=self.scope, extra_embed=marker, return_only_embedding=True)
        real = torch.ones_like(prompt_mask) if mask is None else mask.bool()
        response = real & ~prompt_mask
        # a row without response tokens is pooled over all its tokens; the choice is per row, never per batch
        pooled = masked_mean(h, torch.where(response.any(-1, keepdim=True), response, real))
        return self.to_pred(pooled)

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

        meta = {"num_binned_output": str(self.num_binned_output), "lora_r": str(self.lora_r)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    def load(self, path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))
