"""Reward model: one reward per sequence, the three feedback losses, and that everything trainable gets trained."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import RewardModel, pairwise_loss
from models.reward import HEADS, masked_mean, token_logprobs
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


@pytest.mark.parametrize("head", HEADS)
def test_every_trainable_parameter_reaches_the_optimiser(head):
    palm = tiny_palm()
    palm.add_finetune_params("other")  # someone else's scope on the same base
    rm = tiny_reward_model(palm, num_binned_output=5, head=head)
    trainable = {id(p) for p in rm.finetune_parameters()}
    frozen = {id(p) for p in rm.palm.base_parameters()} | {id(p) for p in rm.palm.finetune_parameters("other")}
    assert trainable == {id(p) for p in rm.parameters()} - frozen
    assert id(rm.prompt_embed) in trainable and id(rm.response_embed) in trainable

    seq, prompt_mask = batch()
    rm(seq, prompt_mask=prompt_mask, labels=torch.tensor([1, 2, 3])).backward()
    for p in (rm.prompt_embed, rm.response_embed, *rm.to_pred.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in rm.finetune_parameters())


@pytest.mark.parametrize("head", HEADS)
def test_training_the_reward_scope_leaves_the_base_and_other_scopes_untouched(head):
    palm = tiny_palm()
    palm.add_finetune_params("other")
    rm = tiny_reward_model(palm, num_binned_output=5, head=head)
    before = {name: p.detach().clone() for name, p in rm.named_parameters()}
    opt = torch.optim.AdamW(rm.finetune_parameters(), lr=1e-2)
    seq, prompt_mask = batch()
    for _ in range(3):
        opt.zero_grad()
        rm(seq, prompt_mask=prompt_mask, labels=torch.tensor([1, 2, 3])).backward()
        opt.step()
    changed = {name for name, p in rm.named_parameters() if not torch.equal(p, before[name])}
    assert {"prompt_embed", "response_embed"} | {f"to_pred.{n}" for n, _ in rm.to_pred.named_parameters()} <= changed
    assert any(name.startswith("palm.finetune_modules.reward.") for name in changed)
    assert all(name.startswith("palm.finetune_modules.reward.") or not name.startswith("palm.") for name in changed)
    assert torch.equal(palm.token_emb.weight, rm.palm.token_emb.weight)  # the caller's PaLM is never modified


@pytest.mark.parametrize("head", HEADS)
def test_padding_does_not_change_the_reward(head):
    rm = tiny_reward_model(tiny_palm(causal=False), num_binned_output=5, head=head)
    seq, prompt_mask = batch(b=1, n=8)
    padded = torch.cat((seq, torch.zeros(1, 4, dtype=torch.long)), dim=-1)
    mask = torch.cat((torch.ones(1, 8), torch.zeros(1, 4)), dim=-1).bool()
    padded_prompt = torch.cat((prompt_mask, torch.zeros(1, 4, dtype=torch.bool)), dim=-1)
    reward = rm(padded, mask=mask, prompt_mask=padded_prompt)
    torch.testing.assert_close(reward, rm(seq, prompt_mask=prompt_mask))
    padded[:, 8:] = 7
    torch.testing.assert_close(rm(padded, mask=mask, prompt_mask=padded_prompt), reward)


@pytest.mark.parametrize("head", HEADS)
def test_prompt_lengths_are_the_same_as_a_prompt_mask(head):
    rm = tiny_reward_model(head=head)
    seq, prompt_mask = batch(prompt_len=4)
    torch.testing.assert_close(rm(seq, prompt_lengths=torch.tensor([4, 4, 4])), rm(seq, prompt_mask=prompt_mask))


@pytest.mark.parametrize("head", HEADS)
def test_a_rows_reward_does_not_depend_on_the_rest_of_the_batch(head):
    rm = tiny_reward_model(head=head)
    seq, prompt_mask = batch(b=2)
    prompt_mask[1] = True  # row 1 is all prompt, no response
    torch.testing.assert_close(rm(seq, prompt_mask=prompt_mask)[0], rm(seq[:1], prompt_mask=prompt_mask[:1])[0])


@pytest.mark.parametrize("bins", [1, -2])
def test_bad_bin_count_is_rejected(bins):
    with pytest.raises(ValueError, match="num_binned_output"):
        RewardModel(tiny_palm(), num_binned_output=bins)


def test_bad_head_is_rejected():
    with pytest.raises(ValueError, match="head must be one of mean-pooled, per-token"):
        RewardModel(tiny_palm(), head="last-token")


def test_token_logprobs_by_hand():
    # vocab of 2; position 0 predicts [0.5, 0.5], position 1 predicts [0.75, 0.25] (logits ln 3 and 0)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    x = torch.tensor([[1, 0, 1]])
    expected = torch.tensor([[0.0, math.log(0.5), math.log(0.25)]])
    torch.testing.assert_close(token_logprobs(logits, x, None), expected)
    # a token that follows padding has no prediction of its own
    mask = torch.tensor([[False, True, True]])
    torch.testing.assert_close(token_logprobs(logits, x, mask), torch.tensor([[0.0, 0.0, math.log(0.25)]]))


@pytest.mark.parametrize("bins", [0, 4])
def test_per_token_head_is_the_mean_of_its_token_scores(bins):
    """Independently: each response token's score from its embedding and log p(token | prefix), averaged."""
    rm = tiny_reward_model(num_binned_output=bins, head="per-token")
    seq, prompt_mask = batch(b=2, n=9, prompt_len=3)
    marker = torch.where(prompt_mask[..., None], rm.prompt_embed, rm.response_embed)
    h = rm.palm(seq, finetune_scope=rm.scope, extra_embed=marker, return_only_embedding=True)
    logits = h @ rm.palm.token_emb.weight.t()
    for row in range(2):
        scores = []
        for t in range(3, 9):  # the response tokens
            logp = torch.log_softmax(logits[row, t - 1], dim=-1)[seq[row, t]]
            scores.append(rm.to_pred(torch.cat((h[row, t], logp[None]))))
        torch.testing.assert_close(rm.predict(seq, prompt_mask=prompt_mask)[row], torch.stack(scores).mean(0))


def test_mean_pooled_head_is_a_linear_map_of_the_mean_embedding():
    rm = tiny_reward_model(head="mean-pooled")
    seq, prompt_mask = batch(b=2, n=9, prompt_len=3)
    marker = torch.where(prompt_mask[..., None], rm.prompt_embed, rm.response_embed)
    h = rm.palm(seq, finetune_scope=rm.scope, extra_embed=marker, return_only_embedding=True)
    torch.testing.assert_close(rm.predict(seq, prompt_mask=prompt_mask), rm.to_pred(masked_mean(h, ~prompt_mask)))


def _corrupted(data: torch.Tensor, prompt_len: int, k: int, g: torch.Generator) -> torch.Tensor:
    """data with k response tokens per row changed to other tokens."""
    x = data.clone()
    for row in x:
        pos = torch.randperm(data.shape[1] - prompt_len, generator=g)[:k] + prompt_len
        row[pos] = (row[pos] + torch.randint(1, VOCAB, (k,), generator=g)) % VOCAB
    return x


def test_per_token_head_learns_to_spot_what_the_model_finds_implausible(memorised):
    """Preferences for the text a language model knows over the same text with tokens changed: the per-token head
    reads each token's likelihood and learns this in a few dozen steps; the mean-pooled head does not."""
    palm, data = memorised
    prompt_mask = torch.zeros_like(data, dtype=torch.bool)
    prompt_mask[:, :6] = True
    accuracy = {}
    for head in HEADS:
        rm = tiny_reward_model(palm, seed=0, head=head)
        last = rm.to_pred if head == "mean-pooled" else rm.to_pred[-1]
        torch.nn.init.normal_(last.weight, std=0.02)  # the default start, not the fixture's random head
        for p in rm.palm.base_parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW(rm.finetune_parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(60):
            opt.zero_grad()
            loss, _ = rm.preference_loss(data, _corrupted(data, 6, 2, g), chosen_prompt_mask=prompt_mask,
                                         rejected_prompt_mask=prompt_mask)
            loss.backward()
            opt.step()
        g = torch.Generator().manual_seed(99)  # unseen corruptions, one token each: harder than training
        with torch.no_grad():
            intact = rm.score(data, prompt_mask=prompt_mask)
            wins = [(intact > rm.score(_corrupted(data, 6, 1, g), prompt_mask=prompt_mask)).float().mean()
                    for _ in range(10)]
        accuracy[head] = float(torch.stack(wins).mean())
    assert accuracy["per-token"] >= 0.95, accuracy
    assert accuracy["per-token"] > accuracy["mean-pooled"] + 0.1, accuracy


def test_token_rewards_split_the_score_causally_over_the_response():
    rm = tiny_reward_model(head="per-token")
    seq, prompt_mask = batch(b=3, n=10, prompt_len=4)
    mask = torch.ones_like(seq, dtype=torch.bool)
    mask[2, :2] = False  # left padding in one row
    prompt_mask[2, :2] = False
    shares = rm.token_rewards(seq, mask=mask, prompt_mask=prompt_mask, baseline=0.5)
    torch.testing.assert_close(shares.sum(-1), rm.score(seq, mask=mask, prompt_mask=prompt_mask) - 0.5)
    assert (shares[prompt_mask | ~mask] == 0).all()
    later = seq.clone()
    later[:, 7:] = (later[:, 7:] + 1) % VOCAB  # what comes after token 6 cannot change the shares up to it
    torch.testing.assert_close(rm.token_rewards(later, mask=mask, prompt_mask=prompt_mask, baseline=0.5)[:, :7],
                               shares[:, :7])


@pytest.mark.parametrize("kwargs", [dict(head="mean-pooled"), dict(head="per-token", num_binned_output=5)])
def test_token_rewards_need_a_per_token_scalar_head(kwargs):
    rm = tiny_reward_model(**kwargs)
    seq, prompt_mask = batch()
    assert not rm.dense
    with pytest.raises(ValueError, match="no per-token rewards"):
        rm.token_rewards(seq, prompt_mask=prompt_mask)
