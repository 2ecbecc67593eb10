"""The actor-critic: the merged policy a registry version serves (one plain PaLM with the trained actor's logits), and
the rollouts PPO learns from."""

import pytest
import torch

from models import PaLM
from models.actor_critic import ActorCritic
from tests.models.conftest import VOCAB, tiny_palm


def trained(actor_lora: bool) -> ActorCritic:
    """An actor-critic whose actor weights moved away from the base: a merge that dropped them would show."""
    ac = ActorCritic(tiny_palm(seed=0), actor_lora=actor_lora, critic_lora=True, lora_r=4)
    opt = torch.optim.SGD(ac.actor_parameters(), lr=0.5)
    seq = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        opt.zero_grad()
        ac.policy_logits(seq, None).logsumexp(-1).mean().backward()
        opt.step()
    return ac.eval()


def batch():
    seq = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(seq, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded row
    return seq, mask


def test_merged_lora_policy_has_the_actors_logits_and_no_adapters():
    ac = trained(actor_lora=True)
    merged = ac.merged_policy()
    seq, mask = batch()
    with torch.no_grad():
        actor, plain, base = ac.policy_logits(seq, mask), merged(seq, mask=mask), ac.palm(seq, mask=mask)
    assert (actor - base).abs().max() > 1e-2, "the actor's LoRA did not move: the comparison would prove nothing"
    torch.testing.assert_close(plain, actor, rtol=1e-5, atol=1e-5)
    assert isinstance(merged, PaLM) and len(merged.finetune_modules) == 0
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in ac.palm.base_parameters())


def test_merged_full_finetune_policy_is_the_trained_palm_without_the_critic():
    ac = trained(actor_lora=False)
    merged = ac.merged_policy()
    seq, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(seq, mask=mask), ac.policy_logits(seq, mask), rtol=0, atol=0)
    assert len(merged.finetune_modules) == 0


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_ppo_log_probs_are_of_the_distribution_the_rollouts_were_sampled_from(temperature):
    """Rollouts drawn at T: the ratio's log-probs, the KL to the reference and the update's entropy are of
    softmax(logits / T), computed here independently from a plain forward pass; else PPO is silently off-policy."""
    from models.actor_critic import action_outputs, make_experience
    from models.ppo import PPOConfig, gather_logprobs
    from tests.models.conftest import tiny_trainer

    trainer = tiny_trainer()
    ac, cfg = trainer.actor_critic.eval(), PPOConfig()
    prompts = torch.randint(0, 60, (4, 6), generator=torch.Generator().manual_seed(0))
    exp = make_experience(ac, trainer.reward_model, prompts, torch.ones_like(prompts, dtype=torch.bool),
                          max_new_tokens=5, kl_coef=0.1, cfg=cfg, temperature=temperature,
                          generator=torch.Generator().manual_seed(1))
    T = exp.num_actions
    with torch.no_grad():
        logits = ac.palm(exp.sequences[:, :-1], finetune_scope=ac.actor_scope)[:, -T:].float()
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, exp.sequences[:, -T:, None])[..., 0]
        untempered = gather_logprobs(logits, exp.sequences[:, -T:])
    assert torch.allclose(exp.logprobs, expected, atol=1e-5)
    assert not torch.allclose(exp.logprobs, untempered, atol=1e-3)  # the T = 1 log-probs are another policy's
    assert exp.select(torch.tensor([0, 2])).temperature == temperature
    with torch.no_grad():  # the update recomputes the same distribution: before any step the ratio is exactly 1
        again = action_outputs(ac, exp.sequences, exp.sequence_mask, T, temperature=exp.temperature)["logprobs"]
    assert torch.allclose(again, exp.logprobs, atol=1e-5)


def test_ppo_refuses_greedy_rollouts():
    from models.actor_critic import make_experience
    from models.ppo import PPOConfig
    from tests.models.conftest import tiny_trainer

    trainer = tiny_trainer()
    prompts = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be above 0"):
        make_experience(trainer.actor_critic, trainer.reward_model, prompts, torch.ones_like(prompts, dtype=torch.bool),
                        max_new_tokens=3, kl_coef=0.1, cfg=PPOConfig(), temperature=0.0)


def test_rollouts_drawn_in_bf16_keep_the_training_precisions_log_probs():
    """sample_dtype=bf16 draws the tokens from a bf16 copy of the policy (the same tokens that copy draws on the same
    generator), while the log-probs the importance ratio starts from are the fp32 policy's own: the ratio of the first
    update is exactly 1, not off by bf16's rounding."""
    import copy

    from models.actor_critic import action_outputs, make_experience
    from models.ppo import PPOConfig
    from tests.models.conftest import tiny_trainer

    trainer = tiny_trainer()
    ac = trainer.actor_critic.eval()
    prompts = torch.randint(0, 60, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts, dtype=torch.bool)
    exp = make_experience(ac, trainer.reward_model, prompts, mask, max_new_tokens=6, kl_coef=0.1, cfg=PPOConfig(),
                          generator=torch.Generator().manual_seed(1), sample_dtype=torch.bfloat16)
    assert ac.palm.token_emb.weight.dtype == torch.float32  # the policy that trains was left as it was
    bf16 = copy.deepcopy(ac.palm).to(torch.bfloat16)
    with torch.no_grad():
        drawn = bf16.sample(prompts, mask, 6, filter_thres=0.0, finetune_scope=ac.actor_scope,
                            generator=torch.Generator().manual_seed(1))
        T = exp.num_actions
        fp32 = action_outputs(ac, exp.sequences, exp.sequence_mask, T)["logprobs"]
        low = bf16(exp.sequences[:, :-1], finetune_scope=ac.actor_scope)[:, -T:].float().log_softmax(-1)
        low = low.gather(-1, exp.sequences[:, -T:, None])[..., 0]
    assert torch.equal(exp.sequences[:, -T:], drawn.tokens)
    assert torch.equal(exp.logprobs, fp32)
    assert not torch.allclose(exp.logprobs, low, atol=1e-4)  # bf16's own log-probs differ: the check can fail
