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


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, -inf elsewhere."""
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def sample_token(logits: Tensor, temperature: float, filter_thres: float, generator: torch.Generator | None,
                 top_k: int | None = None) -> Tensor:
    """logits (b, vocab) -> token ids (b,). temperature 0 is greedy argmax. top_k keeps the k most likely tokens
    (None or 0 keeps all); it is the count-based form of filter_thres, and the two cannot be combined."""
    if top_k and filter_thres > 0:
        raise ValueError(f"give top_k ({top_k}) or filter_thres ({filter_thres}), not both")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    filtered = keep_top_k(logits.float(), top_k) if top_k else top_k_filter(logits.float(), filter_thres)
    probs = torch.softmax(filtered / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
