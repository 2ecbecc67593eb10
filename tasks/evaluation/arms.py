"""The policies an evaluation compares, as numbers: one policy's answers (or best-of-n's choices among them) against
the pretrained baseline's, on the same held-out prompts. Pure functions of the samples and ratings.
"""

from __future__ import annotations

import torch

from models.rlhf import select_best_of_n
from tasks.evaluation.alarms import Point
from tasks.evaluation.metrics import best_of_n_kl_bound, distinct_n, length_stats, top_answer_share, win_rate
from tasks.evaluation.sampling import Samples

BASELINE = "pretrained"  # what every win rate is against: the pretrained policy at eval.temperature


def temperature_name(temperature: float) -> str:
    """The name of a temperature baseline: pretrained_t070 is the pretrained policy at T = 0.70."""
    return f"{BASELINE}_t{round(temperature * 100):03d}"


def pick(samples: Samples, ratings: torch.Tensor | None, index: torch.Tensor) -> tuple[Samples, torch.Tensor | None]:
    """One answer per prompt, at `index` (p,): best-of-n's choice, as a policy of its own."""
    idx = index[:, None]
    chosen = Samples([[row[int(i)]] for row, i in zip(samples.texts, index)],
                     [[row[int(i)]] for row, i in zip(samples.tokens, index)], samples.scores.gather(1, idx),
                     samples.kl.gather(1, idx), samples.lengths.gather(1, idx), samples.stopped.gather(1, idx),
                     samples.entropy.gather(1, idx))
    return chosen, ratings.gather(1, idx) if ratings is not None else None


def policy_metrics(name: str, samples: Samples, ratings: torch.Tensor | None, baseline: Samples,
                   baseline_ratings: torch.Tensor | None, norm: dict) -> dict[str, float]:
    """Every number of one policy (or of best-of-n's choices), against the pretrained baseline. Win rates are on the
    oracle's ratings when there are any, else on the reward model's scores."""
    judge, against = (ratings, baseline_ratings) if ratings is not None else (samples.scores, baseline.scores)
    reward = samples.scores.mean().item()
    m = {f"reward_mean.{name}": reward, f"reward_sd.{name}": (reward - norm["mean"]) / norm["std"],
         f"kl.{name}": samples.kl.mean().item(),
         f"kl_per_token.{name}": (samples.kl.sum() / samples.lengths.sum().clamp(min=1)).item(),
         f"entropy.{name}": samples.entropy.mean().item(),
         f"response_length.{name}": samples.lengths.float().mean().item(),
         f"same_answer.{name}": top_answer_share(samples.texts)}
    if ratings is not None:
        m[f"oracle_mean.{name}"] = ratings.mean().item()
    m.update(paired_win(f"win_rate.{name}", judge, against))
    m.update(paired_win(f"reward_win_rate.{name}", samples.scores, baseline.scores))
    lengths = length_stats(samples.lengths, samples.stopped)
    m.update({f"response_length.{name}.{k}": v for k, v in lengths.items() if k in ("p10", "p50", "p90")})
    m[f"stopped.{name}"] = lengths["stopped"]
    m[f"distinct_1.{name}"] = distinct_n(samples.flat_tokens, 1)
    m[f"distinct_2.{name}"] = distinct_n(samples.flat_tokens, 2)
    return m


def best_of_n_metrics(name: str, samples: Samples, ratings: torch.Tensor | None, baseline: Samples,
                      baseline_ratings: torch.Tensor | None, n_values: list[int], norm: dict) -> dict[str, float]:
    """Best-of-n on one policy for each n, as `<name>.best_of_<n>` policies; its KL is the chosen answers' own plus
    the bound best-of-n adds (`kl_bound.<name>.best_of_<n>`)."""
    m = {}
    for n in n_values:
        chosen, rated = pick(samples, ratings, select_best_of_n(samples.scores, n))
        key = f"{name}.best_of_{n}"
        found = policy_metrics(key, chosen, rated, baseline, baseline_ratings, norm)
        found[f"kl_bound.{key}"] = best_of_n_kl_bound(n)
        found[f"kl.{key}"] += best_of_n_kl_bound(n)
        m.update(found)
    return m


def paired_win(key: str, scores: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
    rate, low, high = win_rate(scores, baseline)
    return {key: rate, f"{key}.ci_low": low, f"{key}.ci_high": high}


def point(name: str, metrics: dict[str, float], step: int | None) -> Point:
    """A measured policy as the alarms and the frontier see it."""
    return Point(name, step, metrics[f"kl.{name}"], metrics[f"reward_mean.{name}"], metrics[f"reward_sd.{name}"],
                 metrics.get(f"oracle_mean.{name}"), metrics[f"distinct_2.{name}"], metrics[f"entropy.{name}"],
                 metrics[f"same_answer.{name}"])
