"""Answering prompts with a served model, and scoring answers: what the MLflow model and `palm-rlhf generate` share.

Best-of-n (Stiennon et al. 2020; the reference design's last step): sample `num_samples` answers per prompt and return
the one the reward model scores highest, the reward model being the one the policy was trained against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from models.palm import as_prompt_batch
from models.reward import score_to_rating
from models.threads import sampling_threads
from tasks.data.tokens import decode_responses, encode_dialogues, never_sampled
from tasks.serving.bundle import Bundle

ROWS_PER_BATCH = 64  # prompts x samples sampled together: large enough to use the cores, small enough for memory
MAX_SAMPLES = 64


class GenerationError(ValueError):
    """A request a served model cannot answer as asked (bad parameters, a prompt too long for the context)."""


@dataclass(frozen=True)
class GenerationParams:
    """The request parameters a served policy accepts (the MLflow model's signature lists the same)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    num_samples: int = 1  # n of best-of-n: the reward model picks the best of n answers
    seed: int = 0  # the same request with the same seed gets the same answers
    return_scores: bool = False  # add the reward model's score of each answer

    @classmethod
    def parse(cls, params: dict | None, defaults: dict | None = None) -> "GenerationParams":
        """From a request's params (missing ones from `defaults`, then the class defaults), each checked."""
        values = {**asdict(cls()), **(defaults or {}), **{k: v for k, v in (params or {}).items() if v is not None}}
        unknown = sorted(set(values) - set(asdict(cls())))
        if unknown:
            raise GenerationError(f"unknown parameter {unknown[0]!r}; a policy takes {', '.join(asdict(cls()))}")
        try:
            parsed = cls(max_new_tokens=_int(values["max_new_tokens"]), temperature=float(values["temperature"]),
                         top_k=_int(values["top_k"]), num_samples=_int(values["num_samples"]),
                         seed=_int(values["seed"]), return_scores=_bool(values["return_scores"]))
        except (TypeError, ValueError) as err:
            raise GenerationError(f"bad parameter: {err}") from None
        for name, ok, wanted in (("max_new_tokens", parsed.max_new_tokens >= 1, "at least 1"),
                                 ("temperature", 0 <= parsed.temperature <= 100, "between 0 and 100"),
                                 ("top_k", parsed.top_k >= 0, "0 (all tokens) or more"),
                                 ("num_samples", 1 <= parsed.num_samples <= MAX_SAMPLES,
                                  f"between 1 and {MAX_SAMPLES}"),
                                 ("seed", 0 <= parsed.seed < 2**63, "a non-negative integer")):
            if not ok:
                raise GenerationError(f"{name} must be {wanted}, got {getattr(parsed, name)}")
        return parsed


def _int(value) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(float(value))


def _bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


@torch.no_grad()
def complete(bundle: Bundle, prompts: list[str], params: GenerationParams,
             progress: Callable[[int], None] | None = None) -> list[dict]:
    """One answer per prompt: {"prompt", "completion"} plus "score" when best-of-n or return_scores asked for it."""
    if bundle.palm is None:
        raise GenerationError(f"this is a {bundle.kind} model: it scores (prompt, response) pairs and writes nothing")
    if params.num_samples > 1 and bundle.reward is None:
        raise GenerationError(f"best-of-n (num_samples {params.num_samples}) needs a reward model to choose with, and "
                              f"this {bundle.kind} model bundles none: ask a palm-policy version, or num_samples=1")
    if params.return_scores and bundle.reward is None:
        raise GenerationError(f"return_scores needs a reward model, and this {bundle.kind} model bundles none")
    vocab = bundle.palm.config.num_tokens
    if params.top_k > vocab:
        raise GenerationError(f"top_k must be at most the vocabulary size {vocab}, got {params.top_k}")
    ids = [_prompt_ids(bundle, i, prompt, params.max_new_tokens) for i, prompt in enumerate(prompts)]
    n, answers = params.num_samples, []
    generator = torch.Generator(device=bundle.device).manual_seed(params.seed)
    per_batch = max(1, ROWS_PER_BATCH // n)
    for start in range(0, len(ids), per_batch):
        rows = [torch.tensor(x, device=bundle.device) for x in ids[start:start + per_batch] for _ in range(n)]
        prompt, mask, _ = as_prompt_batch(rows, None, pad_value=bundle.tokenizer.pad_id)
        with sampling_threads(len(rows), bundle.device):  # a few rows decode faster on one CPU thread
            gen = bundle.palm.sample(prompt, mask, params.max_new_tokens, temperature=params.temperature,
                                     filter_thres=0.0, top_k=params.top_k or None, generator=generator,
                                     eos_token=bundle.tokenizer.eos_id, pad_value=bundle.tokenizer.pad_id,
                                     suppress_tokens=never_sampled(bundle.tokenizer, bundle.palm.config.num_tokens))
        texts = decode_responses(gen.tokens.cpu(), gen.mask.cpu(), bundle.tokenizer)
        scores = None
        if bundle.reward is not None and (n > 1 or params.return_scores):
            prompt_part = torch.cat((gen.prompt_mask.bool(), torch.zeros_like(gen.mask)), dim=-1)
            scores = _as_rating(bundle, bundle.reward.score(gen.sequences, mask=gen.sequence_mask,
                                                            prompt_mask=prompt_part).float()).cpu().view(-1, n)
        for i in range(len(rows) // n):
            best = int(scores[i].argmax()) if scores is not None else 0
            answer = {"prompt": prompts[start + i], "completion": texts[i * n + best]}
            if scores is not None:
                answer["score"] = float(scores[i, best])
            answers.append(answer)
        if progress is not None:
            progress(len(answers))
    return answers


def _prompt_ids(bundle: Bundle, index: int, prompt, max_new_tokens: int) -> list[int]:
    if not isinstance(prompt, str) or not prompt:
        raise GenerationError(f"prompt {index} is {'empty' if prompt == '' else f'not text: {prompt!r}'}")
    ids = bundle.tokenizer.encode(prompt)
    if len(ids) + max_new_tokens > bundle.context:
        raise GenerationError(f"prompt {index} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} that "
                              f"exceeds the model's context of {bundle.context} tokens")
    return ids


def _as_rating(bundle: Bundle, raw: torch.Tensor) -> torch.Tensor:
    if bundle.rating_scale is None:
        return raw
    return score_to_rating(raw, bundle.rating_scale, bundle.reward.num_binned_output)


@torch.no_grad()
def score(bundle: Bundle, prompts: list[str], responses: list[str]) -> list[float]:
    """The reward model's score of each (prompt, response), on the rating scale it was trained on where it had one."""
    if bundle.reward is None:
        raise GenerationError(f"this is a {bundle.kind} model: it writes answers; score them with a palm-reward model")
    if len(prompts) != len(responses):
        raise GenerationError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not isinstance(p, str) or not p or not isinstance(r, str):
            raise GenerationError(f"row {i}: prompt and response must be text, and the prompt not empty")
    out = []
    for start in range(0, len(prompts), ROWS_PER_BATCH):
        try:
            ids, mask, pmask = encode_dialogues(prompts[start:start + ROWS_PER_BATCH],
                                                responses[start:start + ROWS_PER_BATCH], bundle.tokenizer,
                                                bundle.context)
        except ValueError as err:
            raise GenerationError(str(err)) from None
        raw = bundle.reward.score(ids.to(bundle.device), mask=mask.to(bundle.device),
                                  prompt_mask=pmask.to(bundle.device)).float()
        out += _as_rating(bundle, raw).cpu().tolist()
    return out
