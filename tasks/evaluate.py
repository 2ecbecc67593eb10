"""Stage 4: best-of-n evaluation of the pretrained and the PPO policy on held-out prompts.

For each policy, N = max(n_values) samples per prompt are drawn once; best-of-n for every n <= N picks, among the
first n samples, the one the reward model scores highest, and the oracle (the labeler, never seen by any model)
rates it. KL per token to the reference is a Monte-Carlo estimate on the policy's own samples. The policy becomes
`champion` only if its mean reward beats the current champion's on the same prompts and reward model.
"""

from __future__ import annotations

import re

import pandas as pd
import torch

from models.palm import PaLM
from models.ppo import gather_logprobs
from models.rlhf import select_best_of_n
from prefect.artifacts import create_table_artifact

from tasks.config import EvalConfig
from tasks.data.files import text_digest
from tasks.data.labeler import labeler_identity, load_labeler, rate_all
from tasks.data.prompts import make_prompts, read_prompts
from tasks.data.tokens import check_prompts_fit, decode_responses, encode_prompts
from tasks.runtime.orchestration import compute_task
from tasks.runtime.progress import progress_bar
from tasks.runtime.stage import CHAMPION, StageResult, mlflow_run, resolve_runtime, run_key
from tasks.storage.inputs import (InputError, ModelInput, Upstream, check_same_base, load_palm, load_policy,
                                  load_reward_model, resolve_input)
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_table, log_text, log_text_dataset
from tasks.tracking.registry import get_alias, set_alias

POLICY_MODEL = "palm-policy"


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams in the samples (Li et al. 2016): 1.0 is no repetition at all."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample_policy(palm: PaLM, scope: str | None, reference: PaLM, rm, prompts: list[str], config: EvalConfig,
                  device, label: str) -> dict:
    """N samples per prompt with reward-model scores and per-sample KL to the reference, as (p, N) tensors."""
    N = max(config.n_values)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    texts, scores, kls, lengths = [], [], [], []
    with progress_bar(f"eval {label}", len(prompts)) as show:
        for i, prompt in enumerate(prompts):
            ids, mask = encode_prompts([prompt] * N)
            ids, mask = ids.to(device), mask.to(device)
            gen = palm.sample(ids, mask, config.max_new_tokens, temperature=config.temperature, filter_thres=0.0,
                              finetune_scope=scope, generator=generator)
            seq, seq_mask, T = gen.sequences, gen.sequence_mask, gen.tokens.shape[1]
            prompt_part = torch.cat((mask, torch.zeros_like(gen.mask)), dim=-1)
            scores.append(rm.score(seq, mask=seq_mask, prompt_mask=prompt_part).float().cpu())
            logp = gather_logprobs(palm(seq[:, :-1], mask=seq_mask[:, :-1], finetune_scope=scope)[:, -T:], gen.tokens)
            ref_logp = gather_logprobs(reference(seq[:, :-1], mask=seq_mask[:, :-1])[:, -T:], gen.tokens)
            kls.append(((logp - ref_logp) * gen.mask).sum(-1).cpu())
            lengths.append(gen.mask.sum(-1).cpu())
            texts.append(decode_responses(gen.tokens.cpu(), gen.mask.cpu()))
            show(i + 1)
    return {"texts": texts, "scores": torch.stack(scores), "kl": torch.stack(kls), "lengths": torch.stack(lengths)}


def policy_metrics(name: str, samples: dict, ratings: torch.Tensor, n_values: list[int]) -> dict[str, float]:
    m = {f"oracle_mean.{name}": ratings.mean().item(), f"reward_mean.{name}": samples["scores"].mean().item(),
         f"kl_per_token.{name}": (samples["kl"].sum() / samples["lengths"].sum().clamp(min=1)).item(),
         f"response_length.{name}": samples["lengths"].float().mean().item()}
    flat = [t for row in samples["texts"] for t in row]
    m[f"distinct_1.{name}"], m[f"distinct_2.{name}"] = distinct_n(flat, 1), distinct_n(flat, 2)
    for n in n_values:
        best = select_best_of_n(samples["scores"], n)[:, None]
        m[f"oracle_mean.{name}.best_of_{n}"] = ratings.gather(1, best).mean().item()
        m[f"reward_mean.{name}.best_of_{n}"] = samples["scores"].gather(1, best).mean().item()
    return m


def results_table(metrics: dict[str, float], policies: list[str], n_values: list[int]) -> pd.DataFrame:
    rows = [{"policy": p, "n": n, "oracle_mean": metrics[f"oracle_mean.{p}.best_of_{n}"],
             "reward_mean": metrics[f"reward_mean.{p}.best_of_{n}"]} for p in policies for n in n_values]
    return pd.DataFrame(rows)


def rating_plot(table: pd.DataFrame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.add_subplot()
    for policy, rows in table.groupby("policy", sort=False):
        ax.plot(rows["n"], rows["oracle_mean"], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("best-of-n (n samples, reward model picks)")
    ax.set_ylabel("oracle rating (stars)")
    ax.set_title("held-out prompts: rating vs n")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def examples_text(prompts: list[str], per_policy: dict[str, dict], ratings: dict[str, torch.Tensor], k: int) -> str:
    lines = []
    for i, prompt in enumerate(prompts[:k]):
        lines.append(f"### prompt {i}: {prompt!r}")
        for name, samples in per_policy.items():
            best = int(samples["scores"][i].argmax())
            lines.append(f"- {name} (sample 0, {ratings[name][i, 0]:.1f} stars): {samples['texts'][i][0]!r}")
            lines.append(f"- {name} (best of {samples['scores'].shape[1]}, {ratings[name][i, best]:.1f} stars): "
                         f"{samples['texts'][i][best]!r}")
        lines.append("")
    return "\n".join(lines)


def resolve_eval_inputs(config: EvalConfig, pretrained_uri: str, reward_uri: str, policy_uri: str):
    pretrained = resolve_input(pretrained_uri, "palm", "--pretrained")
    reward = resolve_input(reward_uri, "reward", "--reward-model")
    policy = resolve_input(policy_uri, "policy", "--policy")
    check_same_base(pretrained, reward)
    check_same_base(pretrained, policy)
    reference = policy.manifest.get("reference_policy", {})
    if reference.get("digest") not in (None, pretrained.digest):
        raise InputError(f"--policy {policy.ref} was trained from {reference['digest']}, not from --pretrained "
                         f"{pretrained.ref} ({pretrained.digest}): KL to the reference would be meaningless")
    prompts, oracle = check_files(config, Upstream.of(pretrained))
    return pretrained, reward, policy, prompts, oracle


def check_files(config: EvalConfig, upstream: Upstream):
    """The held-out prompts and the oracle, against the base model (`upstream`: a checkpoint's, or the one a
    pipeline is about to pretrain): (prompts, oracle)."""
    corpus_text, _ = upstream.corpus
    prompts = read_prompts(config.prompts) if config.prompts else make_prompts(
        corpus_text, config.num_prompts, config.prompt_chars, split="heldout", seed=config.seed)
    check_prompts_fit(prompts, upstream.context, config.max_new_tokens, "eval.prompts")
    return prompts, load_labeler(config.labeler, corpus_text)


def champion_input(policy: ModelInput) -> ModelInput | None:
    version = get_alias(POLICY_MODEL, CHAMPION)
    if version is None or version == policy.version:
        return None
    return resolve_input(f"models:/{POLICY_MODEL}/{version}", "policy", "champion")


def promote(policy: ModelInput, pretrained: ModelInput, reward: ModelInput) -> None:
    """The winning policy and the registered models it was made from become `champion` together."""
    for model in (pretrained, reward, policy):
        if model.name is not None:
            set_alias(model.name, CHAMPION, model.version)


def run_eval(config: EvalConfig, pretrained_uri: str, reward_uri: str, policy_uri: str, *,
             parent_run_id: str | None = None) -> StageResult:
    pretrained, reward, policy, prompts, oracle = resolve_eval_inputs(config, pretrained_uri, reward_uri, policy_uri)
    tracking.check_tracking()
    champion = champion_input(policy)
    prompts_digest = text_digest("\n".join(prompts))
    key = run_key("eval", config, {"pretrained": pretrained.digest, "reward": reward.digest, "policy": policy.digest,
                                   "champion": champion.digest if champion else None, "prompts": prompts_digest,
                                   "oracle": labeler_identity(oracle, config.labeler)})
    device, _ = resolve_runtime(config.runtime)
    with mlflow_run("eval", key, config, parent_run_id=parent_run_id) as run:
        log_text_dataset(run.run_id, name="eval-prompts", source_uri=config.prompts or "corpus:heldout",
                         digest=prompts_digest, context="evaluation", preview="\n".join(prompts[:20]))
        reference = load_palm(pretrained, device).eval()
        rm = load_reward_model(reward, device)
        ac = load_policy(policy, device)
        candidates = {"pretrained": (reference, None), "ppo": (ac.palm, ac.actor_scope)}
        if champion is not None:
            champ = load_policy(champion, device)
            candidates["champion"] = (champ.palm, champ.actor_scope)
        per_policy, ratings, metrics = {}, {}, {}
        for name, (palm, scope) in candidates.items():
            samples = sample_policy(palm, scope, reference, rm, prompts, config, device, name)
            flat = [t for row in samples["texts"] for t in row]
            N = samples["scores"].shape[1]
            rated = rate_all(oracle, [p for p in prompts for _ in range(N)], flat)
            ratings[name] = torch.tensor(rated, dtype=torch.float32).reshape(samples["scores"].shape)
            per_policy[name] = samples
            metrics.update(policy_metrics(name, samples, ratings[name], config.n_values))
        promoted = champion is None or metrics["reward_mean.ppo"] > metrics["reward_mean.champion"]
        metrics["promoted"] = float(promoted)
        table = results_table(metrics, list(candidates), config.n_values)
        run.metrics.log(0, **metrics)
        run.metrics.flush()
        log_table(run.run_id, table, "eval/results.json")
        tracking.get_client().log_figure(run.run_id, rating_plot(table), "plots/rating_vs_n.png")
        log_text(run.run_id, examples_text(prompts, per_policy, ratings, config.num_examples),
                          "eval/examples.md")
        if promoted and policy.name == POLICY_MODEL:
            promote(policy, pretrained, reward)
    return StageResult(stage="eval", checkpoint_uri=policy.checkpoint_uri, digest=policy.digest,
                       mlflow_run_id=run.run_id, model_name=policy.name, model_version=policy.version, cached=False,
                       run_key=key, metrics=metrics)



def eval_rows(metrics: dict[str, float]) -> list[dict]:
    """One row per policy and n, from metric names like oracle_mean.ppo.best_of_16."""
    rows = []
    for key, value in metrics.items():
        match = re.fullmatch(r"oracle_mean\.(\w+)\.best_of_(\d+)", key)
        if match:
            policy, n = match.groups()
            rows.append({"policy": policy, "n": int(n), "oracle_mean": round(value, 3),
                         "reward_mean": round(metrics[f"reward_mean.{policy}.best_of_{n}"], 3),
                         "kl_per_token": round(metrics[f"kl_per_token.{policy}"], 4),
                         "distinct_2": round(metrics[f"distinct_2.{policy}"], 3)})
    return sorted(rows, key=lambda r: (r["policy"], r["n"]))


@compute_task("eval-best-of-n")
def eval_task(config: EvalConfig, pretrained: str, reward_model: str, policy: str,
              parent_run_id: str | None) -> StageResult:
    result = run_eval(config, pretrained, reward_model, policy, parent_run_id=parent_run_id)
    create_table_artifact(eval_rows(result.metrics), key="palm-rlhf-eval-results",
                          description="best-of-n on held-out prompts: oracle rating and reward-model score")
    return result
