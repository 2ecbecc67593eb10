"""The demo's RLHF figures for variants of the `demo` preset, side by side in one table.

    python benchmarks/demo_sweep.py "" "ppo.kl_coef=0.1" "reward.head=mean-pooled ppo.dense_rewards=false"

Each argument is one variant: space-separated `stage.key=value` settings on top of the preset ("" is the preset
itself). The stages run in this process, without Prefect, in the usual home (`./.palm-rlhf`, or PALM_RLHF_HOME), so
variants share what they have in common: a PPO-only variant reuses the pretrained and reward models. Prints one
markdown row per variant as it finishes, then the whole table.
"""

from __future__ import annotations

import argparse
import os

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
    return metrics


def row(name: str, metrics: dict[str, float]) -> str:
    cells = [f"`{name}`" if name else "demo preset"]
    cells += [f"{metrics[c]:+.2f}" if c == "gain" else f"{metrics[c]:.3f}" for c in COLUMNS]
    cells.append(f"{metrics['minutes']:.1f}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help='settings per variant, e.g. "ppo.kl_coef=0.1 ppo.steps=120"')
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()
    os.environ.setdefault("PALM_RLHF_PROGRESS", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for variant in args.variants:
        line = row(variant, run_variant(args.preset, variant.split()))
        print(line, flush=True)
        table.append(line)
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
