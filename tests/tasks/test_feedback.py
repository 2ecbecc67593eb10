"""Simulated feedback: the pretrained policy's answers at each configured temperature, rated by the labeler."""

from dataclasses import asdict

import pandas as pd
import pytest
import torch

from models.palm import PaLM
from tasks.config import RewardConfig
from tasks.data.corpus import builtin_corpus
from tasks.data.files import text_digest
from tasks.data.labeler import load_labeler
from tasks.feedback import simulate_feedback
from tasks.data.tokenizer import ByteTokenizer
from tasks.data.tokenizer import record as tokenizer_record
from tasks.storage.checkpoints import save_checkpoint
from tasks.storage.inputs import resolve_input


@pytest.fixture
def pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("PALM_RLHF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PALM_RLHF_STORE", raising=False)
    torch.manual_seed(0)
    palm = PaLM(num_tokens=258, dim=32, depth=1, heads=2, dim_head=16, ff_mult=2, max_seq_len=64)
    with torch.no_grad():
        palm.token_emb.weight.mul_(10)  # logits with clear margins, so that T = 0.01 is as good as greedy
    tokenizer = ByteTokenizer()
    ref = save_checkpoint(str(tmp_path / "pretrained"), 1, palm.state_dict(), kind="palm",
                          model_config=asdict(palm.config), extra={"tokenizer": tokenizer_record(tokenizer)},
                          files={"tokenizer.json": tokenizer.to_file()})
    return resolve_input(ref.uri, "palm", "--pretrained")


def test_samples_of_each_prompt_take_the_temperatures_in_turn(pretrained):
    corpus = builtin_corpus()
    config = RewardConfig(num_prompts=5, samples_per_prompt=4, prompt_chars=16, response_tokens=10,
                          temperature=[1.0, 0.01])
    result = simulate_feedback(pretrained, config, corpus, text_digest(corpus), "cpu")
    ratings = pd.read_parquet(result["ratings_uri"])
    assert len(ratings) == 20 and ratings["prompt"].nunique() == 5
    hot_differ = 0
    for _, rows in ratings.groupby("prompt"):
        assert sorted(rows["temperature"]) == [0.01, 0.01, 1.0, 1.0]
        assert rows.loc[rows["temperature"] == 0.01, "response"].nunique() == 1  # near-greedy: one answer, twice
        hot_differ += rows.loc[rows["temperature"] == 1.0, "response"].nunique() == 2
    assert hot_differ >= 4  # at T = 1 the two answers to a prompt differ

    labeler = load_labeler(config.labeler, corpus)
    assert list(ratings["rating"]) == [labeler.rate(p, r) for p, r in zip(ratings["prompt"], ratings["response"])]
    assert result["mean_rating"] == pytest.approx(ratings["rating"].mean())

    again = simulate_feedback(pretrained, config, corpus, text_digest(corpus), "cpu")  # written once, then reused
    assert again == result
    other = simulate_feedback(pretrained, config.model_copy(update={"temperature": 1.0}), corpus, text_digest(corpus),
                              "cpu")
    assert other["ratings_uri"] != result["ratings_uri"]  # other settings are other data
    assert set(pd.read_parquet(other["ratings_uri"])["temperature"]) == {1.0}
