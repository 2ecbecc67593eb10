"""Sampling one policy on the held-out prompts: N answers per prompt, each with its reward-model score, its KL to the
reference policy, its length and whether it ended with end-of-text. Prompts are batched together (ROWS rows a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.actor_critic import sampling_logits
from models.palm import PaLM
from models.ppo import entropy_from_logits, gather_logprobs
from models.sampling import in_precision
from tasks.data.tokenizer import Tokenizer
from tasks.data.tokens import decode_responses, left_padded, never_sampled
from tasks.runtime.progress import progress_bar

ROWS = 64  # answers sampled together


@dataclass
class Samples:
    texts: list[list[str]]  # (p, N)
    tokens: list[list[list[int]]]  # (p, N) each answer's token ids, end-of-text left out
    scores: torch.Tensor  # (p, N) reward-model score
    kl: torch.Tensor  # (p, N) sum over the answer of log pi(a_t) - log pi_ref(a_t), pi the sampling distribution
    lengths: torch.Tensor  # (p, N) tokens, end-of-text included
    stopped: torch.Tensor  # (p, N) the answer ended with end-of-text, not at the length cap
    entropy: torch.Tensor  # (p, N) mean entropy per token of the sampling distribution along the answer (nats)

    @property
    def flat_texts(self) -> list[str]:
        return [t for row in self.texts for t in row]

    @property
    def flat_tokens(self) -> list[list[int]]:
        return [t for row in self.tokens for t in row]


def answer_ids(tokens: torch.Tensor, mask: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Each row's real token ids, end-of-text left out."""
    return [[t for t in row[m].tolist() if t != eos_id] for row, m in zip(tokens, mask)]


@torch.no_grad()
def sample_policy(palm: PaLM, scope: str | None, reference: PaLM, rm, tokenizer: Tokenizer, prompts: list[str], *,
                  samples: int, max_new_tokens: int, temperature: float, seed: int, device, label: str,
                  sample_dtype: torch.dtype | None = None) -> Samples:
    """`samples` answers per prompt at `temperature` (the full distribution, no top-k), until end-of-text or
    `max_new_tokens`, drawn in `sample_dtype` (None: the model's own). The KL is the sampling distribution's (the
    tempered policy's) to the untempered reference, both in the model's own precision."""
    generator = torch.Generator(device=device).manual_seed(seed)
    banned = never_sampled(tokenizer, palm.config.num_tokens)
    sampler = in_precision(palm, sample_dtype)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    rows = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(samples)]
    same_as_reference = palm is reference and scope is None  # the pretrained arms: one forward pass serves both
    texts, tokens, scores, kls, lengths, stopped, entropies = [], [], [], [], [], [], []
    with progress_bar(f"eval {label}", len(prompts)) as show:
        for start in range(0, len(rows), ROWS):
            batch = rows[start:start + ROWS]
            ids, mask = left_padded([r for _, r in batch], tokenizer.pad_id)
            ids, mask = ids.to(device), mask.to(device)
            gen = sampler.sample(ids, mask, max_new_tokens, temperature=temperature, filter_thres=0.0,
                                 finetune_scope=scope, generator=generator, eos_token=tokenizer.eos_id,
                                 pad_value=tokenizer.pad_id, suppress_tokens=banned)
            seq, seq_mask, T = gen.sequences, gen.sequence_mask, gen.tokens.shape[1]
            prompt_part = torch.cat((mask, torch.zeros_like(gen.mask)), dim=-1)
            scores.append(rm.score(seq, mask=seq_mask, prompt_mask=prompt_part).float().cpu())
            raw = palm(seq[:, :-1], mask=seq_mask[:, :-1], finetune_scope=scope)[:, -T:].float()
            logits = sampling_logits(raw / temperature, banned)
            logp = gather_logprobs(logits, gen.tokens)
            entropy = entropy_from_logits(logits) * gen.mask
            entropies.append((entropy.sum(-1) / gen.mask.sum(-1).clamp(min=1)).cpu())
            if not same_as_reference:
                raw = reference(seq[:, :-1], mask=seq_mask[:, :-1])[:, -T:].float()
            ref_logits = sampling_logits(raw, banned)
            ref_logp = gather_logprobs(ref_logits, gen.tokens)
            kls.append(((logp - ref_logp) * gen.mask).sum(-1).cpu())
            lengths.append(gen.mask.sum(-1).cpu())
            stopped.append(((gen.tokens == tokenizer.eos_id) & gen.mask).any(-1).cpu())
            texts += decode_responses(gen.tokens.cpu(), gen.mask.cpu(), tokenizer)
            tokens += answer_ids(gen.tokens.cpu(), gen.mask.cpu(), tokenizer.eos_id)
            show(min((start + len(batch)) // samples, len(prompts)))
    shape = (len(prompts), samples)
    return Samples([texts[i * samples:(i + 1) * samples] for i in range(len(prompts))],
                   [tokens[i * samples:(i + 1) * samples] for i in range(len(prompts))],
                   torch.cat(scores).view(shape), torch.cat(kls).view(shape), torch.cat(lengths).view(shape),
                   torch.cat(stopped).view(shape), torch.cat(entropies).view(shape))
