"""Stage 4: evaluation of the pretrained and the PPO policy, and of best-of-n on each, on held-out prompts.

For each policy, N = max(n_values) answers per prompt are drawn once (tasks/evaluation/sampling.py); best-of-n for
every n <= N picks, among the first n answers, the one the reward model scores highest. The oracle (a rater no model
was trained on) rates every answer when there is one: the simulated feedback's rater for the built-in demo, or
`eval.labeler`; a user who brought feedback and no rater gets no made-up stars, and the report says so. Each policy's
win rate against the pretrained policy is paired per prompt, with a 95% interval (tasks/evaluation/metrics.py), on the
oracle when there is one and on the reward model otherwise. KL per token to the reference is a Monte-Carlo estimate on
the policy's own answers. The policy becomes `champion` only if its mean reward beats the current champion's on the
same prompts and reward model.
"""

from __future__ import annotations

import torch
from prefect.artifacts import create_table_artifact

from models.rlhf import select_best_of_n
from tasks.config import EvalConfig
from tasks.data.files import text_digest
from tasks.data.labeler import Labeler, labeler_identity, load_labeler, rate_all
from tasks.data.prompts import make_prompts, read_prompts
from tasks.data.tokens import check_prompts_fit, fit_prompts
from tasks.evaluation.metrics import distinct_n, length_stats, win_rate
from tasks.evaluation.report import examples_text, length_plot, rating_plot, report_text, results_table, table_rows
from tasks.evaluation.sampling import Samples, sample_policy
from tasks.runtime.orchestration import compute_task
from tasks.runtime.stage import CHAMPION, StageResult, mlflow_run, resolve_runtime, run_key
from tasks.storage.inputs import (InputError, ModelInput, Upstream, check_same_base, feedback_prompts, load_palm,
                                  load_policy, load_reward_model, resolve_input)
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_table, log_text, log_text_dataset
from tasks.tracking.registry import get_alias, set_alias

POLICY_MODEL = "palm-policy"
BASELINE = "pretrained"  # what every win rate is against: the pretrained policy at eval.temperature


def policy_metrics(name: str, samples: Samples, baseline: Samples, ratings: torch.Tensor | None,
                   baseline_ratings: torch.Tensor | None, n_values: list[int]) -> dict[str, float]:
    """Every number of one policy and of best-of-n on it. Win rates are on the oracle's ratings when there are any,
    else on the reward model's scores."""
    judge, against = (ratings, baseline_ratings) if ratings is not None else (samples.scores, baseline.scores)
    m = {f"reward_mean.{name}": samples.scores.mean().item(),
         f"kl_per_token.{name}": (samples.kl.sum() / samples.lengths.sum().clamp(min=1)).item(),
         f"response_length.{name}": samples.lengths.float().mean().item()}
    if ratings is not None:
        m[f"oracle_mean.{name}"] = ratings.mean().item()
    m.update(_win(f"win_rate.{name}", judge, against))
    m.update(_win(f"reward_win_rate.{name}", samples.scores, baseline.scores))
    lengths = length_stats(samples.lengths, samples.stopped)
    m.update({f"response_length.{name}.{k}": v for k, v in lengths.items() if k in ("p10", "p50", "p90")})
    m[f"stopped.{name}"] = lengths["stopped"]
    m[f"distinct_1.{name}"], m[f"distinct_2.{name}"] = distinct_n(samples.flat_texts, 1), distinct_n(samples.flat_texts, 2)
    for n in n_values:
        best = select_best_of_n(samples.scores, n)[:, None]
        m[f"reward_mean.{name}.best_of_{n}"] = samples.scores.gather(1, best).mean().item()
        if ratings is not None:
            m[f"oracle_mean.{name}.best_of_{n}"] = ratings.gather(1, best).mean().item()
        m.update(_win(f"win_rate.{name}.best_of_{n}", judge.gather(1, best), against))
    return m


def _win(key: str, scores: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
    rate, low, high = win_rate(scores, baseline)
    return {key: rate, f"{key}.ci_low": low, f"{key}.ci_high": high}


def eval_prompts(config: EvalConfig, upstream: Upstream,
                 heldout: list[str] | None) -> tuple[list[str], str] | None:
    """eval.prompts; else the held-out prompts of the feedback the reward model was fitted on (`heldout`, never
    PPO's); else (simulated feedback: the built-in demo) held-out prompts cut from the corpus. None when the held-out
    prompts of user feedback are not split yet (a pipeline's check before its reward stage: that stage checks them)."""
    if config.prompts:
        return read_prompts(config.prompts), config.prompts
    if heldout is not None:  # a prompt with no room to answer keeps its end, as in the reward model's rows
        fitted, _ = fit_prompts(heldout[:config.num_prompts], upstream.tokenizer, upstream.context,
                                config.max_new_tokens)
        return fitted, "feedback:heldout-prompts"
    sample, _ = upstream.corpus
    return (make_prompts(sample, config.num_prompts, config.prompt_chars, split="heldout", seed=config.seed),
            "corpus:heldout")


def eval_oracle(config: EvalConfig, upstream: Upstream, simulated_with: str | None) -> tuple[Labeler | None, str | None]:
    """The oracle and its spec: eval.labeler; else the rater that simulated the reward model's feedback
    (`simulated_with`); else none."""
    spec = config.labeler or simulated_with
    if spec is None:
        return None, None
    sample, _ = upstream.corpus if spec.startswith("builtin:") else ("", None)
    return load_labeler(spec, sample), spec


def check_files(config: EvalConfig, upstream: Upstream, heldout: list[str] | None = None,
                simulated_with: str | None = None, from_feedback: bool = False):
    """The prompts and the oracle, against the base model (`upstream`: a checkpoint's, or the one a pipeline is about
    to pretrain), given what the reward model was fitted on (its feedback's held-out prompts, the rater that simulated
    it; `from_feedback`: user feedback whose split is not made yet): (prompts, source, oracle, spec)."""
    found = eval_prompts(config, upstream, heldout) if heldout is not None or not from_feedback or config.prompts \
        else None
    prompts, source = found if found is not None else (None, "feedback:heldout-prompts")
    if prompts is not None:
        check_prompts_fit(prompts, upstream.tokenizer, upstream.context, config.max_new_tokens, "eval.prompts")
    oracle, spec = eval_oracle(config, upstream, simulated_with)
    return prompts, source, oracle, spec


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
    feedback = reward.manifest.get("feedback") or {}
    simulated_with = feedback.get("labeler") if feedback.get("simulated") else None
    prompts, source, oracle, spec = check_files(config, Upstream.of(pretrained), feedback_prompts(reward, "heldout"),
                                                simulated_with)
    return pretrained, reward, policy, prompts, source, oracle, spec


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
    pretrained, reward, policy, prompts, source, oracle, spec = resolve_eval_inputs(config, pretrained_uri,
                                                                                    reward_uri, policy_uri)
    tracking.check_tracking()
    champion = champion_input(policy)
    prompts_digest = text_digest("\n".join(prompts))
    key = run_key("eval", config, {"pretrained": pretrained.digest, "reward": reward.digest, "policy": policy.digest,
                                   "champion": champion.digest if champion else None, "prompts": prompts_digest,
                                   "oracle": labeler_identity(oracle, spec) if oracle else None})
    device, _ = resolve_runtime(config.runtime)
    tokenizer = pretrained.tokenizer
    with mlflow_run("eval", key, config, parent_run_id=parent_run_id) as run:
        log_text_dataset(run.run_id, name="eval-prompts", source_uri=source, digest=prompts_digest,
                         context="evaluation", preview="\n".join(prompts[:20]))
        client = tracking.get_client()
        client.set_tag(run.run_id, "oracle", spec or "none")
        reference = load_palm(pretrained, device).eval()
        rm = load_reward_model(reward, device)
        ac = load_policy(policy, device)
        candidates = {BASELINE: (reference, None), "ppo": (ac.palm, ac.actor_scope)}
        if champion is not None:
            champ = load_policy(champion, device)
            candidates["champion"] = (champ.palm, champ.actor_scope)
        samples, ratings = {}, {}
        for name, (palm, scope) in candidates.items():
            samples[name] = sample_policy(palm, scope, reference, rm, tokenizer, prompts, samples=max(config.n_values),
                                          max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                          seed=config.seed, device=device, label=name)
            if oracle is not None:
                N = samples[name].scores.shape[1]
                rated = rate_all(oracle, [p for p in prompts for _ in range(N)], samples[name].flat_texts)
                ratings[name] = torch.tensor(rated, dtype=torch.float32).reshape(samples[name].scores.shape)
        metrics = {}
        for name in candidates:
            metrics.update(policy_metrics(name, samples[name], samples[BASELINE], ratings.get(name),
                                          ratings.get(BASELINE), config.n_values))
        promoted = champion is None or metrics["reward_mean.ppo"] > metrics["reward_mean.champion"]
        metrics["promoted"] = float(promoted)
        table = results_table(metrics, list(candidates), config.n_values)
        run.metrics.log(0, **metrics)
        run.metrics.flush()
        log_table(run.run_id, table, "eval/results.json")
        client.log_figure(run.run_id, rating_plot(table), "plots/rating_vs_n.png")
        client.log_figure(run.run_id, length_plot(samples, config.max_new_tokens), "plots/response_lengths.png")
        log_text(run.run_id, report_text(metrics, list(candidates), spec, "oracle" if oracle else "reward model"),
                 "eval/report.md")
        log_text(run.run_id, examples_text(prompts, samples, ratings or None, config.num_examples), "eval/examples.md")
        if promoted and policy.name == POLICY_MODEL:
            promote(policy, pretrained, reward)
    return StageResult(stage="eval", checkpoint_uri=policy.checkpoint_uri, digest=policy.digest,
                       mlflow_run_id=run.run_id, model_name=policy.name, model_version=policy.version, cached=False,
                       run_key=key, metrics=metrics)


@compute_task("eval-best-of-n")
def eval_task(config: EvalConfig, pretrained: str, reward_model: str, policy: str,
              parent_run_id: str | None) -> StageResult:
    result = run_eval(config, pretrained, reward_model, policy, parent_run_id=parent_run_id)
    create_table_artifact(table_rows(result.metrics), key="palm-rlhf-eval-results",
                          description="best-of-n on held-out prompts: oracle rating (when there is an oracle) and "
                                      "reward-model score")
    return result
