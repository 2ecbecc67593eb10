"""Text to tokens and back: the byte tokenizer, and left-padded (prompt, response) batches for the models."""

from __future__ import annotations

import torch

class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, any text round-trips, and the model stays tiny."""

    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        # A sampled sequence can stop inside a multi-byte character, and a model with spare vocabulary
        # (num_tokens > 256) can sample ids no byte has: show both as U+FFFD rather than fail (0xFF is never UTF-8).
        return bytes(int(i) if 0 <= int(i) < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")



TOKENIZER = ByteTokenizer()


def check_prompts_fit(prompts: list[str], context: int, new_tokens: int, what: str) -> None:
    """Every prompt plus the tokens to generate must fit the model's context; say which prompt does not."""
    for i, prompt in enumerate(prompts):
        n = len(TOKENIZER.encode(prompt))
        if n == 0:
            raise ValueError(f"{what}: prompt {i} is empty")
        if n + new_tokens > context:
            raise ValueError(f"{what}: prompt {i} has {n} tokens; with {new_tokens} new tokens that exceeds the "
                             f"model context of {context} tokens")


def encode_prompts(prompts: list[str], pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, P) left-padded ids and their mask."""
    ids = [TOKENIZER.encode(p) for p in prompts]
    P = max(len(x) for x in ids)
    batch = torch.full((len(ids), P), pad_value, dtype=torch.long)
    mask = torch.zeros((len(ids), P), dtype=torch.bool)
    for i, x in enumerate(ids):
        batch[i, P - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, P - len(x):] = True
    return batch, mask


def encode_dialogues(prompts: list[str], responses: list[str], max_len: int,
                     pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response per row, left-padded to one width. Responses are cut to fit max_len.

    Returns ids (b, n), mask (b, n) of real tokens, prompt_mask (b, n) of prompt tokens.
    """
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        p, r = TOKENIZER.encode(prompt), TOKENIZER.encode(response)
        if len(p) >= max_len:
            raise ValueError(f"a prompt of {len(p)} tokens does not fit the model context of {max_len} tokens")
        rows.append((p, r[: max_len - len(p)]))
    n = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), n), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.bool)
    prompt_mask = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        start = n - len(p) - len(r)
        ids[i, start:] = torch.tensor(p + r, dtype=torch.long)
        mask[i, start:] = True
        prompt_mask[i, start:start + len(p)] = True
    return ids, mask, prompt_mask


def decode_responses(tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [TOKENIZER.decode(row[m].tolist()) for row, m in zip(tokens, mask)]
