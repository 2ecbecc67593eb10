"""Token sampling and the result of a batched generation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Generation:
    prompt: Tensor  # (b, P) left-padded prompt ids
    prompt_mask: Tensor  # (b, P) True for real prompt tokens
    tokens: Tensor  # (b, T) new tokens; padding after a row's eos
    mask: Tensor  # (b, T) True for real new tokens (the eos itself included)

    @property
    def sequences(self) -> Tensor:
        return torch.cat((self.prompt, self.tokens), dim=-1)

    @property
    def sequence_mask(self) -> Tensor:
        return torch.cat((self.prompt_mask.bool(), self.mask), dim=-1)

    @property
    def response_lengths(self) -> Tensor:
        return self.mask.sum(-1)


def top_k_filter(logits: Tensor, thres: float) -> Tensor:
    """Keep the top ceil((1 - thres) * vocab) logits (the reference's `filter_thres`); thres <= 0 keeps all."""
    if thres <= 0:
        return logits
    k = max(math.ceil((1 - thres) * logits.shape[-1]), 1)
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def sample_token(logits: Tensor, temperature: float, filter_thres: float, generator: torch.Generator | None) -> Tensor:
    """logits (b, vocab) -> token ids (b,). temperature 0 is greedy argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(top_k_filter(logits.float(), filter_thres) / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
