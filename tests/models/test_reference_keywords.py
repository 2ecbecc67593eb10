"""RLHFTrainer takes the reference library's constructor keywords with the reference's meaning, and refuses with
one clear error the ones that cannot apply here."""

import copy
import math

import pytest
import torch

from models import RLHFTrainer
from models.actor_critic import action_outputs, ppo_update
from models.rlhf import REFUSED
from tests.models.conftest import VOCAB, tiny_palm, tiny_reward_model, tiny_trainer


def optimiser_steps(trainer, **step_kwargs) -> int:
    count = []
    handle = trainer.optimizer.register_step_pre_hook(lambda *args: count.append(1))
    trainer.step(trainer.prompts, trainer.prompts_mask, 4, **step_kwargs)
    handle.remove()
    return len(count)


def test_minibatch_size_and_epochs_set_the_update_passes():
    # 6 prompts -> 6 rollouts; minibatches of 2 -> 3 optimiser steps per epoch
    assert optimiser_steps(tiny_trainer(minibatch_size=2, epochs=1)) == 3
    assert optimiser_steps(tiny_trainer(minibatch_size=4, epochs=2)) == 4  # 2 epochs x (4 + 2)
    assert optimiser_steps(tiny_trainer(minibatch_size=2, epochs=1), minibatch_size=6) == 1  # a call's own wins
    trainer = tiny_trainer(minibatch_size=2, epochs=1)
    steps = []
    trainer.optimizer.register_step_pre_hook(lambda *args: steps.append(1))
    trainer.train(num_episodes=1, max_timesteps=4, update_timesteps=4, max_batch_size=4, max_seq_len=8)
    assert len(steps) == 2  # train() updates in the trainer's minibatches, not in max_batch_size
    with pytest.raises(ValueError, match="minibatch_size"):
        tiny_trainer(minibatch_size=0)


def test_clip_and_entropy_keywords_set_ppo_settings():
    trainer = tiny_trainer(eps_clip=0.3, value_clip=0.4, beta_s=0.01, epochs=3)
    cfg = trainer.cfg
    assert (cfg.clip_eps, cfg.value_clip_eps, cfg.entropy_coef, cfg.ppo_epochs) == (0.3, 0.4, 0.01, 3)
    with pytest.raises(ValueError, match="eps_clip and clip_eps"):
        tiny_trainer(eps_clip=0.3, clip_eps=0.2)
    with pytest.raises(ValueError, match="max_grad_norm and max_norm"):
        tiny_trainer(max_norm=0.5, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="not both"):
        tiny_trainer(ppo=trainer.cfg, eps_clip=0.3)


def test_max_norm_none_never_clips_and_a_number_clips():
    norms = {}
    for max_norm in (None, 1e-4):
        trainer = tiny_trainer(actor_lr=1e-2, max_norm=max_norm, epochs=1)
        seen = []
        trainer.optimizer.register_step_pre_hook(lambda opt, *a, seen=seen: seen.append(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]))))
        stats = trainer.step(trainer.prompts, trainer.prompts_mask, 4)
        norms[max_norm] = (stats["grad_norm"], seen[0].item())
    before, after = norms[None]
    assert before > 1e-3 and after == pytest.approx(before, rel=1e-5)  # None: the gradient is left as it is
    assert norms[1e-4][1] == pytest.approx(1e-4, rel=1e-3)


def test_optimiser_keywords_reach_adamw():
    trainer = tiny_trainer(betas=(0.8, 0.95), actor_wd=0.1, critic_wd=0.01)
    actor, critic = trainer.optimizer.param_groups
    assert actor["betas"] == critic["betas"] == (0.8, 0.95)
    assert (actor["weight_decay"], critic["weight_decay"]) == (0.1, 0.01)
    assert {id(p) for p in actor["params"]} == {id(p) for p in trainer.actor_critic.actor_parameters()}


def test_lora_ranks_are_per_scope():
    trainer = tiny_trainer(actor_lora_r=4, critic_lora_r=2)
    scopes = trainer.actor_critic.palm.finetune_modules
    assert scopes["actor"][0]["qkv"].A.shape[1] == 4 and scopes["critic"][0]["qkv"].A.shape[1] == 2


def test_dropout_applies_to_actor_and_critic_while_training_only():
    trainer = tiny_trainer(actor_dropout=0.5, critic_dropout=0.5)
    ac, seq = trainer.actor_critic, trainer.prompts
    torch.nn.init.normal_(ac.value_head.weight)  # it starts at zero, which would hide what feeds it
    ac.train()
    assert not torch.equal(ac.policy_logits(seq, None), ac.policy_logits(seq, None))
    assert not torch.equal(ac.values(seq, None), ac.values(seq, None))
    assert torch.equal(ac.reference_logits(seq, None), ac.reference_logits(seq, None))  # the reference: never
    ac.eval()
    assert torch.equal(ac.policy_logits(seq, None), ac.policy_logits(seq, None))
    plain = tiny_trainer().actor_critic.train()
    assert torch.equal(plain.policy_logits(seq, None), plain.policy_logits(seq, None))  # default: no dropout
    with pytest.raises(ValueError, match="actor_dropout"):
        tiny_trainer(actor_dropout=1.0)


def test_kl_div_loss_weight_pulls_the_policy_back_toward_the_one_that_sampled():
    trainer = tiny_trainer(epochs=1, actor_lr=1e-2)
    exp, _ = trainer.rollout(trainer.prompts, trainer.prompts_mask, 4)
    # no policy or value signal: zero advantages, returns equal to the old values, no entropy bonus
    exp.advantages.zero_()
    exp.returns.copy_(exp.values)
    with torch.no_grad():  # the current policy drifts away from the one that sampled exp
        for p in trainer.actor_critic.actor_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)

    def kl_to_sampler(ac):
        with torch.no_grad():
            log_ratio = action_outputs(ac, exp.sequences, exp.sequence_mask, exp.num_actions,
                                       with_values=False)["logprobs"] - exp.logprobs
        return ((torch.expm1(log_ratio) - log_ratio) * exp.action_mask).sum() / exp.action_mask.sum()

    start = kl_to_sampler(trainer.actor_critic)
    assert start > 1e-3
    moved = {}
    for weight in (0.0, 1.0):
        t = copy.deepcopy(trainer)
        ppo_update(t.actor_critic, t.optimizer, [exp], t.cfg, 6, old_policy_kl_coef=weight)
        moved[weight] = kl_to_sampler(t.actor_critic)
    torch.testing.assert_close(moved[0.0], start)  # nothing else pushes the policy anywhere
    assert moved[1.0] < 0.9 * start
    built = tiny_trainer(kl_div_loss_weight=0.3)
    assert built.old_policy_kl_coef == 0.3 and "policy_loss" in built.step(built.prompts, built.prompts_mask, 4)


def test_pad_value_pads_prompts_and_the_rows_after_eos():
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    trainer = RLHFTrainer(palm=tiny_palm(), reward_model=tiny_reward_model(), prompt_token_ids=prompts, pad_value=9)
    assert trainer.prompts.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert trainer.prompts_mask.tolist() == [[True, True, True], [False, False, True]]


def tokenizer(texts: list[str]) -> list[list[int]]:
    return [[ord(c) % VOCAB for c in text] for text in texts]


def test_text_prompts_through_a_tokenizer(tmp_path):
    trainer = RLHFTrainer(palm=tiny_palm(), reward_model=tiny_reward_model(), prompts=["abc", "de"],
                          tokenizer=tokenizer)
    assert trainer.prompts.tolist() == [tokenizer(["abc"])[0], [0] + tokenizer(["de"])[0]]
    assert trainer.prompts_mask.tolist() == [[True] * 3, [False, True, True]]
    path = tmp_path / "prompts.txt"
    path.write_text("abc\n\nde\n")  # one prompt per line; the blank line is no prompt
    from_file = RLHFTrainer(palm=tiny_palm(), reward_model=tiny_reward_model(), prompts_path=str(path),
                            tokenizer=tokenizer)
    assert torch.equal(from_file.prompts, trainer.prompts)
    tensor_tok = RLHFTrainer(palm=tiny_palm(), reward_model=tiny_reward_model(), prompts=["ab", "cd"],
                             tokenizer=lambda texts: torch.tensor(tokenizer(texts)))
    assert tensor_tok.prompts.tolist() == tokenizer(["ab", "cd"])
    with pytest.raises(ValueError, match="tokenizer"):
        RLHFTrainer(palm=tiny_palm(), reward_model=tiny_reward_model(), prompts=["abc"])
    with pytest.raises(ValueError, match="one way"):
        RLHFTrainer(palm=tiny_palm(), reward_model=tiny_reward_model(), prompts=["abc"], tokenizer=tokenizer,
                    prompt_token_ids=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("keyword", sorted(REFUSED))
def test_keywords_that_cannot_apply_are_refused_saying_why(keyword):
    with pytest.raises(TypeError, match=f"does not take {keyword}: "):
        tiny_trainer(**{keyword: {}})


def test_several_refused_keywords_give_one_error_naming_them_all():
    with pytest.raises(TypeError) as err:
        tiny_trainer(accelerate_kwargs={}, critic_num_pred_bins=6)
    assert "accelerate_kwargs: there is no Accelerate" in str(err.value) and "critic_num_pred_bins" in str(err.value)


def test_every_reference_keyword_builds_a_trainer_that_trains(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\nworld\nabc\n")
    trainer = RLHFTrainer(palm=tiny_palm(), reward_model=tiny_reward_model(), prompts_path=str(path),
                          tokenizer=tokenizer, minibatch_size=2, epochs=1, eps_clip=0.2, value_clip=0.4, beta_s=0.01,
                          kl_div_loss_weight=0.1, max_norm=None, betas=(0.9, 0.999), actor_wd=0.0, critic_wd=0.0,
                          actor_lora_r=8, critic_lora_r=8, actor_dropout=0.1, critic_dropout=0.1, pad_value=0)
    history = trainer.train(num_episodes=1, max_timesteps=4, update_timesteps=4, max_batch_size=4, max_seq_len=10)
    assert all(math.isfinite(v) for v in history[-1].values()) and "policy_loss" in history[-1]
