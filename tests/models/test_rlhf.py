"""RLHFTrainer: the seed's usage end to end, PPO training through the reference API, and best-of-n sampling."""

import pytest
import torch

from models import PaLM, RewardModel, RLHFTrainer, select_best_of_n
from tests.models.conftest import VOCAB, tiny_trainer


def test_seed_usage_runs_end_to_end(tmp_path):
    """The seed's three snippets (pretrain, reward model, RLHF), shrunk to CPU size."""
    torch.manual_seed(0)
    palm = PaLM(num_tokens=256, dim=32, depth=1)
    seq = torch.randint(0, 256, (1, 64))
    loss = palm(seq, return_loss=True)
    loss.backward()
    generated = palm.generate(16)
    assert generated.ndim == 2 and generated.shape[0] == 1

    palm.save(tmp_path / "palm.pt")
    palm.load(tmp_path / "palm.pt")

    reward_palm = PaLM(num_tokens=256, dim=32, depth=1, causal=False)
    reward_model = RewardModel(reward_palm, num_binned_output=5)
    seq = torch.randint(0, 256, (1, 32))
    prompt_mask = torch.zeros(1, 32).bool()
    labels = torch.randint(0, 5, (1,))
    loss = reward_model(seq, prompt_mask=prompt_mask, labels=labels)
    loss.backward()
    reward = reward_model(seq, prompt_mask=prompt_mask)
    assert reward.shape == (1,) and 0 <= reward.item() <= 4

    prompts = torch.randint(0, 256, (20, 8))
    trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompts)
    history = trainer.train(num_episodes=2, max_timesteps=2, update_timesteps=4, max_batch_size=2, max_seq_len=14,
                            eos_token=3, temperature=1.0)
    assert len(history) == 2 and all(0 < h["response_length"] <= 6 for h in history)
    answer = trainer.generate(14, prompt=prompts[0], num_samples=4)
    assert answer.ndim == 1 and 1 <= len(answer) <= 14 - 8


def test_reward_model_save_and_load_like_the_seed(tmp_path):
    reward_model = RewardModel(PaLM(num_tokens=VOCAB, dim=32, depth=1), num_binned_output=5)
    reward_model.save(tmp_path / "reward_model.pt")
    reward_model.load(tmp_path / "reward_model.pt")


def test_select_best_of_n_picks_the_highest_score_among_the_first_n():
    scores = torch.tensor([[0.1, 0.9, 0.5, 2.0], [2.0, -1.0, 3.0, 0.0]])
    assert select_best_of_n(scores, 4).tolist() == [3, 2]
    assert select_best_of_n(scores, 3).tolist() == [1, 2]
    assert select_best_of_n(scores, 2).tolist() == [1, 0]
    assert select_best_of_n(scores, 1).tolist() == [0, 0]
    for n in (0, 5):
        with pytest.raises(ValueError, match=f"best-of-{n}"):
            select_best_of_n(scores, n)


def test_generate_returns_the_sample_the_reward_model_scores_highest(monkeypatch):
    trainer = tiny_trainer()
    rm = trainer.reward_model
    seen = []
    real_score = rm.score

    def recording_score(x, mask=None, prompt_mask=None, prompt_lengths=None):
        seen.append((x, mask, prompt_mask))
        return real_score(x, mask=mask, prompt_mask=prompt_mask, prompt_lengths=prompt_lengths)

    monkeypatch.setattr(rm, "score", recording_score)
    prompt = trainer.prompts[0]
    answer = trainer.generate(5 + 6, prompt=prompt, num_samples=6, eos_token=7)
    (sequences, mask, prompt_mask), = seen
    assert len({tuple(s.tolist()) for s in sequences}) > 1  # really different samples

    # re-score each sample on its own: the answer must be the best one
    alone = torch.stack([real_score(s[None], mask=m[None], prompt_mask=p[None])[0]
                         for s, m, p in zip(sequences, mask, prompt_mask)])
    responses = [s[5:][m[5:]] for s, m in zip(sequences, mask)]
    assert alone.max() - alone.min() > 1e-3
    winners = [r for r, score in zip(responses, alone) if torch.isclose(score, alone.max())]
    assert any(torch.equal(answer, w) for w in winners)
    assert torch.isclose(real_score(torch.cat((prompt, answer))[None],
                                    prompt_mask=torch.arange(5 + len(answer))[None] < 5)[0], alone.max())


def test_train_runs_every_rollout_and_updates_the_policy():
    trainer = tiny_trainer(actor_lr=1e-2, ppo_epochs=1)
    before = [p.detach().clone() for p in trainer.actor_critic.actor_parameters()]
    history = trainer.train(num_episodes=3, max_timesteps=2, update_timesteps=4, max_batch_size=2, max_seq_len=9)
    assert len(history) == 3  # 3 * 2 rollouts in batches of 2
    assert {"reward", "kl", "kl_coef", "response_length"} <= set(history[0])
    assert "policy_loss" in history[1] and "policy_loss" in history[2]  # an update at 4 and one at the end
    assert all(h["response_length"] == 9 - 5 for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.actor_critic.actor_parameters()))


def test_train_rejects_missing_prompts_and_a_too_short_context():
    with pytest.raises(ValueError, match="prompt_token_ids"):
        RLHFTrainer(palm=tiny_trainer().actor_critic.palm, reward_model=tiny_trainer().reward_model).train()
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_trainer().train(num_episodes=1, max_timesteps=1, max_seq_len=5)


def test_generate_rejects_a_seq_len_that_leaves_no_room_for_a_response():
    trainer = tiny_trainer()
    with pytest.raises(ValueError, match="seq_len"):
        trainer.generate(5, prompt=trainer.prompts[0], num_samples=2)
