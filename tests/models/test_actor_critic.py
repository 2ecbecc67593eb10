"""The merged policy a registry version serves: one plain PaLM whose logits are the trained actor's."""

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
