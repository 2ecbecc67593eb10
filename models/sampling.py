"""Token sampling and the result of a batched generation."""

from __future__ import annotations

import copy
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
    return keep_top_k(logits, max(math.ceil((1 - thres) * logits.shape[-1]), 1))


def keep_top_k(logits: Tensor, k: int | None) -> Tensor:
    """logits (..., vocab) with everything but the k largest of each row set to -inf; None, 0 or k >= vocab keep all."""
    if not k or k >= logits.shape[-1]:
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def suppressed(logits: Tensor, tokens: Tensor | None, value: float = float("-inf")) -> Tensor:
    """`logits` with the ids in `tokens` (1-D) set to `value`: tokens a policy must never emit (padding, ids beyond
    its tokenizer's vocabulary). -inf for sampling; a finite floor where log-probs and entropies are taken."""
    if tokens is None or tokens.numel() == 0:
        return logits
    return logits.index_fill(-1, tokens, value)


def token_ids(tokens, device) -> Tensor | None:
    """A 1-D long tensor of ids on `device`, or None for none."""
    if tokens is None or len(tokens) == 0:
        return None
    return torch.as_tensor(list(tokens), dtype=torch.long, device=device)


def check_filters(filter_thres: float | None, top_k: int | None) -> float:
    """The filter_thres to use: the reference's 0.9 by default, 0 when top_k is given. Both at once is an error."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 or None keeps every token), got {top_k!r}")
    if filter_thres is None:
        return 0.0 if top_k else 0.9
    if top_k and filter_thres > 0:
        raise ValueError(f"give top_k ({top_k}) or filter_thres ({filter_thres}), not both: each sets how many of "
                         "the largest logits are kept")
    return filter_thres


def sample_token(logits: Tensor, temperature: float, filter_thres: float | None, generator: torch.Generator | None,
                 top_k: int | None = None) -> Tensor:
    """logits (b, vocab) -> token ids (b,). temperature 0 is greedy argmax.

    filter_thres keeps the top (1 - filter_thres) of the vocabulary, top_k the k largest logits (None or 0: all);
    they are two ways of saying the same thing, so giving both is an error.
    """
    filter_thres = check_filters(filter_thres, top_k)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    filtered = keep_top_k(logits.float(), top_k) if top_k else top_k_filter(logits.float(), filter_thres)
    probs = torch.softmax(filtered / temperature if temperature != 1 else filtered, dim=-1)
    # what torch.multinomial(probs, 1) computes, token for token on the same generator (its one-sample path races
    # exponential clocks: argmax p / q with q ~ Exp(1)), without its checks of the distribution, which cost more
    # operator calls than the draw itself at one token per step
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")


def sampling_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The dtype to draw tokens in for a sampling precision (None: fp32, the model's own). "auto" is bf16 on a GPU and
    fp32 on a CPU, where bf16 decoding measured slower at every batch size (benchmarks/RESULTS.md)."""
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"sampling_precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def in_precision(palm, dtype: torch.dtype | None):
    """The model to sample from in `dtype`: `palm` itself when it already is in it (or dtype is None), otherwise a
    copy cast to it, LoRA scopes included. The caller's model, and what it trains, stay as they are; log-probs that
    an update needs come from the caller's model, in its own precision."""
    weight = palm.token_emb.weight
    if dtype is None or weight.dtype == dtype:
        return palm
    return copy.deepcopy(palm).to(dtype)
