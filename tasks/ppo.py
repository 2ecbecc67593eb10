"""Stage 3: PPO of the pretrained policy against the fitted reward model.

The reference policy of the per-token KL penalty is the pretrained model itself, frozen. Reward-model scores are
standardised with the mean and spread the reward stage measured on its training responses, so `kl_coef` means the
same thing whatever scale the reward head happened to learn.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from models.ppo import PPOConfig as PPOHyperparameters
from models.rlhf import RLHFTrainer
from models.training import capture_rng, finite_or_raise, restore_rng
from tasks import distributed, tracking
from tasks.config import PPOConfig
from tasks.data import read_prompts, text_digest
from tasks.inputs import ModelInput, check_same_base, load_palm, load_reward_model, resolve_input, training_corpus
from tasks.progress import progress_bar
from tasks.samples import log_samples
from tasks.stage import StageResult, StageRun, Throughput, log_curves, resolve_runtime
from tasks.store import CheckpointRef, load_checkpoint, save_checkpoint
from tasks.tokens import check_prompts_fit, encode_prompts

MODEL_NAME = "palm-policy"


class StandardisedReward(nn.Module):
    """(score - mean) / std of a reward model, with the statistics stored in its checkpoint."""

    def __init__(self, reward_model: nn.Module, mean: float, std: float):
        super().__init__()
        self.reward_model, self.mean, self.std = reward_model, mean, std

    @property
    def dense(self) -> bool:
        return getattr(self.reward_model, "dense", False)

    def score(self, x, mask=None, prompt_mask=None):
        return (self.reward_model.score(x, mask=mask, prompt_mask=prompt_mask) - self.mean) / self.std

    def token_rewards(self, x, mask=None, prompt_mask=None):
        """Per-token shares of the standardised score: each row sums to score()."""
        return self.reward_model.token_rewards(x, mask=mask, prompt_mask=prompt_mask, baseline=self.mean) / self.std


def load_standardised_reward(reward: ModelInput, device) -> StandardisedReward:
    norm = reward.manifest.get("score_norm") or {"mean": 0.0, "std": 1.0}
    return StandardisedReward(load_reward_model(reward, device), norm["mean"], norm["std"])


def policy_model_config(pretrained: ModelInput, config: PPOConfig) -> dict:
    return {"palm": pretrained.palm_config, "actor_lora": config.actor_lora, "critic_lora": True,
            "lora_r": config.lora_r}


def make_trainer(config: PPOConfig, pretrained: ModelInput, reward: ModelInput, device) -> RLHFTrainer:
    hp = PPOHyperparameters(
        gamma=config.gamma, lam=config.lam, clip_eps=config.clip_eps, value_clip_eps=config.value_clip_eps,
        value_coef=config.value_coef, entropy_coef=config.entropy_coef, kl_coef=config.kl_coef,
        adaptive_kl=config.adaptive_kl, kl_target=config.kl_target, kl_horizon=config.kl_horizon,
        ppo_epochs=config.ppo_epochs, max_grad_norm=config.max_grad_norm, dense_rewards=config.dense_rewards)
    torch.manual_seed(config.seed)  # the LoRA initialisation
    trainer = RLHFTrainer(palm=load_palm(pretrained, "cpu"), reward_model=load_standardised_reward(reward, "cpu"),
                          actor_lr=config.actor_lr, critic_lr=config.critic_lr, actor_lora=config.actor_lora,
                          critic_lora=True, lora_r=config.lora_r, ppo=hp, seed=config.seed)
    return trainer.to(device)


@torch.no_grad()
def check_policy_finite(trainer: RLHFTrainer, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """An update that blew up the weights shows here, before a checkpoint keeps it, rather than as a sampling error
    on the next rollout: the policy's logits on the prompts it just trained on must be finite."""
    logits = trainer.actor_critic.policy_logits(ids, mask)
    if not torch.isfinite(logits[mask]).all():
        raise FloatingPointError("the policy's logits are no longer finite after this step's update")


def ppo_step(trainer: RLHFTrainer, ids: torch.Tensor, mask: torch.Tensor, config: PPOConfig,
             averager: distributed.GradientAverager | None) -> dict[str, float]:
    """One PPO iteration. Across ranks, each samples and scores its share of the rollouts from its own stream, the
    KL controller moves on the mean KL over all of them, and the update averages gradients (`averager`), so every
    rank applies the same update. Not the one-process numbers: advantages are whitened per rank, and the samples
    differ."""
    if averager is None:
        return trainer.step(ids, mask, config.max_new_tokens, minibatch_size=config.minibatch_size,
                            temperature=config.temperature)
    seed = int(torch.randint(0, 2**62, (1,), generator=trainer.data_generator))  # a stream saved with checkpoints
    trainer.generators()["sample"].manual_seed(seed + distributed.rank())
    kl_before = trainer.kl.state_dict()
    exp, stats = trainer.rollout(ids, mask, config.max_new_tokens, temperature=config.temperature)
    stats = distributed.mean(stats)
    trainer.kl.load_state_dict(kl_before)  # rollout() moved it on this rank's KL alone
    trainer.kl.update(stats["kl"], config.rollout_batch)
    learned = trainer.learn([exp], config.minibatch_size // distributed.world())
    averager.check()
    return {**stats, **distributed.mean(learned)}


def train(run: StageRun, config: PPOConfig, pretrained: ModelInput, reward: ModelInput, prompts: list[str],
          prompts_digest: str) -> tuple[CheckpointRef, dict[str, float]]:
    trainer = make_trainer(config, pretrained, reward, run.device)
    averager = None
    if distributed.active():
        averager = distributed.GradientAverager(p for g in trainer.optimizer.param_groups for p in g["params"])
    start = 0
    if run.resume_from is not None:
        ckpt = load_checkpoint(run.resume_from.uri)
        trainer.actor_critic.load_state_dict(ckpt.weights)
        trainer.optimizer.load_state_dict(ckpt.state["optimizer"])
        trainer.kl.load_state_dict(ckpt.state["kl"])
        restore_rng(ckpt.state["rng"], trainer.generators())
        start = ckpt.ref.step

    parents = [{"uri": pretrained.checkpoint_uri, "digest": pretrained.digest},
               {"uri": reward.checkpoint_uri, "digest": reward.digest}]
    clock, ref, metrics = Throughput(), run.resume_from, {}
    with progress_bar("ppo", config.steps, start) as show:
        for step in range(start, config.steps):
            idx = torch.randint(0, len(prompts), (config.rollout_batch,), generator=trainer.data_generator)
            ids, mask = encode_prompts([prompts[i] for i in distributed.shard(idx).tolist()])
            done = step + 1
            try:  # a non-finite number stops the stage before it is logged or checkpointed
                stats = ppo_step(trainer, ids.to(run.device), mask.to(run.device), config, averager)
                for name, value in stats.items():
                    finite_or_raise(name, value)
                check_policy_finite(trainer, ids.to(run.device), mask.to(run.device))
            except FloatingPointError as err:
                kept = (f"the last good checkpoint, step {ref.step}, is kept: {ref.uri}" if ref
                        else "no checkpoint was written")
                raise FloatingPointError(f"ppo stopped at step {done} (actor_lr {config.actor_lr:.3g}): {err}; "
                                         f"{kept}") from None
            metrics = {**stats, "tokens_per_s": clock.rate(stats["response_length"] * config.rollout_batch)}
            run.metrics.log(done, **metrics)
            show(done, reward=stats["reward"], kl=stats["kl"])
            if done % config.checkpoint_every == 0 or done == config.steps:
                run.metrics.flush()  # the curve up to a checkpoint outlives a crash; a resume logs only later steps
                if distributed.is_main():
                    ref = save_checkpoint(
                        run.prefix, done, trainer.actor_critic.state_dict(), kind="policy",
                        model_config=policy_model_config(pretrained, config),
                        stage_config=config.model_dump(mode="json"), parents=parents, data={"prompts": prompts_digest},
                        extra={"reference_policy": {"uri": pretrained.checkpoint_uri, "digest": pretrained.digest},
                               "metrics": {k: v for k, v in metrics.items() if k != "tokens_per_s"}},
                        state={"optimizer": trainer.optimizer.state_dict(), "kl": trainer.kl.state_dict(),
                               "rng": capture_rng(trainer.generators())})
                distributed.barrier()
    run.metrics.flush()
    if not distributed.is_main():  # rank 0 reports; the stage returns its result
        return ref, {}
    log_curves(run, ["reward", "kl"], "PPO: reward and KL to the reference", "plots/ppo.png")
    log_samples(run.run_id, trainer.actor_critic.palm, scope=trainer.actor_critic.actor_scope, device=run.device,
                max_new_tokens=config.max_new_tokens, prompts=prompts[:4], seed=config.seed)
    final = load_checkpoint(ref.uri, load_state=False).manifest["metrics"]
    return ref, {k: final[k] for k in ("reward", "kl", "kl_per_token", "entropy", "response_length") if k in final}


def load_ppo_prompts(config: PPOConfig, pretrained: ModelInput) -> list[str]:
    from tasks.data import make_prompts

    if config.prompts:
        return read_prompts(config.prompts)
    corpus_text, _ = training_corpus(pretrained)
    return make_prompts(corpus_text, config.num_prompts, config.prompt_chars, split="train", seed=config.seed)


def check_inputs(config: PPOConfig, pretrained_uri: str, reward_uri: str) -> tuple[ModelInput, ModelInput, list[str]]:
    """Every check on the stage's inputs, before any compute: both models, the device, and the prompts."""
    pretrained = resolve_input(pretrained_uri, "palm", "--pretrained")
    reward = resolve_input(reward_uri, "reward", "--reward-model")
    check_same_base(pretrained, reward)
    resolve_runtime(config.runtime)
    prompts = load_ppo_prompts(config, pretrained)
    check_prompts_fit(prompts, pretrained.palm_config["max_seq_len"], config.max_new_tokens, "ppo.prompts")
    return pretrained, reward, prompts


def run_ppo(config: PPOConfig, pretrained_uri: str, reward_uri: str, *,
            parent_run_id: str | None = None) -> StageResult:
    """Check inputs, then train (or reuse, or resume) `palm-policy`; a new version becomes `candidate`."""
    pretrained, reward, prompts = check_inputs(config, pretrained_uri, reward_uri)
    prompts_digest = text_digest("\n".join(prompts))
    tracking.check_tracking()

    def log_inputs(run_id: str) -> None:
        tracking.log_text_dataset(run_id, name="ppo-prompts", source_uri=config.prompts or "corpus:train-prompts",
                                  digest=prompts_digest, context="training", preview="\n".join(prompts[:20]))

    lineage = {"parent.pretrained": pretrained.ref, "parent.reward": reward.ref, "data.prompts": prompts_digest}
    return distributed.execute(
        "ppo", config, inputs={"pretrained": pretrained.digest, "reward": reward.digest, "prompts": prompts_digest},
        model_name=MODEL_NAME, lineage=lineage, parent_run_id=parent_run_id, log_inputs=log_inputs,
        train_fn=partial(train, config=config, pretrained=pretrained, reward=reward, prompts=prompts,
                         prompts_digest=prompts_digest))
