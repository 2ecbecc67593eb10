"""What the evaluation shows people: the results table, plots of rating against n and of response lengths, and a
markdown report with example answers. Everything here reads the metrics and samples; nothing computes a new number.
"""

from __future__ import annotations

import re

import pandas as pd
import torch

from tasks.evaluation.sampling import Samples


def results_table(metrics: dict[str, float], policies: list[str], n_values: list[int]) -> pd.DataFrame:
    """One row per policy and n: the oracle's rating (when there is an oracle) and the reward model's score of the
    best of n, and the policy's win rate against the pretrained one."""
    rows = []
    for p in policies:
        for n in n_values:
            row = {"policy": p, "n": n, "reward_mean": metrics[f"reward_mean.{p}.best_of_{n}"]}
            if f"oracle_mean.{p}.best_of_{n}" in metrics:
                row["oracle_mean"] = metrics[f"oracle_mean.{p}.best_of_{n}"]
            row["win_rate"] = metrics.get(f"win_rate.{p}.best_of_{n}", float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)


def comparison_rows(metrics: dict[str, float], policies: list[str], n_values: list[int]) -> list[str]:
    """Every policy compared, in reading order: each baseline or policy, followed by best-of-n on it where measured."""
    rows = []
    for p in policies:
        rows.append(p)
        rows += [f"{p}.best_of_{n}" for n in n_values if n > 1 and f"reward_mean.{p}.best_of_{n}" in metrics]
    return rows


def comparison_table(metrics: dict[str, float], policies: list[str], n_values: list[int]) -> pd.DataFrame:
    """What RLHF bought against what a user could do without it: one row per policy (temperature baselines and
    best-of-n included) with the oracle's rating, the reward model's score, KL to the pretrained policy (for best-of-n
    the chosen answers' own plus the analytic bound), length, diversity, and the win rate against the pretrained
    policy with its 95% interval."""
    out = []
    for name in comparison_rows(metrics, policies, n_values):
        row = {"policy": name}
        if f"oracle_mean.{name}" in metrics:
            row["oracle"] = metrics[f"oracle_mean.{name}"]
        row.update({"reward": metrics[f"reward_mean.{name}"], "kl": metrics[f"kl.{name}"],
                    "kl_bound": metrics.get(f"kl_bound.{name}", 0.0),
                    "kl_per_token": metrics[f"kl_per_token.{name}"], "length": metrics[f"response_length.{name}"],
                    "distinct_2": metrics[f"distinct_2.{name}"], "win_rate": metrics[f"win_rate.{name}"],
                    "win_rate_ci_low": metrics[f"win_rate.{name}.ci_low"],
                    "win_rate_ci_high": metrics[f"win_rate.{name}.ci_high"]})
        out.append(row)
    return pd.DataFrame(out)


def table_rows(metrics: dict[str, float]) -> list[dict]:
    """The Prefect table artifact's rows: the comparison table, rounded, for every policy the metrics name."""
    policies = [k.split(".", 1)[1] for k in metrics if k.startswith("reward_mean.") and k.count(".") == 1
                and k != "reward_mean.best_temperature"]
    n_values = sorted({int(m.group(1)) for k in metrics for m in [re.search(r"\.best_of_(\d+)$", k)] if m})
    frame = comparison_table(metrics, policies, n_values)
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def rating_plot(table: pd.DataFrame):
    """Rating (the oracle's, else the reward model's) of best-of-n against n, a line per policy."""
    from matplotlib.figure import Figure

    column = "oracle_mean" if "oracle_mean" in table else "reward_mean"
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot()
    for policy, rows in table.groupby("policy", sort=False):
        ax.plot(rows["n"], rows[column], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("best-of-n (n samples, reward model picks)")
    ax.set_ylabel("oracle rating" if column == "oracle_mean" else "reward-model score")
    ax.set_title("held-out prompts: rating vs n")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def length_plot(samples: dict[str, Samples], max_new_tokens: int):
    """The response-length distribution of each policy: stopping early or rambling shows as a shift."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot()
    bins = torch.linspace(0, max_new_tokens, min(max_new_tokens, 32) + 1).tolist()
    for name, s in samples.items():
        ax.hist(s.lengths.flatten().tolist(), bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set_xlabel("response length (tokens, end-of-text included)")
    ax.set_ylabel("answers")
    ax.set_title("held-out prompts: response lengths")
    ax.legend()
    fig.tight_layout()
    return fig


def report_text(metrics: dict[str, float], policies: list[str], n_values: list[int], oracle: str | None, judge: str,
                notes: list[str]) -> str:
    """The evaluation in a few lines, for the run's artifacts and the Prefect log: the comparison table, the best
    temperature, the alarm and the promotion decision (`notes`)."""
    lines = ["# Evaluation", ""]
    if oracle is None:
        lines += ["No oracle: the feedback is yours and no rater was given (eval.labeler), so no star ratings are "
                  "made up. What follows is what can be measured honestly: the reward model's judgement (the proxy "
                  "PPO optimised, so read it with care), KL to the pretrained policy, lengths and diversity.", ""]
    else:
        lines += [f"Oracle: `{oracle}`, a rater no model was trained on.", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    has_oracle = f"oracle_mean.{policies[0]}" in metrics
    lines += [f"| policy | {'oracle | ' if has_oracle else ''}reward | KL (nats/answer) | KL/token | length | "
              f"stopped | distinct-2 | win rate vs pretrained ({judge}) | 95% interval |",
              "|---|" + ("---:|" * (8 if has_oracle else 7)) + "---|"]
    for p in comparison_rows(metrics, policies, n_values):
        bound = f" (bound {metrics[f'kl_bound.{p}']:.2f})" if f"kl_bound.{p}" in metrics else ""
        lines.append(f"| {p} | " + (f"{metrics[f'oracle_mean.{p}']:.3f} | " if has_oracle else "")
                     + f"{metrics[f'reward_mean.{p}']:.3f} | {metrics[f'kl.{p}']:.2f}{bound} | "
                     f"{metrics[f'kl_per_token.{p}']:.4f} | {metrics[f'response_length.{p}']:.1f} | "
                     f"{metrics[f'stopped.{p}']:.2f} | {metrics[f'distinct_2.{p}']:.3f} | "
                     f"{metrics[f'win_rate.{p}']:.3f} | [{metrics[f'win_rate.{p}.ci_low']:.3f}, "
                     f"{metrics[f'win_rate.{p}.ci_high']:.3f}] |")
    best = metrics["best_temperature"]
    lines += ["", f"Best temperature baseline: T = {best:g}"
              + (f", oracle {metrics['oracle_mean.best_temperature']:.3f}" if "oracle_mean.best_temperature" in metrics
                 else f", reward {metrics['reward_mean.best_temperature']:.3f}")
              + f"; PPO reached {metrics['oracle_mean.ppo' if has_oracle else 'reward_mean.ppo']:.3f}."]
    return "\n".join(lines) + "\n"


def examples_text(prompts: list[str], samples: dict[str, Samples], ratings: dict[str, torch.Tensor] | None,
                  k: int) -> str:
    """The first k prompts with each policy's first answer and its best-of-N answer."""
    def judged(name: str, i: int, j: int) -> str:
        if ratings is None:
            return f"reward {samples[name].scores[i, j]:.2f}"
        return f"{ratings[name][i, j]:.1f} stars"

    lines = []
    for i, prompt in enumerate(prompts[:k]):
        lines.append(f"### prompt {i}: {prompt!r}")
        for name, s in samples.items():
            best = int(s.scores[i].argmax())
            lines.append(f"- {name} (sample 0, {judged(name, i, 0)}): {s.texts[i][0]!r}")
            lines.append(f"- {name} (best of {s.scores.shape[1]}, {judged(name, i, best)}): {s.texts[i][best]!r}")
        lines.append("")
    return "\n".join(lines)
