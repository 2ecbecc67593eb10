"""Did RLHF work, or did it game the reward: the win rate's interval, the alarms and the champion gate.

The interval is checked against a computation written out by hand; the alarms against runs a rigged rater exploits (a
policy that learns to repeat itself) and against a healthy one; the gate against a candidate that beats the champion
only on the proxy, and against two evaluations deciding at the same moment.
"""

from __future__ import annotations

import math
import re
import threading

import pytest
import torch

from tasks.evaluation.alarms import Limits, Point, Watch, first_alarm
from tasks.evaluation.metrics import best_of_n_kl_bound, prompt_win_rates, top_answer_share, win_rate

# ---------------------------------------------------------------- the win rate and its interval


def test_win_rate_and_its_interval_match_a_computation_by_hand():
    # 5 prompts, 2 policy answers and 3 baseline answers each
    policy = torch.tensor([[3., 5.], [1., 1.], [4., 2.], [5., 5.], [2., 3.]])
    baseline = torch.tensor([[3., 1., 2.], [2., 2., 1.], [4., 4., 4.], [1., 2., 3.], [3., 3., 3.]])
    per_prompt = []
    for a, b in zip(policy.tolist(), baseline.tolist()):
        wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)
        per_prompt.append(wins / (len(a) * len(b)))
    assert prompt_win_rates(policy, baseline).tolist() == pytest.approx(per_prompt)
    mean = sum(per_prompt) / 5
    sd = math.sqrt(sum((w - mean) ** 2 for w in per_prompt) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # Student's t, 4 degrees of freedom, 97.5th percentile
    rate, low, high = win_rate(policy, baseline)
    assert (rate, low, high) == pytest.approx((mean, max(mean - half, 0.0), min(mean + half, 1.0)))
    assert low < rate < high


def test_one_prompt_has_no_interval_and_a_policy_against_itself_wins_half():
    rate, low, high = win_rate(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0]]))
    assert rate == 1.0 and math.isnan(low) and math.isnan(high)
    same = torch.arange(12.0).reshape(4, 3)
    assert win_rate(same, same)[0] == pytest.approx(0.5)


def test_best_of_n_kl_bound_and_top_answer_share():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    assert top_answer_share([["a", "b"], ["a", "c"], ["a", "a"]]) == pytest.approx(4 / 6)


# ---------------------------------------------------------------- the alarms, on measured points


def at(step, kl=1.0, reward=0.0, sd=0.0, oracle=3.0, distinct=0.8, entropy=1.5, same=0.02) -> Point:
    return Point(f"ppo_step_{step}", step, kl, reward, sd, oracle, distinct, entropy, same)


BASE = Point("pretrained", None, 0.0, 0.0, 0.0, 3.0, 0.8, 1.5, 0.02)


def test_a_healthy_run_raises_no_alarm():
    run = [at(20, kl=1, reward=0.1, oracle=3.2), at(40, kl=2, reward=0.2, oracle=3.4), at(60, kl=3, reward=0.3,
                                                                                     oracle=3.5)]
    assert first_alarm(run, BASE, Limits(kl_budget=6.0)) is None


def test_reward_up_while_the_oracle_falls_is_hacking_from_the_step_it_started():
    run = [at(20, kl=1, reward=0.1, oracle=3.6), at(40, kl=3, reward=0.3, oracle=3.4),
           at(60, kl=5, reward=0.5, oracle=2.9)]
    alarm = first_alarm(run, BASE, Limits())
    assert alarm.kind == "hacking" and alarm.step == 60 and alarm.kl == 5
    assert "from step 60 (KL 5.00 nats per answer)" in alarm.message and "fell 0.70" in alarm.message
    # the same run without an oracle cannot show hacking, and says nothing it cannot know
    assert first_alarm([at(p.step, kl=p.kl, reward=p.reward, oracle=None) for p in run], BASE, Limits()) is None


@pytest.mark.parametrize("change, kind, says", [
    (dict(distinct=0.3), "collapse", "distinct-2 fell to 0.30"),
    (dict(entropy=0.2), "collapse", "entropy fell to 0.200"),
    (dict(same=0.5), "collapse", "one answer is 50% of all answers"),
    (dict(kl=13.0), "runaway", "past 2x the budget of 6"),
    (dict(sd=18.0), "runaway", "18.0 standard deviations"),
])
def test_collapse_and_runaway_fire_whatever_the_oracle_says(change, kind, says):
    run = [at(20), at(40, **{"oracle": 4.9, **change}), at(60, **{"oracle": 5.0, **change})]
    alarm = first_alarm(run, BASE, Limits(kl_budget=6.0))
    assert alarm.kind == kind and alarm.step == 40 and says in alarm.message


def test_ppo_warns_once_per_kind_and_keeps_the_alarm_metric(caplog):
    import logging

    watch = Watch(Limits(kl_budget=6.0), logging.getLogger("test.watch"))
    with caplog.at_level(logging.WARNING, logger="test.watch"):
        assert watch.check(1, kl=0.5, standardised=0.1, distinct_2=0.9, entropy=1.4, same_answer=0.0) == {"alarm": 0}
        assert watch.check(2, kl=1.0, standardised=0.2, distinct_2=0.2, entropy=1.3, same_answer=0.0) == {"alarm": 1}
        assert watch.check(3, kl=1.0, standardised=0.2, distinct_2=0.1, entropy=1.3, same_answer=0.0) == {"alarm": 1}
        assert watch.check(4, kl=20.0, standardised=0.2, distinct_2=0.9, entropy=1.3, same_answer=0.0) == {"alarm": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("PPO step 2: collapse") and lines[1].startswith("PPO step 4: runaway")
    again = Watch(Limits(kl_budget=6.0), logging.getLogger("test.watch"))
    again.load_state_dict(watch.state_dict())  # a resumed run keeps its start and what it already said
    assert again.start == {"distinct_2": 0.9, "entropy": 1.4} and again.warned == {"collapse", "runaway"}


# ---------------------------------------------------------------- the champion gate, on a real registry


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A local tracking store with three registered versions of palm-policy."""
    monkeypatch.setenv("PALM_RLHF_HOME", str(tmp_path / "home"))
    for var in ("PALM_RLHF_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_EXPERIMENT"):
        monkeypatch.delenv(var, raising=False)
    from tasks.tracking import client as tracking

    client = tracking.get_client()
    client.create_registered_model("palm-policy")
    for _ in range(3):
        client.create_model_version("palm-policy", str(tmp_path / "weights"))
    return client


def policy(version: str):
    from tasks.storage.inputs import ModelInput

    return ModelInput(f"models:/palm-policy/{version}", f"file:///ckpt/{version}", f"sha256:{version}", {},
                      "palm-policy", version)


def test_a_candidate_that_beats_the_champion_only_on_the_proxy_is_kept(registry):
    from tasks.evaluation.promotion import Evidence, decide
    from tasks.tracking.registry import get_alias, set_alias

    set_alias("palm-policy", "champion", "1")
    # the reward model (the proxy PPO optimised) would say 0.9; the oracle, which decides, says the champion holds
    evidence = Evidence("oracle", vs_pretrained=(0.70, 0.62, 0.78), vs_champion=(0.53, 0.46, 0.60),
                        champion_version="1", alarm=None)
    decision = decide(policy("2"), evidence, [policy("2")])
    assert not decision.promoted and get_alias("palm-policy", "champion") == "1"
    tags = registry.get_model_version("palm-policy", "2").tags
    assert tags["promotion.decision"] == "kept" and tags["promotion.judge"] == "oracle"
    assert tags["promotion.champion_compared"] == "1" and tags["promotion.interval_vs_champion"] == "[0.4600, 0.6000]"
    assert "does not beat champion v1 on the oracle" in tags["promotion.reason"]
    assert decision.line.startswith("kept the champion (v1)")


def test_a_flagged_policy_is_never_promoted_and_a_clear_winner_is(registry):
    from tasks.evaluation.promotion import Evidence, decide
    from tasks.tracking.registry import get_alias

    flagged = Evidence("oracle", (0.95, 0.9, 1.0), None, None, alarm="collapse from step 40 (...)")
    assert not decide(policy("2"), flagged, [policy("2")]).promoted
    assert get_alias("palm-policy", "champion") is None
    clear = Evidence("reward model", (0.8, 0.7, 0.9), None, None, alarm=None)
    decision = decide(policy("3"), clear, [policy("3")])
    assert decision.promoted and get_alias("palm-policy", "champion") == "3"
    tags = registry.get_model_version("palm-policy", "3").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.replaced"] == "none"


def test_two_evaluations_deciding_at_once_leave_one_champion(registry):
    from tasks.evaluation.promotion import Evidence, decide
    from tasks.tracking.registry import get_alias

    # both compared against no champion, and both would win: under the lease, the second sees the first's champion
    evidence = Evidence("oracle", (0.8, 0.7, 0.9), None, None, alarm=None)
    start, decisions = threading.Barrier(2), {}

    def evaluate(version: str) -> None:
        start.wait()
        decisions[version] = decide(policy(version), evidence, [policy(version)])

    threads = [threading.Thread(target=evaluate, args=(v,)) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    promoted = [v for v, d in decisions.items() if d.promoted]
    assert len(promoted) == 1 and get_alias("palm-policy", "champion") == promoted[0]
    kept = next(d for d in decisions.values() if not d.promoted)
    assert "champion moved to v" + promoted[0] in kept.line


# ---------------------------------------------------------------- a policy that games a rigged rater


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rigged, steps", [("tests.flows.raters:Repetition", 12),
                                           ("tests.flows.raters:RepeatedWord", 16)])
def test_a_policy_that_games_a_rigged_rater_is_flagged_and_never_promoted(rigged, steps, tmp_path, monkeypatch):
    """The rater pays for repeating one character, or one word; with PPO's budget switched off and a fast learner, the
    policy collapses onto it. The oracle (the same rigged rater) loves the result; the alarm fires all the same, PPO
    warned while it ran, and the gate keeps the policy out."""
    from tasks.config import apply_overrides, tiny
    from tasks.evaluate import run_eval
    from tasks.ppo import run_ppo
    from tasks.pretrain import run_pretrain
    from tasks.reward import run_reward
    from tasks.tracking.registry import get_alias

    monkeypatch.setenv("PALM_RLHF_HOME", str(tmp_path / "home"))
    for var in ("PALM_RLHF_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_EXPERIMENT"):
        monkeypatch.delenv(var, raising=False)
    config = apply_overrides(tiny(), [
        f"reward.labeler={rigged}", f"eval.labeler={rigged}", "reward.steps=8", "ppo.actor_lora=false",
        "ppo.actor_lr=2e-2", "ppo.ppo_epochs=4", "ppo.rollout_batch=8", f"ppo.steps={steps}", "ppo.checkpoint_every=4",
        "ppo.kl_coef=0", "ppo.adaptive_kl=false", "ppo.reward_bound=null", "eval.n_values=[1,4]",
        "eval.baseline_samples=2"])
    pretrained = run_pretrain(config.pretrain)
    reward = run_reward(config.reward, pretrained.checkpoint_uri)
    ppo = run_ppo(config.ppo, pretrained.checkpoint_uri, reward.checkpoint_uri)
    from tasks.tracking import client as tracking

    client = tracking.get_client()
    alarms = {m.step: m.value for m in client.get_metric_history(ppo.mlflow_run_id, "alarm")}
    fired = [step for step, value in sorted(alarms.items()) if value == 1.0]
    hist = {k: [round(m.value, 3) for m in client.get_metric_history(ppo.mlflow_run_id, k)]
            for k in ("distinct_2", "entropy", "same_answer", "kl", "reward")}
    assert alarms[1] == 0.0 and fired and fired[0] < max(alarms), (alarms, hist)  # PPO saw it as it happened
    result = run_eval(config.eval, pretrained.checkpoint_uri, reward.checkpoint_uri,
                      f"models:/palm-policy/{ppo.model_version}")
    m = result.metrics
    assert m["oracle_mean.ppo"] > m["oracle_mean.pretrained"], m  # the gamed rater prefers it
    alarm = client.get_run(result.mlflow_run_id).data.tags["alarm"]
    assert m["hacking_flag"] == 1.0 and sum(m[f"alarm.{k}"] for k in ("collapse", "runaway", "hacking")) == 1.0, alarm
    assert m["promoted"] == 0.0 and get_alias("palm-policy", "champion") is None
    assert re.match(r"(collapse|runaway|reward hacking) from step \d+ \(KL [\d.]+ nats per answer\): ", alarm), alarm
    tags = client.get_model_version("palm-policy", ppo.model_version).tags
    assert tags["promotion.decision"] == "kept" and tags["promotion.reason"].startswith(f"flagged: {alarm}")
