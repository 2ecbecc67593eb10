"""Sample generations logged with a stage's run, for people to read what the model writes."""

from __future__ import annotations

import torch

from models.palm import PaLM
from tasks.data.tokenizer import Tokenizer
from tasks.data.tokens import decode_responses, encode_prompts, never_sampled
from tasks.tracking.artifacts import log_text

SAMPLE_PROMPTS = ("The function", "A module is", "When the interpreter", "This method returns")


@torch.no_grad()
def log_samples(run_id: str, palm: PaLM, tokenizer: Tokenizer, *, device, max_new_tokens: int,
                scope: str | None = None, prompts: tuple[str, ...] | list[str] = SAMPLE_PROMPTS, seed: int = 0,
                artifact_file: str = "samples.md") -> list[str]:
    """Sample one response per prompt (temperature 1, the full distribution, until end-of-text) and log them as
    markdown."""
    was_training = palm.training
    palm.eval()
    ids, mask = encode_prompts(list(prompts), tokenizer)
    room = palm.config.max_seq_len - ids.shape[1]
    gen = palm.sample(ids.to(device), mask.to(device), max(1, min(max_new_tokens, room)), filter_thres=0.0,
                      finetune_scope=scope, generator=torch.Generator(device=device).manual_seed(seed),
                      eos_token=tokenizer.eos_id, pad_value=tokenizer.pad_id,
                      suppress_tokens=never_sampled(tokenizer, palm.config.num_tokens))
    responses = decode_responses(gen.tokens.cpu(), gen.mask.cpu(), tokenizer)
    palm.train(was_training)
    text = "\n".join(f"- **{p!r}** → {r!r}" for p, r in zip(prompts, responses))
    log_text(run_id, "# sample generations\n\n" + text + "\n", artifact_file)
    return responses
