"""Stage 3: PPO of the pretrained policy against the fitted reward model.

The reference policy of the per-token KL penalty is the pretrained model itself, frozen. Reward-model scores are
standardised with the mean and spread the reward stage measured on its training responses, so `kl_coef` means the
same thing whatever scale the reward head happened to learn.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.rlhf import RLHFTrainer
from models.training import capture_rng, restore_rng
from tasks.config import PPOConfig
from tasks.data.files import text_digest
from tasks.data.prompts import make_prompts, read_prompts
from tasks.data.tokens import check_prompts_fit, encode_prompts, fit_prompts, never_sampled
from tasks.evaluation.alarms import Limits, Watch
from tasks.evaluation.metrics import distinct_n, top_answer_share
from tasks.evaluation.sampling import answer_ids
from tasks.runtime import parallel
from tasks.runtime.loop import Throughput, check_finite, optimizer_state, optimizer_state_dict, train
from tasks.runtime.orchestration import compute_task
from tasks.runtime.stage import StageResult, StageRun, resolve_runtime, sampling_dtype, stage_run
from tasks.storage.checkpoints import Checkpoint, CheckpointRef
from tasks.storage.inputs import (TOKENIZER_FILE, ModelInput, Upstream, check_same_base, feedback_prompts, load_palm,
                                  load_reward_model, resolve_input)
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_curves, log_text_dataset
from tasks.tracking.samples import log_samples

MODEL_NAME = "palm-policy"
log = logging.getLogger(__name__)


class StandardisedReward(nn.Module):
    """(score - mean) / std of a reward model, with the statistics stored in its checkpoint, held within +-`bound`
    standard deviations (None: unbounded): past the responses it was fitted on the reward model is guessing, and a
    policy paid for reaching there learns to game it. Each call keeps its unbounded mean (`last_unbounded`) for the
    run's alarms."""

    def __init__(self, reward_model: nn.Module, mean: float, std: float, bound: float | None = None):
        super().__init__()
        self.reward_model, self.mean, self.std, self.bound = reward_model, mean, std, bound
        self.last_unbounded = float("nan")

    @property
    def dense(self) -> bool:
        return getattr(self.reward_model, "dense", False)

    def score(self, x, mask=None, prompt_mask=None):
        score = (self.reward_model.score(x, mask=mask, prompt_mask=prompt_mask) - self.mean) / self.std
        self.last_unbounded = float(score.float().mean())
        return score if self.bound is None else score.clamp(-self.bound, self.bound)

    def token_rewards(self, x, mask=None, prompt_mask=None):
        """Per-token shares of the standardised score: each row sums to score() (bounded: the shares scaled
        together)."""
        shares = self.reward_model.token_rewards(x, mask=mask, prompt_mask=prompt_mask, baseline=self.mean) / self.std
        total = shares.sum(-1, keepdim=True)
        self.last_unbounded = float(total.float().mean())
        if self.bound is None:
            return shares
        bounded = total.clamp(-self.bound, self.bound)
        return torch.where(total.abs() > self.bound, shares * (bounded / total), shares)


def load_standardised_reward(reward: ModelInput, device, bound: float | None = None) -> StandardisedReward:
    norm = reward.manifest.get("score_norm") or {"mean": 0.0, "std": 1.0}
    return StandardisedReward(load_reward_model(reward, device), norm["mean"], norm["std"], bound)


def policy_model_config(pretrained: ModelInput, config: PPOConfig) -> dict:
    return {"palm": pretrained.palm_config, "actor_lora": config.actor_lora, "critic_lora": True,
            "lora_r": config.lora_r}


def make_trainer(config: PPOConfig, pretrained: ModelInput, reward: ModelInput, device) -> RLHFTrainer:
    torch.manual_seed(config.seed)  # the LoRA initialisation
    trainer = RLHFTrainer(palm=load_palm(pretrained, "cpu"),
                          reward_model=load_standardised_reward(reward, "cpu", config.reward_bound),
                          actor_lr=config.actor_lr, critic_lr=config.critic_lr, actor_lora=config.actor_lora,
                          critic_lora=True, lora_r=config.lora_r, ppo=config.algorithm, seed=config.seed,
                          pad_value=pretrained.tokenizer.pad_id,
                          suppress_tokens=never_sampled(pretrained.tokenizer, pretrained.palm_config["num_tokens"]),
                          sample_dtype=sampling_dtype(config.runtime, torch.device(device)))
    return trainer.to(device)


@torch.no_grad()
def check_policy_finite(trainer: RLHFTrainer, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """An update that blew up the weights shows here, before a checkpoint keeps it, rather than as a sampling error
    on the next rollout: the policy's logits on the prompts it just trained on must be finite."""
    logits = trainer.actor_critic.policy_logits(ids, mask)
    if not torch.isfinite(logits[mask]).all():
        raise FloatingPointError("the policy's logits are no longer finite after this step's update")


def ppo_step(trainer: RLHFTrainer, ids: torch.Tensor, mask: torch.Tensor, config: PPOConfig,
             averager: parallel.GradientAverager | None, eos_token: int):
    """One PPO iteration: (its statistics, its rollouts). Across ranks, each samples and scores its share of the
    rollouts from its own stream, the KL controller moves on the mean KL over all of them, and the update averages
    gradients (`averager`), so every rank applies the same update. Not the one-process numbers: advantages are
    whitened per rank, and the samples differ."""
    if averager is None:
        exp, stats = trainer.rollout(ids, mask, config.max_new_tokens, temperature=config.temperature,
                                     eos_token=eos_token)
        return {**stats, **trainer.learn([exp], config.minibatch_size)}, exp
    seed = int(torch.randint(0, 2**62, (1,), generator=trainer.data_generator))  # a stream saved with checkpoints
    trainer.generators()["sample"].manual_seed(seed + parallel.rank())
    kl_before = trainer.kl.state_dict()
    exp, stats = trainer.rollout(ids, mask, config.max_new_tokens, temperature=config.temperature, eos_token=eos_token)
    stats = parallel.mean(stats)
    trainer.kl.load_state_dict(kl_before)  # rollout() moved it on this rank's KL alone
    trainer.kl.update(stats["kl"], config.rollout_batch)
    learned = trainer.learn([exp], config.minibatch_size // parallel.world())
    averager.check()
    return {**stats, **parallel.mean(learned)}, exp


def budget(config: PPOConfig) -> dict:
    """What keeps the policy where the reward model knows the ground, as the run records it (the evaluation's
    runaway alarm reads it): the KL target per answer when the coefficient adapts, and the reward bound."""
    algorithm = config.algorithm
    return {"kl_target": algorithm.kl_target if algorithm.adaptive_kl else None, "reward_bound": config.reward_bound,
            "max_new_tokens": config.max_new_tokens}


def watch_limits(config: PPOConfig) -> Limits:
    return Limits(kl_budget=budget(config)["kl_target"],
                  reward_sd=None if config.reward_bound is None else config.reward_bound + 1.0)


class PPOTraining:
    """One step is one PPO iteration: a batch of rollouts from the training prompts, scored and KL-penalised, then
    `algorithm.ppo_epochs` passes of clipped updates. A checkpoint holds the actor-critic's weights, the optimiser,
    the KL controller and the prompt and sampling streams, and is taken between iterations: no experience is in
    flight."""

    shown = ("reward", "kl")
    may_be_nan = frozenset()

    def __init__(self, config: PPOConfig, pretrained: ModelInput, reward: ModelInput, prompts: list[str],
                 prompts_digest: str):
        self.config, self.pretrained, self.reward = config, pretrained, reward
        self.prompts, self.prompts_digest = prompts, prompts_digest
        self.tokenizer = pretrained.tokenizer
        self.steps, self.checkpoint_every = config.steps, config.checkpoint_every

    def start(self, run: StageRun, resumed: Checkpoint | None) -> None:
        self.device = run.device
        self.trainer = make_trainer(self.config, self.pretrained, self.reward, run.device)
        self.averager = None
        if parallel.active():
            self.averager = parallel.GradientAverager(p for g in self.trainer.optimizer.param_groups
                                                      for p in g["params"])
        if resumed is not None:
            self.trainer.actor_critic.load_state_dict(resumed.weights)
            self.trainer.optimizer.load_state_dict(optimizer_state_dict(resumed.state))
            self.trainer.kl.load_state_dict(resumed.state["kl"])
            restore_rng(resumed.state, self.trainer.generators())
        self.watch = Watch(watch_limits(self.config), log)
        if resumed is not None and "watch" in resumed.state:
            self.watch.load_state_dict(resumed.state["watch"])
        self.clock = Throughput()

    def describe(self, step: int) -> str:
        return f"actor_lr {self.config.actor_lr:.3g}"

    def step(self, step: int) -> dict[str, float]:
        cfg = self.config
        idx = torch.randint(0, len(self.prompts), (cfg.rollout_batch,), generator=self.trainer.data_generator)
        ids, mask = encode_prompts([self.prompts[i] for i in parallel.shard(idx).tolist()], self.tokenizer)
        ids, mask = ids.to(self.device), mask.to(self.device)
        stats, exp = ppo_step(self.trainer, ids, mask, cfg, self.averager, self.tokenizer.eos_id)
        check_finite(stats)  # a number that went wrong says so before the weights it came from are looked at
        check_policy_finite(self.trainer, ids, mask)
        stats.update(self.signals(step, stats, exp))
        return {**stats, "tokens_per_s": self.clock.rate(stats["response_length"] * cfg.rollout_batch)}

    def signals(self, step: int, stats: dict[str, float], exp) -> dict[str, float]:
        """The rollouts' diversity and the reward model's unbounded score, and the alarms on them."""
        T = exp.num_actions
        answers = answer_ids(exp.sequences[:, -T:].cpu(), exp.action_mask.cpu(), self.tokenizer.eos_id)
        found = {"distinct_2": distinct_n(answers, 2), "same_answer": top_answer_share([[str(a) for a in answers]]),
                 "reward_unbounded": self.trainer.reward_model.last_unbounded}
        found.update(self.watch.check(step, stats["kl"], found["reward_unbounded"], found["distinct_2"],
                                      stats["entropy"], found["same_answer"]))
        return found

    def checkpoint(self) -> dict:
        trainer, pretrained, reward = self.trainer, self.pretrained, self.reward
        state = {**optimizer_state(trainer.optimizer), **capture_rng(trainer.generators()),
                 "kl": trainer.kl.state_dict(), "watch": self.watch.state_dict()}
        return dict(weights=trainer.actor_critic.state_dict(), state=state, kind="policy",
                    model_config=policy_model_config(pretrained, self.config),
                    parents=[{"uri": pretrained.checkpoint_uri, "digest": pretrained.digest},
                             {"uri": reward.checkpoint_uri, "digest": reward.digest}],
                    data={"prompts": self.prompts_digest},
                    extra={"reference_policy": {"uri": pretrained.checkpoint_uri, "digest": pretrained.digest},
                           # the reward model a served policy bundles for best-of-n
                           "reward_model": {"uri": reward.checkpoint_uri, "digest": reward.digest},
                           "budget": budget(self.config),
                           "tokenizer": pretrained.manifest["tokenizer"]},
                    files={TOKENIZER_FILE: self.tokenizer.to_file()})

    def report(self, run: StageRun, ref: CheckpointRef, metrics: dict[str, float]) -> dict[str, float]:
        log_curves(run.run_id, run.metrics.history, ["reward", "kl"], "PPO: reward and KL to the reference",
                   "plots/ppo.png")
        ac = self.trainer.actor_critic
        log_samples(run.run_id, ac.palm, self.tokenizer, scope=ac.actor_scope, device=run.device,
                    max_new_tokens=self.config.max_new_tokens, prompts=self.prompts[:4], seed=self.config.seed)
        return {k: metrics[k] for k in ("reward", "kl", "kl_per_token", "entropy", "response_length", "distinct_2",
                                        "reward_unbounded", "alarm", "kl_coef") if k in metrics}


def load_ppo_prompts(config: PPOConfig, upstream: Upstream, reward: ModelInput | None,
                     from_feedback: bool = False) -> tuple[list[str], str] | None:
    """The training prompts and where they came from: ppo.prompts; else the training prompts of the feedback the
    reward model was fitted on; else (simulated feedback: the built-in demo) prompts cut from the corpus. Before the
    reward model exists (`reward` None) prompts that will come from its feedback (`from_feedback`) are None: that
    feedback is checked by the reward stage's own checks."""
    if config.prompts:
        return read_prompts(config.prompts), config.prompts
    prompts = feedback_prompts(reward, "train") if reward is not None else None
    if prompts is not None:  # a prompt with no room to answer keeps its end, as in the reward model's rows
        fitted, _ = fit_prompts(prompts, upstream.tokenizer, upstream.context, config.max_new_tokens)
        return fitted, "feedback:train-prompts"
    if reward is None and from_feedback:
        return None
    sample, _ = upstream.corpus
    return (make_prompts(sample, config.num_prompts, config.prompt_chars, split="train", seed=config.seed),
            "corpus:train-prompts")


def check_files(config: PPOConfig, upstream: Upstream, reward: ModelInput | None = None,
                from_feedback: bool = False) -> tuple[list[str], str] | None:
    """The stage's prompts, against the policy's base model (`upstream`: a checkpoint's, or the one a pipeline is
    about to pretrain): read, and each fits its context with the tokens to generate."""
    found = load_ppo_prompts(config, upstream, reward, from_feedback)
    if found is not None:
        check_prompts_fit(found[0], upstream.tokenizer, upstream.context, config.max_new_tokens, "ppo.prompts")
    return found


def check_inputs(config: PPOConfig, pretrained_uri: str,
                 reward_uri: str) -> tuple[ModelInput, ModelInput, list[str], str]:
    """Every check on the stage's inputs, before any compute: both models, the device, and the prompts (and where
    they came from)."""
    pretrained = resolve_input(pretrained_uri, "palm", "--pretrained")
    reward = resolve_input(reward_uri, "reward", "--reward-model")
    check_same_base(pretrained, reward)
    resolve_runtime(config.runtime)
    prompts, source = check_files(config, Upstream.of(pretrained), reward)
    return pretrained, reward, prompts, source


def run_ppo(config: PPOConfig, pretrained_uri: str, reward_uri: str, *,
            parent_run_id: str | None = None) -> StageResult:
    """Check inputs, then train (or reuse, or resume) `palm-policy`; a new version becomes `candidate`."""
    pretrained, reward, prompts, source = check_inputs(config, pretrained_uri, reward_uri)
    prompts_digest = text_digest("\n".join(prompts))
    tracking.check_tracking()

    def log_inputs(run_id: str) -> None:
        log_text_dataset(run_id, name="ppo-prompts", source_uri=source,
                         digest=prompts_digest, context="training", preview="\n".join(prompts[:20]))

    lineage = {"parent.pretrained": pretrained.ref, "parent.reward": reward.ref, "data.prompts": prompts_digest}
    with stage_run("ppo", config, inputs={"pretrained": pretrained.digest, "reward": reward.digest,
                                          "prompts": prompts_digest},
                   model_name=MODEL_NAME, lineage=lineage, parent_run_id=parent_run_id, log_inputs=log_inputs) as run:
        if not run.cached:
            run.trained(*train(run, PPOTraining(config, pretrained, reward, prompts, prompts_digest)))
    return run.result


@compute_task("ppo-train")
def ppo_task(config: PPOConfig, pretrained: str, reward_model: str, parent_run_id: str | None) -> StageResult:
    return run_ppo(config, pretrained, reward_model, parent_run_id=parent_run_id)
