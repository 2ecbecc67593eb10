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


def test_the_reward_model_learns_from_the_tokens_that_were_sampled(pretrained, tmp_path):
    """Simulated feedback keeps each answer's sampled tokens (end-of-text included when it was sampled), and the
    reward stage trains on those, not on their text decoded and encoded again; a user's whole answers end with
    end-of-text, as the policy's do."""
    from tasks.data.tables import FITTED, RESPONSE_IDS, prepare_feedback, read_feedback

    corpus = builtin_corpus()
    config = RewardConfig(num_prompts=6, samples_per_prompt=2, prompt_chars=16, response_tokens=12, temperature=3.0)
    result = simulate_feedback(pretrained, config, corpus, text_digest(corpus), "cpu")
    tokenizer = pretrained.tokenizer
    table = read_feedback(result["ratings_uri"], rating_scale=(1, 5), empty_responses=True)
    sampled = [list(ids) for ids in table.frame[RESPONSE_IDS]]
    assert [tokenizer.decode(ids) for ids in sampled] == list(table.frame["response"])
    # at T = 3 byte sampling makes broken UTF-8, which does not survive decoding: the ids are what was sampled
    assert any(tokenizer.encode(tokenizer.decode(ids)) != [t for t in ids if t != tokenizer.eos_id] for ids in sampled)
    prepared = prepare_feedback(table, tokenizer, 64, "cut", result["ratings_uri"])
    assert [f.response for f in prepared.frame[FITTED]] == sampled

    users = table.frame[["prompt", "response", "rating"]].head(3)
    users.to_csv(tmp_path / "users.csv", index=False)
    mine = read_feedback(str(tmp_path / "users.csv"), rating_scale=(1, 5), empty_responses=True)
    fitted = prepare_feedback(mine, tokenizer, 64, "cut", "users.csv").frame[FITTED]
    assert [f.response for f in fitted] == [tokenizer.encode(r) + [tokenizer.eos_id] for r in mine.frame["response"]]


def test_sampling_precision_is_a_runtime_setting_that_feedback_draws_in(pretrained, monkeypatch):
    """`runtime.sampling_precision`: auto is fp32 on a CPU; bf16 draws the answers from a bf16 copy of the model (the
    very tokens that copy draws on the same seed); anything else is refused by name."""
    import copy

    from pydantic import ValidationError

    from tasks.data.tables import RESPONSE_IDS
    from tasks.data.tokens import encode_prompts, never_sampled
    from tasks.runtime.stage import sampling_dtype
    from tasks.storage.inputs import load_palm

    cpu = torch.device("cpu")
    assert sampling_dtype(RewardConfig().runtime, cpu) is None
    assert sampling_dtype(RewardConfig().runtime, torch.device("cuda")) == torch.bfloat16
    config = RewardConfig(num_prompts=4, samples_per_prompt=1, prompt_chars=16, response_tokens=12, temperature=1.0)
    config.runtime.sampling_precision = "bf16"
    assert sampling_dtype(config.runtime, cpu) == torch.bfloat16
    with pytest.raises(ValidationError, match="sampling_precision"):
        config.runtime.sampling_precision = "fp16"

    sampled_in, sample = [], PaLM.sample

    def spy(self, *args, **kwargs):  # which weights drew the tokens
        sampled_in.append(self.token_emb.weight.dtype)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(PaLM, "sample", spy)
    corpus = builtin_corpus()
    rows = pd.read_parquet(simulate_feedback(pretrained, config, corpus, text_digest(corpus), "cpu",
                                             sampling_dtype(config.runtime, cpu))["ratings_uri"])
    assert set(sampled_in) == {torch.bfloat16}
    tokenizer = pretrained.tokenizer
    ids, mask = encode_prompts(list(rows["prompt"]), tokenizer)
    palm = copy.deepcopy(load_palm(pretrained, "cpu").eval()).to(torch.bfloat16)
    with torch.no_grad():
        gen = sample(palm, ids, mask, 12, filter_thres=0.0, generator=torch.Generator().manual_seed(config.seed),
                     eos_token=tokenizer.eos_id, pad_value=tokenizer.pad_id,
                     suppress_tokens=never_sampled(tokenizer, palm.config.num_tokens))
    assert [list(r) for r in rows[RESPONSE_IDS]] == [row[m].tolist() for row, m in zip(gen.tokens, gen.mask)]

    sampled_in.clear()
    config.runtime.sampling_precision = "auto"
    simulate_feedback(pretrained, config.model_copy(update={"num_prompts": 2}), corpus, text_digest(corpus), "cpu",
                      sampling_dtype(config.runtime, cpu))
    assert set(sampled_in) == {torch.float32}
