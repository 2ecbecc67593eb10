"""Reward model: one reward per sequence, the three feedback losses, and that everything trainable gets trained."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import RewardModel, pairwise_loss
from tests.models.conftest import VOCAB, tiny_palm, tiny_reward_model


def batch(b=3, n=10, prompt_len=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (b, n), generator=g)
    prompt_mask = torch.zeros(b, n, dtype=torch.bool)
    prompt_mask[:, :prompt_len] = True
    return seq, prompt_mask


def test_binned_head_returns_the_expected_rating_every_time():
    rm = tiny_reward_model(num_binned_output=5)
    seq, prompt_mask = batch()
    first, second = rm(seq, prompt_mask=prompt_mask), rm(seq, prompt_mask=prompt_mask)
    assert first.shape == (3,)
    assert torch.equal(first, second)  # the reference samples a bin: same text, different rewards
    logits = rm.predict(seq, prompt_mask=prompt_mask)
    torch.testing.assert_close(first, logits.softmax(-1) @ torch.arange(5.0))
    assert ((first >= 0) & (first <= 4)).all()


def test_binned_head_trains_with_cross_entropy_on_bin_indices():
    rm = tiny_reward_model(num_binned_output=5)
    seq, prompt_mask = batch()
    labels = torch.tensor([0, 4, 2])
    expected = F.cross_entropy(rm.predict(seq, prompt_mask=prompt_mask), labels)
    torch.testing.assert_close(rm(seq, prompt_mask=prompt_mask, labels=labels), expected)


def test_scalar_head_trains_with_mean_squared_error():
    rm = tiny_reward_model(num_binned_output=0)
    seq, prompt_mask = batch()
    labels = torch.tensor([0.5, -1.0, 2.0])
    reward = rm(seq, prompt_mask=prompt_mask)
    assert reward.shape == (3,)
    torch.testing.assert_close(rm(seq, prompt_mask=prompt_mask, labels=labels), ((reward - labels) ** 2).mean())


def test_pairwise_loss_is_bradley_terry():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.5]), torch.tensor([0.0, 1.0, 2.5])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0)) + math.log(2.0)) / 3
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_preference_loss_scores_both_sides_and_reports_accuracy():
    rm = tiny_reward_model()
    chosen, pm = batch(seed=1)
    rejected, _ = batch(seed=2)
    loss, accuracy = rm.preference_loss(chosen, rejected, chosen_prompt_mask=pm, rejected_prompt_mask=pm)
    r_c, r_r = rm.score(chosen, prompt_mask=pm), rm.score(rejected, prompt_mask=pm)
    torch.testing.assert_close(loss, -F.logsigmoid(r_c - r_r).mean())
    assert accuracy.item() == pytest.approx((r_c > r_r).float().mean().item())


def test_every_trainable_parameter_reaches_the_optimiser():
    palm = tiny_palm()
    palm.add_finetune_params("other")  # someone else's scope on the same base
    rm = tiny_reward_model(palm, num_binned_output=5)
    trainable = {id(p) for p in rm.finetune_parameters()}
    frozen = {id(p) for p in rm.palm.base_parameters()} | {id(p) for p in rm.palm.finetune_parameters("other")}
    assert trainable == {id(p) for p in rm.parameters()} - frozen
    assert id(rm.prompt_embed) in trainable and id(rm.response_embed) in trainable

    seq, prompt_mask = batch()
    rm(seq, prompt_mask=prompt_mask, labels=torch.tensor([1, 2, 3])).backward()
    for p in (rm.prompt_embed, rm.response_embed, rm.to_pred.weight, rm.to_pred.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in rm.finetune_parameters())


def test_training_the_reward_scope_leaves_the_base_and_other_scopes_untouched():
    palm = tiny_palm()
    palm.add_finetune_params("other")
    rm = tiny_reward_model(palm, num_binned_output=5)
    before = {name: p.detach().clone() for name, p in rm.named_parameters()}
    opt = torch.optim.AdamW(rm.finetune_parameters(), lr=1e-2)
    seq, prompt_mask = batch()
    for _ in range(3):
        opt.zero_grad()
        rm(seq, prompt_mask=prompt_mask, labels=torch.tensor([1, 2, 3])).backward()
        opt.step()
    changed = {name for name, p in rm.named_parameters() if not torch.equal(p, before[name])}
    assert {"prompt_embed", "response_embed", "to_pred.weight", "to_pred.bias"} <= changed
    assert any(name.startswith("palm.finetune_modules.reward.") for name in changed)
    assert all(name.startswith("palm.finetune_modules.reward.") or not name.startswith("palm.") for name in changed)
    assert torch.equal(palm.token_emb.weight, rm.palm.token_emb.weight)  # the caller's PaLM is never modified


def test_padding_does_not_change_the_reward():
    rm = tiny_reward_model(tiny_palm(causal=False), num_binned_output=5)
    seq, prompt_mask = batch(b=1, n=8)
    padded = torch.cat((seq, torch.zeros(1, 4, dtype=torch.long)), dim=-1)
    mask = torch.cat((torch.ones(1, 8), torch.zeros(1, 4)), dim=-1).bool()
    padded_prompt = torch.cat((prompt_mask, torch.zeros(1, 4, dtype=torch.bool)), dim=-1)
    reward = rm(padded, mask=mask, prompt_mask=padded_prompt)
    torch.testing.assert_close(reward, rm(seq, prompt_mask=prompt_mask))
    padded[:, 8:] = 7
    torch.testing.assert_close(rm(padded, mask=mask, prompt_mask=padded_prompt), reward)


def test_prompt_lengths_are_the_same_as_a_prompt_mask():
    rm = tiny_reward_model()
    seq, prompt_mask = batch(prompt_len=4)
    torch.testing.assert_close(rm(seq, prompt_lengths=torch.tensor([4, 4, 4])), rm(seq, prompt_mask=prompt_mask))


def test_a_rows_reward_does_not_depend_on_the_rest_of_the_batch():
    rm = tiny_reward_model()
    seq, prompt_mask = batch(b=2)
    prompt_mask[1] = True  # row 1 is all prompt, no response
    torch.testing.assert_close(rm(seq, prompt_mask=prompt_mask)[0], rm(seq[:1], prompt_mask=prompt_mask[:1])[0])


@pytest.mark.parametrize("bins", [1, -2])
def test_bad_bin_count_is_rejected(bins):
    with pytest.raises(ValueError, match="num_binned_output"):
        RewardModel(tiny_palm(), num_binned_output=bins)
