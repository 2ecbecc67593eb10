"""The evaluation's numbers, as pure functions of the samples: diversity, paired win rates with their confidence
interval, the response-length distribution, and the KL a best-of-n choice costs.

A policy's samples are (prompts, samples) tensors on the same held-out prompts as the baseline's: prompts are the
independent units, so a win rate's interval comes from how it varies between prompts.
"""

from __future__ import annotations

import math

import torch


def distinct_n(sequences: list, n: int) -> float:
    """Distinct n-grams over all n-grams in the samples (Li et al. 2016): 1.0 is no repetition at all, 0 is one
    n-gram said over and over (or answers shorter than n). Over token ids (any language, any tokenizer: the
    evaluation's and PPO's diversity), or over words when given strings."""
    seqs = [s.split() if isinstance(s, str) else list(s) for s in sequences]
    grams = [tuple(seq[i:i + n]) for seq in seqs for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def prompt_win_rates(scores: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """(p,) for each prompt, the chance that one of the policy's answers beats one of the baseline's: the share of
    (policy answer, baseline answer) pairs it wins, a tie counting half. scores (p, a), baseline (p, b)."""
    diff = scores[:, :, None].float() - baseline[:, None, :].float()  # (p, a, b)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(dim=(1, 2))


def win_rate(scores: torch.Tensor, baseline: torch.Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """(win rate, low, high): the mean of the per-prompt win rates and its t interval over prompts (NaN bounds with
    fewer than two prompts)."""
    per_prompt = prompt_win_rates(scores, baseline).double()
    p = per_prompt.numel()
    mean = float(per_prompt.mean())
    if p < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, p - 1)) * float(per_prompt.std(unbiased=True)) / math.sqrt(p)
    return mean, max(mean - half, 0.0), min(mean + half, 1.0)


def length_stats(lengths: torch.Tensor, stopped: torch.Tensor) -> dict[str, float]:
    """The response-length distribution (tokens) and the share of answers that ended with end-of-text rather than
    at the length cap: a policy that learns to stop early, or to ramble, shows here."""
    flat = lengths.float().flatten()
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]))
    return {"mean": float(flat.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]),
            "stopped": float(stopped.float().mean())}


def best_of_n_kl_bound(n: int) -> float:
    """KL of best-of-n sampling to its base policy, bounded by log n - (n - 1) / n nats (Stiennon et al. 2020;
    Beirami et al. 2024 show it is an upper bound)."""
    return math.log(n) - (n - 1) / n


def top_answer_share(texts: list[list[str]]) -> float:
    """The share of all answers (every prompt's) that are the single most common answer: near 0 for a policy that
    answers each prompt its own way, high for one that says the same thing whatever it is asked."""
    counts: dict[str, int] = {}
    for row in texts:
        for text in row:
            counts[text] = counts.get(text, 0) + 1
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0
