"""A team's own data, as it comes: preference pairs shaped like public sets (whole dialogues, Unicode, rows too long,
rows repeated) and thumbs-up/down ratings run through reward fitting, PPO on the feedback's own prompts, and an
evaluation that makes up no stars; a checkpoint never meets another tokenizer's."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.config import apply_overrides, tiny
from tasks.data.tables import FeedbackError
from tasks.evaluate import run_eval
from tasks.ppo import run_ppo
from tasks.pretrain import run_pretrain
from tasks.reward import run_reward
from tasks.storage.checkpoints import read_manifest
from tasks.storage.inputs import InputError

pytestmark = pytest.mark.timeout(900)
WORDS = ["the", "value", "returns", "module", "function", "naïve", "café", "東京", "größer", "🙂"]


def dialogue(i: int, turns: int) -> str:
    """A multi-turn conversation in the Anthropic HH layout, its length growing with `turns`."""
    text = ""
    for t in range(turns):
        text += (f"\n\nHuman: {WORDS[(i + t) % len(WORDS)]} question {i}.{t}, with some detail "
                 f"{' '.join(WORDS[:(i + t) % 4 + 1])}?\n\nAssistant: answer {t}")
    return text + f"\n\nHuman: and finally, {i}?\n\nAssistant:"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-data")
    patch = pytest.MonkeyPatch()
    patch.setenv("PALM_RLHF_HOME", str(root / "home"))
    for var in ("PALM_RLHF_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_EXPERIMENT"):
        patch.delenv(var, raising=False)
    pretrained = run_pretrain(tiny().pretrain)
    rows = []
    for i in range(40):
        prompt = dialogue(i, (i % 3) * 4)  # a third fit the 96-token context; the others are far longer
        rows.append({"chosen": f"{prompt} A clear answer, {WORDS[i % len(WORDS)]}.", "rejected": f"{prompt} no."})
    rows += rows[:5]  # repeated rows
    pd.DataFrame(rows).to_json(root / "hh.jsonl", orient="records", lines=True, force_ascii=False)
    thumbs = [{"prompt": f"Question {i}: {WORDS[i % len(WORDS)]}?", "response": r, "rating": int(good)}
              for i in range(30) for r, good in ((" a real answer", True), (" zzq xx", False))]
    pd.DataFrame(thumbs).to_csv(root / "thumbs.csv", index=False)
    yield {"root": root, "pretrained": pretrained}
    patch.undo()


def settings(*extra: str):
    return apply_overrides(tiny(), ["reward.steps=4", "reward.checkpoint_every=4", "ppo.steps=2",
                                    "ppo.checkpoint_every=2", *extra])


def test_dialogue_pairs_run_through_reward_ppo_and_an_evaluation_without_an_oracle(home):
    config = settings(f"reward.feedback={home['root'] / 'hh.jsonl'}")
    pretrained = home["pretrained"].checkpoint_uri
    reward = run_reward(config.reward, pretrained)
    m = reward.metrics
    assert m["feedback.duplicates_dropped"] == 5 and m["feedback.rows"] == 40
    assert m["feedback.rows_cut"] > 0 and m["feedback.tokens_cut"] > m["feedback.rows_cut"]
    manifest = read_manifest(reward.checkpoint_uri)
    assert manifest["feedback"]["kind"] == "pairs" and not manifest["feedback"]["simulated"]
    train_prompts = _prompts(manifest["prompts"]["train"]["uri"])
    heldout_prompts = _prompts(manifest["prompts"]["heldout"]["uri"])
    assert train_prompts and heldout_prompts and not set(train_prompts) & set(heldout_prompts)
    assert all(p.endswith("Assistant:") for p in train_prompts)  # the dialogues' shared beginnings

    policy = run_ppo(config.ppo, pretrained, reward.checkpoint_uri)
    room = 96 - config.ppo.max_new_tokens  # a prompt with no room to answer keeps its end (bytes: one token each)
    expected = [next(p[i:] for i in range(len(p)) if len(p[i:].encode()) <= room) for p in train_prompts]
    assert read_manifest(policy.checkpoint_uri)["data"]["prompts"] == _digest(expected)
    assert expected != train_prompts

    evaluation = run_eval(apply_overrides(config, ["eval.max_new_tokens=8"]).eval, pretrained,
                          reward.checkpoint_uri, policy.checkpoint_uri)
    e = evaluation.metrics
    assert not [k for k in e if k.startswith("oracle_mean")], "no stars made up for the user's data"
    assert 0 <= e["win_rate.ppo.ci_low"] <= e["win_rate.ppo"] <= e["win_rate.ppo.ci_high"] <= 1
    assert e["win_rate.ppo"] == e["reward_win_rate.ppo"]  # judged by the reward model, there being no oracle
    assert {"kl_per_token.ppo", "response_length.ppo.p50", "stopped.ppo", "distinct_2.ppo"} <= set(e)


def test_thumbs_ratings_keep_their_scale(home):
    config = settings(f"reward.feedback={home['root'] / 'thumbs.csv'}")
    reward = run_reward(config.reward, home["pretrained"].checkpoint_uri)
    manifest = read_manifest(reward.checkpoint_uri)
    assert manifest["rating_scale"] == [0.0, 1.0] and manifest["feedback"]["rating_scale"] == [0.0, 1.0]
    assert 0 <= reward.metrics["heldout_rating_rmse"] < 1.5  # in thumbs, not in five-star units
    policy = run_ppo(config.ppo, home["pretrained"].checkpoint_uri, reward.checkpoint_uri)
    assert policy.metrics["response_length"] > 0


@pytest.mark.parametrize("rule,expected", [("drop", None),
                                           ("error", r"26 rows \(first: row 1; rows 1, 2, 4, .*\) longer than the "
                                                     r"model's context of 96 tokens")])
def test_rows_too_long_are_dropped_or_refused_as_asked(home, rule, expected):
    config = settings(f"reward.feedback={home['root'] / 'hh.jsonl'}", f"reward.on_too_long={rule}")
    if expected is None:
        m = run_reward(config.reward, home["pretrained"].checkpoint_uri).metrics
        assert m["feedback.too_long_dropped"] > 0 and m["feedback.rows_cut"] == 0
        assert m["feedback.rows"] == 40 - m["feedback.too_long_dropped"]
    else:
        with pytest.raises(FeedbackError, match=expected):
            run_reward(config.reward, home["pretrained"].checkpoint_uri)


def test_a_checkpoint_is_never_paired_with_another_tokenizer(home):
    bpe = run_pretrain(apply_overrides(tiny(), ["pretrain.tokenizer=bpe", "pretrain.vocab_size=320"]).pretrain)
    assert read_manifest(bpe.checkpoint_uri)["tokenizer"]["kind"] == "bpe"
    reward = run_reward(settings().reward, home["pretrained"].checkpoint_uri)  # fitted on the bytes model
    with pytest.raises(InputError, match="were trained with different tokenizers"):
        run_ppo(settings().ppo, bpe.checkpoint_uri, reward.checkpoint_uri)


def _prompts(uri: str) -> list[str]:
    from tasks.data.prompts import read_prompts

    return read_prompts(uri)


def _digest(prompts: list[str]) -> str:
    from tasks.data.files import text_digest

    return text_digest("\n".join(prompts))


def test_prompt_sets_are_json_lines_that_keep_multi_line_prompts(home):
    config = settings(f"reward.feedback={home['root'] / 'hh.jsonl'}")
    manifest = read_manifest(run_reward(config.reward, home["pretrained"].checkpoint_uri).checkpoint_uri)
    from fsspec import open as fs_open

    with fs_open(manifest["prompts"]["train"]["uri"], "r", encoding="utf-8") as f:
        first = json.loads(f.readline())["prompt"]
    assert "\n\nHuman:" in first and first.endswith("Assistant:")


def test_a_model_that_learned_where_documents_end_stops_its_answers_there(home, tmp_path):
    """Short documents separated by end-of-text markers: the pretrained model learns to stop, so answers end at
    different lengths in generation, in PPO's rollouts and in the evaluation's length report."""
    import random

    from tasks.serving.generation import GenerationParams, complete
    from tasks.serving.requests import open_model

    words, rng = "the cat dog sat ran far away home big small red".split(), random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + "." for _ in range(3000)]
    (tmp_path / "short.txt").write_text("<|endoftext|>".join(docs))
    config = apply_overrides(tiny(), [f"pretrain.corpus={tmp_path / 'short.txt'}", "pretrain.steps=120",
                                      "pretrain.lr=0.01", "pretrain.checkpoint_every=120", "pretrain.eval_every=120",
                                      "reward.steps=2", "reward.checkpoint_every=2", "ppo.steps=2",
                                      "ppo.checkpoint_every=2", "ppo.max_new_tokens=24", "eval.max_new_tokens=24",
                                      "eval.n_values=[1,2]"])
    pretrained = run_pretrain(config.pretrain)
    bundle = open_model(pretrained.checkpoint_uri, device="cpu")
    answers = complete(bundle, ["the cat", "a dog ran", "big", "red home far"], GenerationParams(max_new_tokens=40))
    lengths = [len(bundle.tokenizer.encode(a["completion"])) for a in answers]
    assert all(n < 40 for n in lengths) and len(set(lengths)) > 1, lengths

    reward = run_reward(config.reward, pretrained.checkpoint_uri)
    policy = run_ppo(config.ppo, pretrained.checkpoint_uri, reward.checkpoint_uri)
    assert policy.metrics["response_length"] < 24
    e = run_eval(config.eval, pretrained.checkpoint_uri, reward.checkpoint_uri, policy.checkpoint_uri).metrics
    assert e["stopped.pretrained"] > 0.5 and e["response_length.pretrained.p10"] < e["response_length.pretrained.p90"]
