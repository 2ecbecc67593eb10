"""PPO: the loss maths against hand-computed values, and the actor-critic's behaviour during real updates."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from models import RLHFTrainer
from models.actor_critic import ppo_update
from models.ppo import (KLController, entropy_from_logits, gae, gather_logprobs, kl_penalty_rewards, masked_whiten,
                        policy_loss, value_loss)
from tests.models.conftest import VOCAB, tiny_palm, tiny_reward_model, tiny_trainer

MASK_2X3 = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # row 1 ended (eos) after its second action


# ---- pure functions against hand-computed values -------------------------------------------------------------------
def test_gae_and_returns_match_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]])  # the 9 sits on padding and must not leak in
    advantages, returns = gae(rewards, values, MASK_2X3, gamma=0.9, lam=0.8)
    # row 0: d2 = 2 - 1.5 = .5; d1 = 0 + .9*1.5 - 1 = .35; d0 = 1 + .9*1 - .5 = 1.4; A_t = d_t + .72 A_{t+1}
    # row 1: the value after the last real action is 0: d1 = 1 - 2 = -1; d0 = .5 + .9*2 - 1 = 1.3; A0 = 1.3 - .72
    expected_adv = torch.tensor([[1.4 + 0.72 * 0.71, 0.71, 0.5], [0.58, -1.0, 0.0]])
    torch.testing.assert_close(advantages, expected_adv)
    torch.testing.assert_close(returns, torch.tensor([[1.9112 + 0.5, 1.71, 2.0], [1.58, 1.0, 0.0]]))


def test_kl_penalty_is_per_token_with_the_score_on_the_last_real_action():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, -1.0]])
    rewards = kl_penalty_rewards(scores, logprobs, ref_logprobs, MASK_2X3, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.95], [0.05, -1.0, 0.0]]))


def test_dense_rewards_land_on_the_actions_that_earned_them():
    token_scores = torch.tensor([[0.5, 0.25, 1.0], [-1.0, 2.0, 7.0]])  # the 7 sits on padding and must not leak in
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, -1.0]])
    rewards = kl_penalty_rewards(token_scores, logprobs, ref_logprobs, MASK_2X3, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0.45, 0.25, 0.95], [-0.95, 2.0, 0.0]]))


def test_clipped_surrogate_matches_hand_computation():
    ratios = torch.tensor([[1.5, 0.7, 0.9, 3.0]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    old = torch.full_like(ratios, -2.0)
    loss, clip_frac, approx_kl = policy_loss(old + ratios.log(), old, advantages, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): 1.5 -> -1.2 (clipped), 0.7 -> 0.8 (clipped), 0.9 -> 0.9; the 3.0 is padding
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 0.9) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.7, 0.9)) / 3
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_clipped_value_loss_matches_hand_computation():
    values = torch.tensor([[1.0, 1.6, 5.0]])
    old_values = torch.tensor([[0.9, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    # t0: max((1-2)^2, (0.9+0.1-2)^2) = 1; t1: max((1.6-2)^2, (1.0+0.2-2)^2) = .64 (the clipped one); t2 is padding
    loss = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.64) / 2)


def test_whitening_uses_real_tokens_only_and_zeroes_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    expected = (torch.tensor([[1.0, 2.0, 3.0], [4.0, 2.5, 2.5]]) - 2.5) / math.sqrt(1.25) * mask
    torch.testing.assert_close(masked_whiten(x, mask), expected)


def test_entropy_and_logprobs_of_the_taken_tokens():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(entropy_from_logits(logits), dist.entropy())
    tokens = torch.tensor([[0, 5, 10], [3, 3, 7]])
    torch.testing.assert_close(gather_logprobs(logits, tokens), dist.log_prob(tokens))
    assert entropy_from_logits(torch.zeros(1, 1, 11)).item() == pytest.approx(math.log(11))


def test_fixed_kl_coefficient_never_moves():
    kl = KLController(0.1)
    assert kl.update(50.0, 1000) == 0.1 and kl.update(0.0, 1000) == 0.1


def test_adaptive_kl_coefficient_follows_the_proportional_rule():
    kl = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    assert kl.update(9.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error .5 clipped to .2
    assert kl.update(3.0, 10) == pytest.approx(0.102 * (1 - 0.2 * 10 / 100))  # error -.5 clipped to -.2
    assert kl.update(6.6, 50) == pytest.approx(0.09996 * (1 + 0.1 * 50 / 100))  # error .1, inside the clip
    restored = KLController(1.0)
    restored.load_state_dict(kl.state_dict())
    assert restored.state_dict() == kl.state_dict()


# ---- the actor-critic during real PPO updates ----------------------------------------------------------------------
def ppo_steps(trainer: RLHFTrainer, n: int, new_tokens: int = 4) -> list[dict]:
    return [trainer.step(trainer.prompts, trainer.prompts_mask, new_tokens, minibatch_size=3) for _ in range(n)]


@pytest.mark.parametrize("actor_lora", [True, False])
def test_ppo_moves_the_policy_but_never_the_reference(actor_lora):
    palm = tiny_palm()
    trainer = RLHFTrainer(palm=palm, reward_model=tiny_reward_model(), actor_lora=actor_lora, actor_lr=1e-2,
                          prompt_token_ids=torch.randint(0, VOCAB, (6, 5)), seed=0)
    ac, seq = trainer.actor_critic, torch.randint(0, VOCAB, (2, 9))
    ref_before, policy_before = ac.reference_logits(seq, None), ac.policy_logits(seq, None).detach()
    torch.testing.assert_close(ref_before, palm(seq))
    torch.testing.assert_close(policy_before, ref_before)  # PPO starts from the pretrained policy
    ppo_steps(trainer, 2)
    assert torch.equal(ac.reference_logits(seq, None), ref_before)
    assert not torch.allclose(ac.policy_logits(seq, None), policy_before, atol=1e-4)


def test_rollout_rewards_are_the_per_token_kl_to_the_frozen_base_plus_the_score():
    palm = tiny_palm()
    trainer = RLHFTrainer(palm=palm, reward_model=tiny_reward_model(), actor_lr=1e-2, kl_coef=0.3,
                          prompt_token_ids=torch.randint(0, VOCAB, (6, 5)), seed=0)
    ppo_steps(trainer, 2)  # so that policy and reference differ
    exp, _ = trainer.rollout(trainer.prompts, trainer.prompts_mask, 4)
    T = exp.num_actions
    base = palm(exp.sequences[:, :-1], mask=exp.sequence_mask[:, :-1])[:, -T:]
    torch.testing.assert_close(exp.ref_logprobs, gather_logprobs(base, exp.sequences[:, -T:]))
    assert (exp.logprobs - exp.ref_logprobs).abs().max() > 1e-4
    expected = -0.3 * (exp.logprobs - exp.ref_logprobs)
    expected[:, -1] += exp.scores
    torch.testing.assert_close(exp.rewards, expected)


def test_a_per_token_reward_model_gives_each_action_its_share_of_the_score():
    palm = tiny_palm()
    rm = tiny_reward_model(head="per-token")
    trainer = RLHFTrainer(palm=palm, reward_model=rm, actor_lr=1e-2, kl_coef=0.3,
                          prompt_token_ids=torch.randint(0, VOCAB, (6, 5)), seed=0)
    ppo_steps(trainer, 2)
    exp, _ = trainer.rollout(trainer.prompts, trainer.prompts_mask, 4)
    T = exp.num_actions
    shares = rm.token_rewards(exp.sequences, mask=exp.sequence_mask, prompt_mask=exp.prompt_mask)
    torch.testing.assert_close(exp.scores, rm.score(exp.sequences, mask=exp.sequence_mask,
                                                    prompt_mask=exp.prompt_mask))  # the same total
    torch.testing.assert_close(exp.rewards, -0.3 * (exp.logprobs - exp.ref_logprobs) + shares[:, -T:])
    assert (shares[:, -T:] != 0).all() and (shares[:, :-T] == 0).all()  # response tokens only

    sparse = RLHFTrainer(palm=palm, reward_model=rm, kl_coef=0.3, dense_rewards=False,
                         prompt_token_ids=trainer.prompts, seed=0)
    exp, _ = sparse.rollout(sparse.prompts, sparse.prompts_mask, 4)
    torch.testing.assert_close(exp.rewards[:, -1], exp.scores)  # the policy is still the base: no KL term


def test_adaptive_kl_coefficient_updates_after_each_rollout():
    trainer = tiny_trainer(actor_lr=1e-2, kl_coef=0.1, adaptive_kl=True, kl_target=0.05, kl_horizon=20)
    ppo_steps(trainer, 1)
    before = trainer.kl.value
    exp, stats = trainer.rollout(trainer.prompts, trainer.prompts_mask, 4)
    assert stats["kl_coef"] == before
    error = min(max(stats["kl"] / 0.05 - 1, -0.2), 0.2)
    assert trainer.kl.value == pytest.approx(before * (1 + error * 6 / 20))
    assert trainer.kl.value != before


def test_fixed_kl_coefficient_stays_put_during_training():
    trainer = tiny_trainer(actor_lr=1e-2, kl_coef=0.1)
    history = ppo_steps(trainer, 2)
    assert [h["kl_coef"] for h in history] == [0.1, 0.1] and trainer.kl.value == 0.1


def test_experience_size_does_not_grow_with_the_vocabulary():
    prompts = torch.randint(0, VOCAB, (4, 5))
    sizes = []
    for vocab in (256, 20000):
        trainer = tiny_trainer(vocab=vocab, prompts=prompts)
        exp, _ = trainer.rollout(trainer.prompts, trainer.prompts_mask, 4)
        sizes.append(exp.nbytes())
    assert sizes[0] == sizes[1]


def test_padding_after_eos_never_reaches_the_ppo_losses():
    trainer = tiny_trainer(ppo_epochs=1, critic_lr=1e-2)
    ppo_steps(trainer, 1)  # the value head starts at zero; after an update it predicts something on padding too
    trainer.sample_generator.manual_seed(3)
    probe, _ = trainer.rollout(trainer.prompts, trainer.prompts_mask, 6)
    eos = int(probe.sequences[0, -5])  # the token row 0 samples second: it ends there when eos
    trainer.sample_generator.manual_seed(3)
    exp, _ = trainer.rollout(trainer.prompts, trainer.prompts_mask, 6, eos_token=eos)
    after_eos = ~exp.sequence_mask
    after_eos[:, :exp.prompt_mask.shape[1] - exp.num_actions] = False  # keep prompt padding as it is
    assert after_eos.any()
    padding = ~exp.action_mask
    for name in ("rewards", "advantages", "returns"):
        assert (getattr(exp, name)[padding] == 0).all(), name
    noisy = replace(exp, sequences=torch.where(after_eos, torch.randint_like(exp.sequences, 1, VOCAB), exp.sequences))
    assert not torch.equal(noisy.sequences, exp.sequences)

    results = []
    for batch in (exp, noisy):
        t = copy.deepcopy(trainer)
        stats = ppo_update(t.actor_critic, t.optimizer, [batch], t.cfg, 3, torch.Generator().manual_seed(0))
        results.append((stats, [p.detach().clone() for p in t.actor_critic.parameters()]))
    (stats_a, params_a), (stats_b, params_b) = results
    assert stats_a == pytest.approx(stats_b, rel=1e-5, abs=1e-7)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b)


def test_gradient_norm_is_clipped_before_each_optimiser_step():
    trainer = tiny_trainer(actor_lr=1e-2, max_grad_norm=1e-3)
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer.optimizer.register_step_pre_hook(record)
    stats = ppo_steps(trainer, 1)[0]
    assert norms and max(norms) <= 1e-3 * (1 + 1e-4)
    assert stats["grad_norm"] > 1e-3  # the norm before clipping: clipping really happened


def test_ppo_trains_only_the_actor_and_critic_scopes_and_the_value_head():
    trainer = tiny_trainer(actor_lr=1e-2, critic_lr=1e-2)
    ac = trainer.actor_critic
    before = {name: p.detach().clone() for name, p in ac.named_parameters()}
    reward_before = [p.detach().clone() for p in trainer.reward_model.parameters()]
    ppo_steps(trainer, 2)
    changed = {name for name, p in ac.named_parameters() if not torch.equal(p, before[name])}
    assert any(n.startswith("palm.finetune_modules.actor.") for n in changed)
    assert any(n.startswith("palm.finetune_modules.critic.") for n in changed)
    assert "value_head.weight" in changed
    assert all(n.startswith(("palm.finetune_modules.", "value_head.")) for n in changed)
    assert all(torch.equal(a, b) for a, b in zip(reward_before, trainer.reward_model.parameters()))
