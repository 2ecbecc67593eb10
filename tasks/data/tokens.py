"""Text to token batches and back, with the tokenizer of the model at hand: left-padded prompts for sampling,
(prompt, response) rows for the reward model, and what to do with a row too long for the context.

A row that does not fit keeps the end of its prompt (the part next to the response) and the beginning of its response:
the prompt gets the room the response leaves, and at least half the context when both are long.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.data.tokenizer import Tokenizer

ON_TOO_LONG = ("cut", "drop", "error")


def check_prompts_fit(prompts: list[str], tokenizer: Tokenizer, context: int, new_tokens: int, what: str) -> None:
    """Every prompt plus the tokens to generate must fit the model's context; say which prompt does not."""
    for i, prompt in enumerate(prompts):
        n = len(tokenizer.encode(prompt))
        if n == 0:
            raise ValueError(f"{what}: prompt {i} is empty")
        if n + new_tokens > context:
            raise ValueError(f"{what}: prompt {i} has {n} tokens; with {new_tokens} new tokens that exceeds the "
                             f"model context of {context} tokens")


def keep_end(text: str, tokenizer: Tokenizer, max_tokens: int) -> str:
    """The longest end of `text` (cut at a character) that encodes to at most max_tokens tokens."""
    cut = 0
    while len(tokenizer.encode(text[cut:])) > max_tokens and cut < len(text) - 1:
        cut += max(1, (len(tokenizer.encode(text[cut:])) - max_tokens) // 2)
    return text[cut:]


def fit_prompts(prompts: list[str], tokenizer: Tokenizer, context: int, new_tokens: int) -> tuple[list[str], int]:
    """Prompts from feedback, each kept to its end where it leaves no room for new_tokens (as the reward stage cut its
    rows); and how many were cut."""
    budget, cut = context - new_tokens, 0
    fitted = []
    for prompt in prompts:
        if len(tokenizer.encode(prompt)) > budget:
            prompt, cut = keep_end(prompt, tokenizer, budget), cut + 1
        fitted.append(prompt)
    return fitted, cut


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, n) ids right-aligned, padding on the left, and the mask of real tokens."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, n - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, n - len(row):] = True
    return ids, mask


def encode_prompts(prompts: list[str], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, P) left-padded ids and their mask."""
    return left_padded([tokenizer.encode(p) for p in prompts], tokenizer.pad_id)


@dataclass(frozen=True)
class Fitted:
    prompt: list[int]
    response: list[int]
    cut: int  # tokens removed to fit


def fit_dialogue(prompt: list[int], response: list[int], max_len: int) -> Fitted:
    """Cut a (prompt, response) row to max_len tokens: the prompt keeps its end, the response its beginning; the
    prompt keeps at least half of max_len when both are long, and at least one token."""
    if len(prompt) + len(response) <= max_len:
        return Fitted(prompt, response, 0)
    keep_prompt = min(len(prompt), max(max_len - len(response), max_len // 2, 1))
    kept = Fitted(prompt[len(prompt) - keep_prompt:], response[:max_len - keep_prompt], 0)
    return Fitted(kept.prompt, kept.response, len(prompt) + len(response) - len(kept.prompt) - len(kept.response))


def dialogue_batch(rows: list[Fitted], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (b, n), mask (b, n) of real tokens, prompt_mask (b, n) of prompt tokens, left-padded to one width."""
    ids, mask = left_padded([r.prompt + r.response for r in rows], pad_id)
    prompt_mask = torch.zeros_like(mask)
    n = ids.shape[1]
    for i, r in enumerate(rows):
        start = n - len(r.prompt) - len(r.response)
        prompt_mask[i, start:start + len(r.prompt)] = True
    return ids, mask, prompt_mask


def encode_dialogues(prompts: list[str], responses: list[str], tokenizer: Tokenizer,
                     max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response per row, each cut to fit max_len (fit_dialogue), left-padded to one width."""
    rows = [fit_dialogue(tokenizer.encode(p), tokenizer.encode(r), max_len)
            for p, r in zip(prompts, responses, strict=True)]
    return dialogue_batch(rows, tokenizer.pad_id)


def decode_responses(tokens: torch.Tensor, mask: torch.Tensor, tokenizer: Tokenizer) -> list[str]:
    """The text of each row's real tokens; an end-of-text token ends the text and is not part of it."""
    return [tokenizer.decode(row[m].tolist()) for row, m in zip(tokens, mask)]


def never_sampled(tokenizer: Tokenizer, num_tokens: int) -> tuple[int, ...]:
    """Ids a policy must never emit: its padding, and any id of the model beyond the tokenizer's vocabulary (a model
    sized for a larger vocabulary than its tokenizer learned). Every sampler of the pipeline suppresses them."""
    return (tokenizer.pad_id, *range(tokenizer.vocab_size, num_tokens))
