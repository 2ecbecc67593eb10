"""Stage 4: evaluation. Did RLHF work, or did it game the reward?

On held-out prompts, the PPO policy is compared with what a user could do without RLHF: the pretrained policy at
eval.temperature (the baseline of every win rate) and at a few lower temperatures (eval.temperatures), and best-of-n
on the pretrained policy; and with best-of-n on the PPO policy and the current champion. For N = max(n_values)
answers per prompt (tasks/evaluation/sampling.py), best-of-n for n <= N picks among the first n the answer the reward
model scores highest. Every policy gets the oracle's rating (when there is an oracle: the simulated feedback's rater
for the built-in tasks, or eval.labeler; a user who brought feedback and no rater gets no made-up stars), the reward
model's score, its KL to the pretrained policy (measured on its own answers; for best-of-n plus the analytic bound),
its lengths, distinct-n, and its win rate against the pretrained policy, paired per prompt with a 95% interval.

The frontier plot puts quality against sqrt(KL) for best-of-n and for the PPO run's checkpoints
(tasks/evaluation/frontier.py); the alarms (tasks/evaluation/alarms.py) say when the run collapsed, ran away from the
reference or gamed the reward model, whatever the oracle says; the champion gate (tasks/evaluation/promotion.py)
promotes only a policy that beats the champion and the pretrained policy with an interval above one half, and never
a flagged one.
"""

from __future__ import annotations

import logging

import torch
from prefect.artifacts import create_table_artifact

from tasks.config import EvalConfig
from tasks.data.files import text_digest
from tasks.data.labeler import MAX_RATING, MIN_RATING, Labeler, labeler_identity, load_labeler, rate_all
from tasks.data.prompts import make_prompts, read_prompts
from tasks.data.tokens import check_prompts_fit, fit_prompts
from tasks.evaluation.alarms import Limits, first_alarm
from tasks.evaluation.arms import BASELINE, paired_win, best_of_n_metrics, point, policy_metrics, temperature_name
from tasks.evaluation.frontier import FrontierPoint, best_of_n_curve, frontier_plot
from tasks.evaluation.promotion import Evidence, decide
from tasks.evaluation.report import (comparison_table, examples_text, length_plot, rating_plot, report_text,
                                     results_table, table_rows)
from tasks.evaluation.sampling import sample_policy
from tasks.runtime.orchestration import compute_task
from tasks.runtime.stage import CHAMPION, StageResult, mlflow_run, resolve_runtime, run_key, sampling_dtype
from tasks.storage.checkpoints import list_checkpoints
from tasks.storage.inputs import (InputError, ModelInput, Upstream, check_same_base, feedback_prompts, load_palm,
                                  load_policy, load_reward_model, resolve_input)
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_table, log_text, log_text_dataset
from tasks.tracking.registry import get_alias

POLICY_MODEL = "palm-policy"
log = logging.getLogger(__name__)


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


def eval_oracle(config: EvalConfig, upstream: Upstream,
                simulated_with: str | None) -> tuple[Labeler | None, str | None]:
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


def champion_input(policy: ModelInput, pretrained: ModelInput) -> tuple[ModelInput | None, str | None]:
    """The current champion policy, when there is one other than `policy`, and a note when it cannot be compared on
    these prompts (it was made from another base model)."""
    version = get_alias(POLICY_MODEL, CHAMPION)
    if version is None or version == policy.version:
        return None, None
    champion = resolve_input(f"models:/{POLICY_MODEL}/{version}", "policy", "champion")
    try:
        check_same_base(pretrained, champion)
    except InputError:
        return None, (f"champion v{version} was made from another base model: it cannot be compared on these prompts "
                      "and reward model, so the policy is compared with the pretrained policy only")
    return champion, None


def frontier_checkpoints(policy: ModelInput, count: int) -> list[ModelInput]:
    """Up to `count` of the PPO run's checkpoints before its last, evenly spaced and the latest of them included."""
    if count == 0:
        return []
    earlier = [ref for ref in list_checkpoints(policy.checkpoint_uri.rstrip("/").rsplit("/", 1)[0])
               if ref.digest != policy.digest]
    if len(earlier) > count:
        earlier = [earlier[round((i + 1) * len(earlier) / count) - 1] for i in range(count)]
    return [resolve_input(ref.uri, "policy", "frontier") for ref in earlier]


def alarm_limits(config: EvalConfig, policy: ModelInput) -> Limits:
    budget = policy.manifest.get("budget") or {}
    return Limits(diversity=config.alarm_diversity, entropy=config.alarm_entropy,
                  same_answer=config.alarm_same_answer, kl_budget=budget.get("kl_target"),
                  kl_factor=config.alarm_kl_factor, reward_sd=config.alarm_reward_sd,
                  oracle_drop=config.alarm_oracle_drop, scale_span=MAX_RATING - MIN_RATING)


def best_temperature(config: EvalConfig, metrics: dict[str, float], judge: str) -> dict[str, float]:
    """The best of the temperature baselines (eval.temperature included) on the judge: what sampling tricks alone
    reach."""
    names = {config.temperature: BASELINE, **{t: temperature_name(t) for t in config.temperatures}}
    best = max(names, key=lambda t: metrics[f"{judge}.{names[t]}"])
    name = names[best]
    found = {"best_temperature": float(best), "reward_mean.best_temperature": metrics[f"reward_mean.{name}"],
             **{f"win_rate.best_temperature{s}": metrics[f"win_rate.{name}{s}"] for s in ("", ".ci_low", ".ci_high")}}
    if f"oracle_mean.{name}" in metrics:
        found["oracle_mean.best_temperature"] = metrics[f"oracle_mean.{name}"]
    return found


def run_eval(config: EvalConfig, pretrained_uri: str, reward_uri: str, policy_uri: str, *,
             parent_run_id: str | None = None) -> StageResult:
    pretrained, reward, policy, prompts, source, oracle, spec = resolve_eval_inputs(config, pretrained_uri,
                                                                                    reward_uri, policy_uri)
    tracking.check_tracking()
    champion, champion_note = champion_input(policy, pretrained)
    prompts_digest = text_digest("\n".join(prompts))
    key = run_key("eval", config, {"pretrained": pretrained.digest, "reward": reward.digest, "policy": policy.digest,
                                   "champion": champion.digest if champion else None, "prompts": prompts_digest,
                                   "oracle": labeler_identity(oracle, spec) if oracle else None})
    device, _ = resolve_runtime(config.runtime)
    tokenizer, norm = pretrained.tokenizer, reward.manifest.get("score_norm") or {"mean": 0.0, "std": 1.0}
    judge = "oracle_mean" if oracle is not None else "reward_mean"
    with mlflow_run("eval", key, config, parent_run_id=parent_run_id) as run:
        log_text_dataset(run.run_id, name="eval-prompts", source_uri=source, digest=prompts_digest,
                         context="evaluation", preview="\n".join(prompts[:20]))
        client = tracking.get_client()
        client.set_tag(run.run_id, "oracle", spec or "none")
        reference = load_palm(pretrained, device).eval()
        rm = load_reward_model(reward, device)

        def measure(label: str, palm, scope, temperature: float, n: int):
            samples = sample_policy(palm, scope, reference, rm, tokenizer, prompts, samples=n,
                                    max_new_tokens=config.max_new_tokens, temperature=temperature, seed=config.seed,
                                    device=device, label=label, sample_dtype=sampling_dtype(config.runtime, device))
            if oracle is None:
                return samples, None
            rated = rate_all(oracle, [p for p in prompts for _ in range(n)], samples.flat_texts)
            return samples, torch.tensor(rated, dtype=torch.float32).reshape(samples.scores.shape)

        N = max(config.n_values)
        arms = {BASELINE: measure(BASELINE, reference, None, config.temperature, N)}
        for t in config.temperatures:
            arms[temperature_name(t)] = measure(temperature_name(t), reference, None, t, config.baseline_samples)
        ac = load_policy(policy, device)
        arms["ppo"] = measure("ppo", ac.palm, ac.actor_scope, config.temperature, N)
        if champion is not None:
            champ = load_policy(champion, device)
            arms["champion"] = measure("champion", champ.palm, champ.actor_scope, config.temperature, N)
        base = arms[BASELINE]
        metrics = {}
        for name, (samples, ratings) in arms.items():
            metrics.update(policy_metrics(name, samples, ratings, *base, norm))
        for name in [n for n in (BASELINE, "ppo", "champion") if n in arms]:
            metrics.update(best_of_n_metrics(name, *arms[name], *base, config.n_values, norm))
        metrics.update(best_temperature(config, metrics, judge))
        if champion is not None:
            judged = [arms[n][1] if oracle is not None else arms[n][0].scores for n in ("ppo", "champion")]
            metrics.update(paired_win("win_rate.ppo_vs_champion", *judged))

        run_points = []  # the PPO run: its checkpoints on the same prompts, then the policy itself
        for i, checkpoint in enumerate(frontier_checkpoints(policy, config.frontier_checkpoints)):
            step = checkpoint.manifest.get("step")
            label = f"ppo_step_{step}"
            ckpt = load_policy(checkpoint, device)
            found = policy_metrics(label, *measure(label, ckpt.palm, ckpt.actor_scope, config.temperature,
                                                   config.baseline_samples), *base, norm)
            run_points.append(point(label, found, step))
            run.metrics.log(step, **{f"frontier.{k.split('.')[0]}": v for k, v in found.items()
                                     if k.split(".")[0] in FRONTIER_KEYS and k.count(".") == 1})
        run_points.append(point("ppo", metrics, policy.manifest.get("step")))
        alarm = first_alarm(run_points, point(BASELINE, metrics, None), alarm_limits(config, policy))
        metrics["hacking_flag"] = float(alarm is not None)
        for kind in ("collapse", "runaway", "hacking"):
            metrics[f"alarm.{kind}"] = float(alarm is not None and alarm.kind == kind)
        if alarm is not None:
            log.warning("evaluation: %s", alarm.message)
            client.set_tag(run.run_id, "alarm", alarm.message[:5000])

        decision = None
        if policy.name == POLICY_MODEL:
            judged = "oracle" if oracle is not None else "reward model"
            prefix = "win_rate" if oracle is not None else "reward_win_rate"
            vs_pretrained = tuple(metrics[f"{prefix}.ppo{s}"] for s in ("", ".ci_low", ".ci_high"))
            vs_champion = (tuple(metrics[f"win_rate.ppo_vs_champion{s}"] for s in ("", ".ci_low", ".ci_high"))
                           if champion is not None else None)
            evidence = Evidence(judged, vs_pretrained, vs_champion, champion.version if champion else None,
                                alarm.message if alarm else None)
            decision = decide(policy, evidence, [pretrained, reward, policy])
        metrics["promoted"] = float(decision is not None and decision.promoted)

        run.metrics.log(0, **metrics)
        run.metrics.flush()
        policies = list(arms)
        table = results_table(metrics, [n for n in (BASELINE, "ppo", "champion") if n in arms], config.n_values)
        log_table(run.run_id, table, "eval/results.json")
        log_table(run.run_id, comparison_table(metrics, policies, config.n_values), "eval/comparison.json")
        client.log_figure(run.run_id, rating_plot(table), "plots/rating_vs_n.png")
        client.log_figure(run.run_id, length_plot({n: s for n, (s, _) in arms.items()}, config.max_new_tokens),
                          "plots/response_lengths.png")
        client.log_figure(run.run_id, frontier_figure(arms, run_points, metrics, config), "plots/frontier.png")
        notes = [n for n in (champion_note, decision.line if decision else None,
                             f"ALARM: {alarm.message}" if alarm else None) if n]
        log_text(run.run_id, report_text(metrics, policies, config.n_values, spec,
                                         "oracle" if oracle else "reward model", notes), "eval/report.md")
        log_text(run.run_id, examples_text(prompts, {n: s for n, (s, _) in arms.items()},
                                           {n: r for n, (_, r) in arms.items()} if oracle else None,
                                           config.num_examples), "eval/examples.md")
    return StageResult(stage="eval", checkpoint_uri=policy.checkpoint_uri, digest=policy.digest,
                       mlflow_run_id=run.run_id, model_name=policy.name, model_version=policy.version, cached=False,
                       run_key=key, metrics=metrics)


FRONTIER_KEYS = ("reward_mean", "oracle_mean", "kl", "distinct_2", "entropy")


def frontier_figure(arms: dict, run_points: list, metrics: dict[str, float], config: EvalConfig):
    """plots/frontier.png: best-of-n on the pretrained and on the PPO policy, the PPO run from the pretrained policy
    through its checkpoints, and the temperature baselines as single points."""
    start = FrontierPoint(BASELINE, metrics[f"kl.{BASELINE}"], metrics[f"reward_mean.{BASELINE}"],
                          metrics.get(f"oracle_mean.{BASELINE}"))
    lines = {"best-of-n, pretrained": best_of_n_curve(BASELINE, arms[BASELINE][0].scores, arms[BASELINE][0].kl,
                                                      arms[BASELINE][1]),
             "PPO training": [start] + [FrontierPoint(p.label, p.kl, p.reward, p.oracle) for p in run_points],
             "best-of-n, PPO": best_of_n_curve("ppo", arms["ppo"][0].scores, arms["ppo"][0].kl, arms["ppo"][1])}
    marks = [FrontierPoint(f"T = {t:g}", metrics[f"kl.{temperature_name(t)}"],
                           metrics[f"reward_mean.{temperature_name(t)}"],
                           metrics.get(f"oracle_mean.{temperature_name(t)}")) for t in config.temperatures]
    return frontier_plot(lines, marks)


@compute_task("eval-best-of-n")
def eval_task(config: EvalConfig, pretrained: str, reward_model: str, policy: str,
              parent_run_id: str | None) -> StageResult:
    result = run_eval(config, pretrained, reward_model, policy, parent_run_id=parent_run_id)
    create_table_artifact(table_rows(result.metrics), key="palm-rlhf-eval-results",
                          description="held-out prompts: the PPO policy against the pretrained one at several "
                                      "temperatures and best-of-n; oracle rating (when there is an oracle), "
                                      "reward-model score, KL, length, diversity, win rate against the pretrained "
                                      "policy [95% CI]")
    return result
