"""Simulated human feedback: the pretrained policy answers training prompts and a labeler rates the answers.

The tables land in the store as Parquet (ratings, and pairs derived from them), and the reward stage reads them like
any user's feedback file. The reward model only ever sees these ratings, never the labeler's code.
"""

from __future__ import annotations

import hashlib
import json

import fsspec
import pandas as pd
import torch

from tasks.config import RewardConfig
from tasks.data import make_prompts, pairs_from_ratings, write_feedback
from tasks.inputs import ModelInput, load_palm
from tasks.labeler import labeler_identity, load_labeler, rate_all
from tasks.progress import progress_bar
from tasks.store import join_uri, store_root
from tasks.tokens import check_prompts_fit, decode_responses, encode_prompts


def feedback_prefix(pretrained: ModelInput, config: RewardConfig, corpus_digest: str, labeler: str) -> str:
    fields = ("num_prompts", "samples_per_prompt", "prompt_chars", "response_tokens", "temperature",
              "pair_margin", "seed")
    payload = {"pretrained": pretrained.digest, "corpus": corpus_digest, "labeler": labeler,
               **{f: getattr(config, f) for f in fields}}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return join_uri(store_root(), "feedback", key)


def _done_marker(prefix: str) -> dict | None:
    try:
        with fsspec.open(join_uri(prefix, "_SUCCESS.json"), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def simulate_feedback(pretrained: ModelInput, config: RewardConfig, corpus_text: str, corpus_digest: str,
                      device) -> dict[str, str]:
    """Write ratings.parquet and pairs.parquet; returns their URIs and digests. Reused when already written."""
    labeler = load_labeler(config.labeler, corpus_text)
    prefix = feedback_prefix(pretrained, config, corpus_digest, labeler_identity(labeler, config.labeler))
    done = _done_marker(prefix)
    if done is not None:
        return done
    prompts = make_prompts(corpus_text, config.num_prompts, config.prompt_chars, split="train", seed=config.seed)
    check_prompts_fit(prompts, pretrained.palm_config["max_seq_len"], config.response_tokens, "reward.feedback")
    palm = load_palm(pretrained, device).eval()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rows_prompt, rows_response, rows_temperature = [], [], []
    temperatures = config.temperatures
    # sample j of each prompt is drawn at temperatures[j % len(temperatures)]
    counts = [len(range(i, config.samples_per_prompt, len(temperatures))) for i in range(len(temperatures))]
    per_batch = max(1, 64 // max(counts))  # prompts per batch: about 64 rows in each generation
    with progress_bar("feedback", len(prompts)) as show:
        for start in range(0, len(prompts), per_batch):
            for temperature, count in zip(temperatures, counts):
                if not count:
                    continue
                chunk = [p for p in prompts[start:start + per_batch] for _ in range(count)]
                ids, mask = encode_prompts(chunk)
                gen = palm.sample(ids.to(device), mask.to(device), config.response_tokens,
                                  temperature=temperature, filter_thres=0.0, generator=generator)
                rows_prompt += chunk
                rows_response += decode_responses(gen.tokens.cpu(), gen.mask.cpu())
                rows_temperature += [temperature] * len(chunk)
            show(min(start + per_batch, len(prompts)))
    ratings = pd.DataFrame({"prompt": rows_prompt, "response": rows_response,
                            "rating": rate_all(labeler, rows_prompt, rows_response),
                            "temperature": rows_temperature})  # kept for people; the reward model never reads it
    pairs = pairs_from_ratings(ratings, min_margin=config.pair_margin, seed=config.seed)
    result = {"ratings_uri": join_uri(prefix, "ratings.parquet"), "pairs_uri": join_uri(prefix, "pairs.parquet")}
    result["ratings_digest"] = write_feedback(ratings, result["ratings_uri"])
    result["pairs_digest"] = write_feedback(pairs, result["pairs_uri"])
    result["mean_rating"] = float(ratings["rating"].mean())
    with fsspec.open(join_uri(prefix, "_SUCCESS.json"), "w") as f:  # written last: the tables are complete
        json.dump(result, f)
    return result

