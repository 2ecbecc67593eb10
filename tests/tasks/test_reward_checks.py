"""The reward stage's held-out checks: each held-out row scored once, in batches of like length, must give what
scoring every row and every side of every pair on its own gives."""

import pandas as pd
import pytest
import torch

from models.palm import PaLM, PaLMConfig
from models.reward import RewardModel
from tasks.config import RewardConfig
from tasks.data.tables import FITTED, pairs_from_ratings, prepare_feedback, read_feedback
from tasks.data.tokenizer import ByteTokenizer
from tasks.data.tokens import dialogue_batch
from tasks.reward import HeldoutPairs, heldout_metrics, likelihood_pair_accuracy, mean_loglik, pair_accuracy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig(num_tokens=258, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=96))
    rm = RewardModel(palm, lora_r=4, head="per-token", head_hidden=16)
    with torch.no_grad():  # a head that is not near zero everywhere, so the scores differ from row to row
        for p in rm.to_pred.parameters():
            p.normal_(0, 0.5)
    prompts = ["The cat", "A long prompt about the weather today", "x"]
    responses = ["sat.", "is grey and wet, with rain all afternoon", "y", "", "ok then, more words here",
                 "no", "quite a long answer that goes on"]
    rows = [(p, r, float(1 + (i * 7 + j * 3) % 5)) for i, p in enumerate(prompts) for j, r in enumerate(responses)]
    rows.append((prompts[1], responses[1], 2.0))  # the same answer rated twice: counted once, at its mean
    path = tmp_path_factory.mktemp("fb") / "ratings.csv"
    pd.DataFrame(rows, columns=["prompt", "response", "rating"]).to_csv(path, index=False)
    table = read_feedback(str(path), rating_scale=(1, 5), empty_responses=True)
    feedback = prepare_feedback(table, ByteTokenizer(), 96, "cut", str(path))
    return rm, feedback, ByteTokenizer().pad_id


def one_by_one(rm, fitted, pad_id):
    out = []
    for f in fitted:
        ids, mask, pmask = dialogue_batch([f], pad_id)
        out.append(float(rm.score(ids, mask=mask, prompt_mask=pmask)))
    return torch.tensor(out)


@torch.no_grad()
def test_heldout_pair_accuracy_and_rmse_equal_scoring_every_pair_side_alone(setup):
    rm, feedback, pad_id = setup
    rm.eval()
    frame, config = feedback.frame, RewardConfig(pair_margin=1.5)
    pairs = HeldoutPairs(feedback, frame, config, (1, 5))
    metrics = heldout_metrics(rm, pairs, (1, 5), 0, pad_id, "cpu")

    # independently: the pairs from the ratings, each side scored in a batch of its own
    expected_pairs = pairs_from_ratings(frame, min_margin=1.5 * 4 / 4, seed=config.seed)
    fitted = {(p, r): f for p, r, f in zip(frame["prompt"], frame["response"], frame[FITTED])}
    chosen = one_by_one(rm, [fitted[k] for k in zip(expected_pairs["prompt"], expected_pairs["chosen"])], pad_id)
    rejected = one_by_one(rm, [fitted[k] for k in zip(expected_pairs["prompt"], expected_pairs["rejected"])], pad_id)
    assert metrics["heldout_pairs"] == len(expected_pairs) > 5
    assert metrics["heldout_pair_accuracy"] == pytest.approx(pair_accuracy(chosen, rejected))
    alone = one_by_one(rm, list(frame[FITTED]), pad_id)
    ratings = 1 + (alone + 1) / 2 * 4
    truth = torch.tensor(frame["rating"].to_numpy(dtype=float), dtype=torch.float32)
    assert metrics["heldout_rating_rmse"] == pytest.approx(float(((ratings - truth) ** 2).mean().sqrt()), abs=1e-5)
    # and the scores read off the rows are the sides' own scores
    got_chosen, got_rejected = pairs.scores(lambda rows: one_by_one(rm, rows, pad_id))
    torch.testing.assert_close(got_chosen, chosen)
    torch.testing.assert_close(got_rejected, rejected)


@torch.no_grad()
def test_rows_scored_in_length_order_come_back_in_their_own_order(setup):
    rm, feedback, pad_id = setup
    from tasks.reward import score_rows

    rows = list(feedback.frame[FITTED])
    lengths = [len(f.prompt) + len(f.response) for f in rows]
    assert lengths != sorted(lengths)  # the order matters in this test
    rm.train()
    torch.testing.assert_close(score_rows(rm, rows, pad_id, "cpu", batch=4), one_by_one(rm, rows, pad_id), atol=1e-5,
                               rtol=1e-5)
    assert rm.training  # scoring leaves the model as it found it

    palm = rm.palm
    expected = []
    for f in rows:
        ids = torch.tensor([f.prompt + f.response])
        logp = palm(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)[0]
        expected.append(float(logp[len(f.prompt) - 1:].mean()) if f.response else 0.0)
    torch.testing.assert_close(mean_loglik(palm, rows, pad_id, "cpu", batch=4), torch.tensor(expected), atol=1e-5,
                               rtol=1e-5)


@torch.no_grad()
def test_likelihood_pair_accuracy_reads_the_rows_mean_log_likelihoods(setup):
    rm, feedback, pad_id = setup
    frame = feedback.frame
    pairs = HeldoutPairs(feedback, frame, RewardConfig(pair_margin=1.5), (1, 5))
    per_row = mean_loglik(rm.palm, list(frame[FITTED]), pad_id, "cpu", batch=1)
    position = {}
    for i, k in enumerate(zip(frame["prompt"], frame["response"])):
        position.setdefault(k, i)
    expected_pairs = pairs_from_ratings(frame, min_margin=1.5, seed=0)
    chosen = per_row[[position[k] for k in zip(expected_pairs["prompt"], expected_pairs["chosen"])]]
    rejected = per_row[[position[k] for k in zip(expected_pairs["prompt"], expected_pairs["rejected"])]]
    assert likelihood_pair_accuracy(rm.palm, pairs, pad_id, "cpu") == pytest.approx(pair_accuracy(chosen, rejected))
