"""The demo's RLHF figures for variants of the `demo` preset, side by side in one table.

    python benchmarks/demo_sweep.py "" "ppo.kl_coef=0.1" "reward.head=mean-pooled ppo.dense_rewards=false"

Each argument is one variant: space-separated `stage.key=value` settings on top of the preset ("" is the preset
itself). The stages run in this process, without Prefect, in the usual home (`./.palm-rlhf`, or PALM_RLHF_HOME), so
variants share what they have in common: a PPO-only variant reuses the pretrained and reward models. Prints one
markdown row per variant as it finishes, then the whole table, and a second table of each stage's wall time and
the PPO policy's response length and KL per response (KL per token times tokens per response: what compares across
tokenizers, whose tokens hold different amounts of text). --json keeps every stage's metrics and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gpu_check import demo_pipeline  # the same four stages, in this process

COLUMNS = ("heldout_pair_accuracy", "oracle_mean.pretrained", "oracle_mean.ppo", "gain",
           "oracle_mean.pretrained.best_of_16", "oracle_mean.ppo.best_of_16", "kl_per_token.ppo", "distinct_2.ppo")
HEADER = ("variant", "RM pair acc.", "pretrained", "PPO", "PPO gain", "pretrained bo16", "PPO bo16", "KL/token",
          "distinct-2", "reward + PPO min")


def run_variant(preset: str, settings: list[str]) -> dict[str, float]:
    stages = demo_pipeline(preset, [], settings)["stages"]
    metrics = dict(stages["eval"]["metrics"])
    metrics["heldout_pair_accuracy"] = stages["reward"]["metrics"]["heldout_pair_accuracy"]
    metrics["gain"] = metrics["oracle_mean.ppo"] - metrics["oracle_mean.pretrained"]
    metrics["minutes"] = (stages["reward"]["seconds"] + stages["ppo"]["seconds"]) / 60
    metrics["seconds"] = {name: stage["seconds"] for name, stage in stages.items()}
    return metrics


TIMES_HEADER = ("variant", "pretrain s", "reward s", "PPO s", "eval s", "total min", "PPO response, tokens",
                "KL/response, PPO")


def times_row(name: str, metrics: dict) -> str:
    s = metrics["seconds"]
    cells = [f"`{name}`" if name else "demo preset", *(f"{s[k]:.0f}" for k in ("pretrain", "reward", "ppo", "eval")),
             f"{sum(s.values()) / 60:.1f}", f"{metrics['response_length.ppo']:.1f}",
             f"{metrics['kl_per_token.ppo'] * metrics['response_length.ppo']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def row(name: str, metrics: dict[str, float]) -> str:
    cells = [f"`{name}`" if name else "demo preset"]
    cells += [f"{metrics[c]:+.2f}" if c == "gain" else f"{metrics[c]:.3f}" for c in COLUMNS]
    cells.append(f"{metrics['minutes']:.1f}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help='settings per variant, e.g. "ppo.kl_coef=0.1 ppo.steps=120"')
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--json", type=Path, help="write every variant's metrics and stage seconds here")
    args = parser.parse_args()
    os.environ.setdefault("PALM_RLHF_PROGRESS", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    times = ["| " + " | ".join(TIMES_HEADER) + " |", "|" + "---|" * len(TIMES_HEADER)]
    results = {}
    for variant in args.variants:
        results[variant] = metrics = run_variant(args.preset, variant.split())
        line = row(variant, metrics)
        print(line, flush=True)
        table.append(line)
        times.append(times_row(variant, metrics))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    print("\n" + "\n".join(table) + "\n\n" + "\n".join(times))


if __name__ == "__main__":
    main()
