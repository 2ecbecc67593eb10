"""The KL-quality frontier (Gao et al. 2022, "Scaling laws for reward model overoptimization"): quality against
the square root of the KL to the reference, for best-of-n on the pretrained policy (n = 1, 2, 4, ... up to the
samples drawn; its KL is the analytic bound log n - (n - 1) / n) and for the PPO policy along its training (its
checkpoints, measured on the held-out prompts), with the oracle's rating and the reward model's score side by side.
A policy above the best-of-n line bought its quality with less KL than picking among samples would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.rlhf import select_best_of_n
from tasks.evaluation.metrics import best_of_n_kl_bound


@dataclass
class FrontierPoint:
    label: str
    kl: float  # nats per answer
    reward: float
    oracle: float | None


def powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def best_of_n_curve(name: str, scores: torch.Tensor, kl: torch.Tensor,
                    ratings: torch.Tensor | None) -> list[FrontierPoint]:
    """Best-of-n on one policy's samples (p, N) for n = 1, 2, 4, ...: its KL is the chosen answers' own KL to the
    reference plus the bound best-of-n adds."""
    points = []
    for n in powers_of_two(scores.shape[1]):
        best = select_best_of_n(scores, n)[:, None]
        kl_n = float(kl.gather(1, best).mean()) + best_of_n_kl_bound(n)
        points.append(FrontierPoint(f"{name} best-of-{n}", kl_n, float(scores.gather(1, best).mean()),
                                    float(ratings.gather(1, best).mean()) if ratings is not None else None))
    return points


def frontier_plot(lines: dict[str, list[FrontierPoint]], marks: list[FrontierPoint]):
    """One panel per judge (the oracle when any point has it, and the reward model): a line per policy family
    (`lines`), single policies (`marks`, e.g. the temperature baselines) as points."""
    from matplotlib.figure import Figure

    judges = [("reward", "reward-model score")]
    if any(p.oracle is not None for pts in lines.values() for p in pts):
        judges.insert(0, ("oracle", "oracle rating"))
    fig = Figure(figsize=(5.5 * len(judges), 4.2), dpi=110)
    for i, (field, label) in enumerate(judges):
        ax = fig.add_subplot(1, len(judges), i + 1)
        for name, points in lines.items():
            ax.plot([math.sqrt(max(p.kl, 0.0)) for p in points], [getattr(p, field) for p in points], marker="o",
                    label=name)
        for p in marks:
            ax.scatter([math.sqrt(max(p.kl, 0.0))], [getattr(p, field)], marker="x", s=50, label=p.label)
        ax.set_xlabel("sqrt(KL to the pretrained policy), nats per answer")
        ax.set_ylabel(label)
        ax.set_title(f"held-out prompts: {label} vs sqrt(KL)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
