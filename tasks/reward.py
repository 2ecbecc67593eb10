"""Stage 2: fit a reward model on feedback, through a LoRA scope on the pretrained PaLM.

Feedback is ratings (prompt, response, rating) or pairs (prompt, chosen, rejected). Ratings train a scalar head
(MSE on the rating) or a binned head (cross-entropy); pairs train with the pairwise loss. Rows are split into train
and held-out by prompt, so held-out prompts are never seen in training. Held-out pairwise accuracy is reported for both
shapes (for ratings, over pairs derived from the held-out ratings), plus the rating RMSE for ratings.
"""

from __future__ import annotations

import hashlib
import math
from functools import partial

import pandas as pd
import torch

from models.palm import PaLM
from models.training import capture_rng, finite_or_raise, lr_at, set_lr, train_step
from tasks import distributed, tracking
from tasks.config import RewardConfig
from tasks.data import FeedbackTable, make_prompts, pairs_from_ratings, read_feedback
from tasks.feedback import simulate_feedback
from tasks.inputs import ModelInput, build_reward_model, load_palm, resolve_input, training_corpus
from tasks.labeler import load_labeler
from tasks.progress import progress_bar
from tasks.redact import redact_uri
from tasks.stage import StageResult, StageRun, Throughput, log_curves, resolve_runtime, resume_into
from tasks.store import CheckpointRef, load_checkpoint, save_checkpoint
from tasks.tokens import check_prompts_fit, encode_dialogues

MODEL_NAME = "palm-reward"
MIN_RATING, MAX_RATING = 1.0, 5.0


def split_by_prompt(frame: pd.DataFrame, heldout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out rows are those whose prompt hashes into the held-out share: no prompt is on both sides."""
    bucket = frame["prompt"].map(lambda p: int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 1000 / 1000)
    heldout = bucket < heldout_fraction
    return frame[~heldout].reset_index(drop=True), frame[heldout].reset_index(drop=True)


def _targets(ratings: pd.Series, bins: int) -> torch.Tensor:
    """Scalar head: the rating centred to [-1, 1]. Binned head: the bin index of the rating."""
    r = torch.tensor(ratings.to_numpy(dtype=float), dtype=torch.float32)
    unit = (r - MIN_RATING) / (MAX_RATING - MIN_RATING)
    return (unit * (bins - 1)).round().long() if bins else unit * 2 - 1


def _to_stars(score: torch.Tensor, bins: int) -> torch.Tensor:
    unit = score / (bins - 1) if bins else (score + 1) / 2
    return MIN_RATING + unit * (MAX_RATING - MIN_RATING)


@torch.no_grad()
def score_texts(rm, prompts: list[str], responses: list[str], context: int, device, batch: int = 64) -> torch.Tensor:
    rm.eval()
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask, pmask = encode_dialogues(prompts[i:i + batch], responses[i:i + batch], context)
        out.append(rm.score(ids.to(device), mask=mask.to(device), prompt_mask=pmask.to(device)).float().cpu())
    rm.train()
    return torch.cat(out) if out else torch.zeros(0)


def heldout_metrics(rm, table: FeedbackTable, heldout: pd.DataFrame, config: RewardConfig, context: int,
                    device) -> dict[str, float]:
    metrics = {}
    if table.kind == "ratings":
        scores = score_texts(rm, list(heldout["prompt"]), list(heldout["response"]), context, device)
        stars = _to_stars(scores, config.num_binned_output)
        truth = torch.tensor(heldout["rating"].to_numpy(dtype=float), dtype=torch.float32)
        metrics["heldout_rating_rmse"] = float(((stars - truth) ** 2).mean().sqrt())
        pairs = pairs_from_ratings(heldout, min_margin=config.pair_margin, seed=config.seed)
    else:
        pairs = heldout
    if len(pairs):
        chosen = score_texts(rm, list(pairs["prompt"]), list(pairs["chosen"]), context, device)
        rejected = score_texts(rm, list(pairs["prompt"]), list(pairs["rejected"]), context, device)
        metrics["heldout_pair_accuracy"] = float((chosen > rejected).float().mean())
    else:  # every held-out rating tied: accuracy is undefined, and says so rather than inventing a number
        metrics["heldout_pair_accuracy"] = float("nan")
    metrics["heldout_pairs"] = float(len(pairs))
    return metrics


def _batch_loss(rm, rows: pd.DataFrame, kind: str, bins: int, context: int, device):
    if kind == "ratings":
        ids, mask, pmask = encode_dialogues(list(rows["prompt"]), list(rows["response"]), context)
        return rm(ids.to(device), mask=mask.to(device), prompt_mask=pmask.to(device),
                  labels=_targets(rows["rating"], bins).to(device))
    c_ids, c_mask, c_pmask = encode_dialogues(list(rows["prompt"]), list(rows["chosen"]), context)
    r_ids, r_mask, r_pmask = encode_dialogues(list(rows["prompt"]), list(rows["rejected"]), context)
    loss, accuracy = rm.preference_loss(c_ids.to(device), r_ids.to(device), chosen_mask=c_mask.to(device),
                                        rejected_mask=r_mask.to(device), chosen_prompt_mask=c_pmask.to(device),
                                        rejected_prompt_mask=r_pmask.to(device))
    return loss, {"accuracy": accuracy}


def head_config(config: RewardConfig) -> dict:
    """The reward model's own architecture, as its checkpoint's manifest records it (beside the PaLM's)."""
    return {"num_binned_output": config.num_binned_output, "lora_r": config.lora_r, "head": config.head,
            "head_hidden": config.head_hidden}


def train(run: StageRun, config: RewardConfig, pretrained: ModelInput, table: FeedbackTable,
          feedback_uri: str) -> tuple[CheckpointRef, dict[str, float]]:
    context = pretrained.palm_config["max_seq_len"]
    train_rows, heldout = split_by_prompt(table.frame, config.heldout_fraction)
    palm = load_palm(pretrained, "cpu")
    torch.manual_seed(config.seed)  # the LoRA and head initialisation
    rm = build_reward_model(palm, head_config(config))
    rm = rm.to(run.device)
    for p in rm.palm.base_parameters():
        p.requires_grad_(False)
    data_rng = torch.Generator().manual_seed(config.seed)  # the same global batches on every rank
    start, ckpt = resume_into(run, rm, {"data": data_rng})
    # DDP or FSDP across ranks; in one process, _batch_loss(rm, ...) itself
    batch_loss = distributed.data_parallel(distributed.LossModule(rm, _batch_loss), config.runtime)
    params = rm.finetune_parameters()  # after FSDP, which replaces the parameters it shards
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if ckpt is not None:
        distributed.load_optimizer_state(rm, optimizer, ckpt.state["optimizer"])

    model_config = {"palm": pretrained.palm_config, **head_config(config)}
    clock, ref, metrics = Throughput(), run.resume_from, {}
    with progress_bar("reward", config.steps, start) as show:
        for step in range(start, config.steps):
            lr = lr_at(step, lr=config.lr, warmup_steps=min(20, config.steps // 10), total_steps=config.steps)
            set_lr(optimizer, lr)
            idx = distributed.shard(torch.randint(0, len(train_rows), (config.batch_size,), generator=data_rng))
            rows = train_rows.iloc[idx.tolist()]
            done, last = step + 1, step + 1 == config.steps
            try:  # a non-finite number stops the stage before it is logged or checkpointed
                stats = train_step(distributed.global_loss(
                    lambda: batch_loss(rows, table.kind, config.num_binned_output, context, run.device)),
                    params, optimizer, device=run.device, amp_dtype=run.amp_dtype)
                metrics = {"loss": stats["loss"], "lr": lr, "examples_per_s": clock.rate(config.batch_size)}
                if "accuracy" in stats:
                    metrics["train_pair_accuracy"] = stats["accuracy"]
                if done % config.checkpoint_every == 0 or last:
                    with distributed.gathered(batch_loss):  # every rank evaluates: FSDP gathers collectively
                        metrics.update(heldout_metrics(rm, table, heldout, config, context, run.device))
                    extra = {"feedback": {"uri": feedback_uri, "digest": table.digest, "kind": table.kind},
                             "metrics": {k: v for k, v in metrics.items()
                                         if k != "examples_per_s" and math.isfinite(v)}}
                if last:
                    with distributed.gathered(batch_loss):
                        scores = score_texts(rm, *_all_texts(train_rows, table.kind), context, run.device)
                    extra["score_norm"] = {"mean": float(scores.mean()), "std": float(scores.std().clamp(min=1e-6))}
                    finite_or_raise("the mean reward-model score", extra["score_norm"]["mean"])
                for name in ("loss", "heldout_rating_rmse"):  # pair accuracy is NaN when no held-out pair exists
                    finite_or_raise(name, metrics.get(name, 0.0))
            except FloatingPointError as err:
                kept = (f"the last good checkpoint, step {ref.step}, is kept: {ref.uri}" if ref
                        else "no checkpoint was written")
                raise FloatingPointError(f"reward stopped at step {done} (lr {lr:.3g}): {err}; {kept}") from None
            run.metrics.log(done, **metrics)
            show(done, loss=stats["loss"], **{k: v for k, v in metrics.items() if k.startswith("heldout_pair")})
            if done % config.checkpoint_every == 0 or last:
                run.metrics.flush()  # the curve up to a checkpoint outlives a crash; a resume logs only later steps
                weights, optimizer_state = distributed.full_state(rm, optimizer)
                if distributed.is_main():
                    ref = save_checkpoint(run.prefix, done, weights, kind="reward", model_config=model_config,
                                          stage_config=config.model_dump(mode="json"),
                                          parents=[{"uri": pretrained.checkpoint_uri, "digest": pretrained.digest}],
                                          data={"feedback": table.digest}, extra=extra,
                                          state={"optimizer": optimizer_state, "rng": capture_rng({"data": data_rng})})
                distributed.barrier()
    run.metrics.flush()
    scorer, score_device = distributed.plain_copy(
        rm, lambda: build_reward_model(PaLM.from_config(pretrained.palm_config), model_config))
    if not distributed.is_main():  # rank 0 reports; the stage returns its result
        return ref, {}
    final = load_checkpoint(ref.uri, load_state=False).manifest["metrics"]
    log_curves(run, ["loss", "heldout_pair_accuracy"], "reward model", "plots/reward.png")
    log_scored_examples(run.run_id, scorer, heldout.head(16), table.kind, context, score_device)
    headline = {"heldout_pair_accuracy": float("nan")}  # stays NaN when no held-out pair exists (all ratings tied)
    headline.update({k: v for k, v in final.items() if k.startswith("heldout_") or k == "loss"})
    return ref, headline


def log_scored_examples(run_id: str, rm, rows: pd.DataFrame, kind: str, context: int, device) -> None:
    """Held-out feedback beside the reward model's scores, for people to check what it learned."""
    rows = rows.copy()
    if kind == "ratings":
        rows["reward_model_score"] = score_texts(rm, list(rows["prompt"]), list(rows["response"]), context,
                                                 device).tolist()
    else:
        for side in ("chosen", "rejected"):
            rows[f"score_{side}"] = score_texts(rm, list(rows["prompt"]), list(rows[side]), context, device).tolist()
    tracking.log_table(run_id, rows, "samples/heldout_scored.json")


def _all_texts(rows: pd.DataFrame, kind: str) -> tuple[list[str], list[str]]:
    if kind == "ratings":
        return list(rows["prompt"]), list(rows["response"])
    return list(rows["prompt"]) * 2, list(rows["chosen"]) + list(rows["rejected"])


def _check_split(frame: pd.DataFrame, config: RewardConfig, what: str) -> None:
    train_rows, heldout = split_by_prompt(frame, config.heldout_fraction)
    if len(train_rows) < 2 or len(heldout) < 1:
        raise ValueError(f"{what} has {len(frame)} rows: too few to split into training and held-out prompts "
                         f"(reward.heldout_fraction {config.heldout_fraction})")


def check_inputs(config: RewardConfig, pretrained_uri: str) -> tuple[ModelInput, FeedbackTable | None]:
    """Every check on the stage's inputs, before any compute: the pretrained model, the device, and the feedback file
    or, when feedback is to be simulated (None is returned for it), the prompts and the labeler it will use."""
    pretrained = resolve_input(pretrained_uri, "palm", "--pretrained")
    resolve_runtime(config.runtime)
    context = pretrained.palm_config["max_seq_len"]
    if config.feedback is None:
        corpus_text, _ = training_corpus(pretrained)
        load_labeler(config.labeler, corpus_text)
        prompts = make_prompts(corpus_text, config.num_prompts, config.prompt_chars, split="train", seed=config.seed)
        check_prompts_fit(prompts, context, config.response_tokens, "reward.feedback")
        rows = pd.DataFrame({"prompt": [p for p in prompts for _ in range(config.samples_per_prompt)]})
        _check_split(rows, config, "simulated feedback (reward.num_prompts x reward.samples_per_prompt)")
        return pretrained, None
    table = read_feedback(config.feedback, min_rating=MIN_RATING, max_rating=MAX_RATING)
    _check_split(table.frame, config, f"feedback {redact_uri(config.feedback)}")
    encode_dialogues(list(table.frame["prompt"]), [""] * len(table.frame), context)  # every prompt fits
    return pretrained, table


def run_reward(config: RewardConfig, pretrained_uri: str, *, parent_run_id: str | None = None) -> StageResult:
    """Check inputs, simulate feedback when none is given, then fit (or reuse, or resume) `palm-reward`."""
    pretrained, table = check_inputs(config, pretrained_uri)
    tracking.check_tracking()
    simulated, feedback_uri = None, config.feedback
    if table is None:
        corpus_text, corpus_digest = training_corpus(pretrained)
        device, _ = resolve_runtime(config.runtime)
        simulated = simulate_feedback(pretrained, config, corpus_text, corpus_digest, device)
        feedback_uri = simulated["ratings_uri"]
        table = read_feedback(feedback_uri, min_rating=MIN_RATING, max_rating=MAX_RATING)
        _check_split(table.frame, config, f"feedback {feedback_uri}")

    def log_inputs(run_id: str) -> None:
        tracking.log_frame_dataset(run_id, table.frame, name=f"feedback-{table.kind}", source_uri=feedback_uri,
                                   digest=table.digest, context="training")
        if simulated:
            tracking.log_params(run_id, {"feedback.simulated_mean_rating": round(simulated["mean_rating"], 4)})

    lineage = {"parent.pretrained": pretrained.ref, "data.feedback": table.digest}
    return distributed.execute("reward", config, inputs={"pretrained": pretrained.digest, "feedback": table.digest},
                               model_name=MODEL_NAME, lineage=lineage, parent_run_id=parent_run_id,
                               train_fn=partial(train, config=config, pretrained=pretrained, table=table,
                                                feedback_uri=feedback_uri), log_inputs=log_inputs)
