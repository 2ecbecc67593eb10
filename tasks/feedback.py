"""Simulated human feedback: the pretrained policy answers training prompts and a labeler rates the answers.

The ratings land in the store as Parquet, and the reward stage reads them like any user's feedback file (it derives
the held-out pairs itself). The reward model only ever sees these ratings, never the labeler's code.

They are kept under `<store>/feedback/<data key>/<code key>/`: the data key is what they were made from (the
pretrained model, the corpus, the labeler, the settings), the code key the fingerprint of the code that sampled and
rated them (tasks/runtime/fingerprint.py), so a fix to sampling makes new feedback. `reward.runtime.reuse_across_code`
takes feedback made from the same data by other code when none of this code exists.
"""

from __future__ import annotations

import hashlib
import json
import logging

import fsspec
import pandas as pd
import torch

from models.sampling import in_precision
from tasks.config import RewardConfig
from tasks.data.labeler import labeler_identity, load_labeler, rate_all
from tasks.data.prompts import make_prompts
from tasks.data.tables import RESPONSE_IDS, write_feedback
from tasks.data.tokens import check_prompts_fit, decode_responses, encode_prompts, never_sampled
from tasks.runtime.fingerprint import stage_code
from tasks.runtime.progress import progress_bar
from tasks.storage.inputs import ModelInput, load_palm
from tasks.storage.store import join_uri, store_root


log = logging.getLogger(__name__)


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def feedback_prefix(pretrained: ModelInput, config: RewardConfig, corpus_digest: str, labeler: str) -> str:
    fields = ("num_prompts", "samples_per_prompt", "prompt_chars", "response_tokens", "temperature", "seed")
    payload = {"pretrained": pretrained.digest, "corpus": corpus_digest, "labeler": labeler,
               **{f: getattr(config, f) for f in fields}}
    return join_uri(store_root(), "feedback", _digest(payload), _digest(stage_code("feedback")))


def _done_marker(prefix: str) -> dict | None:
    try:
        with fsspec.open(join_uri(prefix, "_SUCCESS.json"), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _made_by_other_code(prefix: str) -> dict | None:
    """Complete feedback from the same data by any code (the newest): what reuse_across_code takes."""
    fs, path = fsspec.core.url_to_fs(prefix.rsplit("/", 1)[0])
    fs.invalidate_cache()
    markers = [m for m in fs.glob(f"{path}/*/_SUCCESS.json")]
    if not markers:
        return None
    newest = max(markers, key=lambda m: fs.info(m).get("LastModified") or fs.info(m).get("mtime") or 0)
    with fs.open(newest, "r") as f:
        done = json.load(f)
    log.warning("simulated feedback: reusing %s, made by code %s, for this code (%s), as "
                "reward.runtime.reuse_across_code asks", done["ratings_uri"], done.get("code", "of an unknown version"),
                stage_code("feedback"))
    return done


def simulate_feedback(pretrained: ModelInput, config: RewardConfig, corpus_text: str, corpus_digest: str,
                      device, sample_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Write ratings.parquet; returns its URI, digest and mean rating. Reused when already written. The answers are
    drawn in `sample_dtype` (None: fp32)."""
    labeler = load_labeler(config.labeler, corpus_text)
    prefix = feedback_prefix(pretrained, config, corpus_digest, labeler_identity(labeler, config.labeler))
    done = _done_marker(prefix)
    if done is None and config.runtime.reuse_across_code:
        done = _made_by_other_code(prefix)
    if done is not None:
        return done
    prompts = make_prompts(corpus_text, config.num_prompts, config.prompt_chars, split="train", seed=config.seed)
    tokenizer = pretrained.tokenizer
    check_prompts_fit(prompts, tokenizer, pretrained.palm_config["max_seq_len"], config.response_tokens,
                      "reward.feedback")
    palm = in_precision(load_palm(pretrained, device).eval(), sample_dtype)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rows_prompt, rows_response, rows_ids, rows_temperature = [], [], [], []
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
                ids, mask = encode_prompts(chunk, tokenizer)
                gen = palm.sample(ids.to(device), mask.to(device), config.response_tokens,
                                  temperature=temperature, filter_thres=0.0, generator=generator,
                                  eos_token=tokenizer.eos_id, pad_value=tokenizer.pad_id,
                                  suppress_tokens=never_sampled(tokenizer, palm.config.num_tokens))
                rows_prompt += chunk
                rows_response += decode_responses(gen.tokens.cpu(), gen.mask.cpu(), tokenizer)
                rows_ids += [row[m].tolist() for row, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
                rows_temperature += [temperature] * len(chunk)
            show(min(start + per_batch, len(prompts)))
    ratings = pd.DataFrame({"prompt": rows_prompt, "response": rows_response,
                            "rating": rate_all(labeler, rows_prompt, rows_response),
                            RESPONSE_IDS: rows_ids,  # what the reward model trains on: the tokens as sampled
                            "temperature": rows_temperature})  # kept for people; the reward model never reads it
    result = {"ratings_uri": join_uri(prefix, "ratings.parquet")}
    result["ratings_digest"] = write_feedback(ratings, result["ratings_uri"])
    result["mean_rating"] = float(ratings["rating"].mean())
    result["code"] = stage_code("feedback")
    with fsspec.open(join_uri(prefix, "_SUCCESS.json"), "w") as f:  # written last: the tables are complete
        json.dump(result, f)
    return result

