"""Stage 2: fit a reward model on feedback, through a LoRA scope on the pretrained PaLM.

Feedback is ratings (prompt, response, rating) on any scale, or pairs (prompt, chosen, rejected), read and checked by
tasks/data/tables.py and tokenized once with the pretrained model's tokenizer (rows too long for its context cut,
dropped or refused). Ratings train a scalar head (MSE on the rating) or a binned head (cross-entropy); pairs train with
the pairwise loss. Rows are split into train and held-out by prompt, so held-out prompts are never seen in training;
the two prompt sets are written beside the stage's checkpoints for PPO and evaluation. Held-out pairwise accuracy is
reported for both shapes (for ratings, over pairs derived from the held-out ratings), plus the rating RMSE.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import pandas as pd
import torch

from models.palm import PaLM
from models.reward import RewardModel, rating_targets, score_to_rating
from models.training import capture_rng, finite_or_raise, lr_at, restore_rng, set_lr, train_step
from tasks.config import RewardConfig
from tasks.data.labeler import MAX_RATING, MIN_RATING, load_labeler
from tasks.data.prompts import make_prompts
from tasks.data.tables import (FITTED, FeedbackError, PreparedFeedback, pairs_from_ratings, prepare_feedback,
                               read_feedback)
from tasks.data.tokens import check_prompts_fit, dialogue_batch
from tasks.feedback import simulate_feedback
from tasks.redact import redact_uri
from tasks.runtime import parallel
from tasks.runtime.loop import Throughput, optimizer_state, optimizer_state_dict, train
from tasks.runtime.orchestration import compute_task
from tasks.runtime.stage import StageResult, StageRun, resolve_runtime, sampling_dtype, stage_run
from tasks.storage.checkpoints import Checkpoint, CheckpointRef
from tasks.storage.inputs import TOKENIZER_FILE, ModelInput, Upstream, corpus_sample, load_palm, resolve_input
from tasks.storage.store import create_file, join_uri
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_curves, log_frame_dataset, log_table
from tasks.tracking.runs import log_params

MODEL_NAME = "palm-reward"


def split_by_prompt(frame: pd.DataFrame, heldout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out rows are those whose prompt hashes into the held-out share: no prompt is on both sides."""
    bucket = frame["prompt"].map(lambda p: int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 1000 / 1000)
    heldout = bucket < heldout_fraction
    return frame[~heldout].reset_index(drop=True), frame[heldout].reset_index(drop=True)


@torch.no_grad()
def _per_row(model, rows: list, pad_id: int, device, batch: int, score) -> torch.Tensor:
    """score(ids, mask, prompt_mask) -> (b,) for every fitted row, with `model` in eval mode (and left as it was
    found), in batches of rows of like length (less padding to compute), returned in the rows' own order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt) + len(rows[i].response))
    out = torch.zeros(len(rows))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(order), batch):
            chunk = order[i:i + batch]
            ids, mask, pmask = (t.to(device) for t in dialogue_batch([rows[j] for j in chunk], pad_id))
            out[chunk] = score(ids, mask, pmask).float().cpu()
    finally:
        model.train(was_training)
    return out


def score_rows(rm, rows: list, pad_id: int, device, batch: int = 64) -> torch.Tensor:
    """The reward model's raw score of each fitted (prompt, response) row."""
    return _per_row(rm, rows, pad_id, device, batch,
                    lambda ids, mask, pmask: rm.score(ids, mask=mask, prompt_mask=pmask))


def mean_loglik(palm, rows: list, pad_id: int, device, batch: int = 64) -> torch.Tensor:
    """The base model's mean log-likelihood per response token of each fitted (prompt, response) row."""
    def score(ids, mask, pmask):
        logits = palm(ids[:, :-1], mask=mask[:, :-1]).float()
        logp = logits.log_softmax(dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # each next token's
        response = (mask & ~pmask)[:, 1:].float()
        return (logp * response).sum(-1) / response.sum(-1).clamp(min=1)

    return _per_row(palm, rows, pad_id, device, batch, score)


class HeldoutPairs:
    """The held-out (chosen, rejected) pairs: the pairs themselves, or pairs of held-out ratings a clear margin apart.
    For ratings, each held-out row is scored once and the pairs are read off those scores (`scores`)."""

    def __init__(self, feedback: PreparedFeedback, heldout: pd.DataFrame, config: RewardConfig, scale):
        self.kind, self.heldout = feedback.kind, heldout
        if self.kind != "ratings":
            self.chosen = [f[0] for f in heldout[FITTED]]
            self.rejected = [f[1] for f in heldout[FITTED]]
            self.count = len(heldout)
            return
        pairs = pairs_from_ratings(heldout, min_margin=config.pair_margin * (scale[1] - scale[0]) / 4,
                                   seed=config.seed)
        position: dict[tuple[str, str], int] = {}
        for i, key in enumerate(zip(heldout["prompt"], heldout["response"])):
            position.setdefault(key, i)  # one response rated several times: the same tokens, the same score
        self.chosen_at = torch.tensor([position[k] for k in zip(pairs["prompt"], pairs["chosen"])], dtype=torch.long)
        self.rejected_at = torch.tensor([position[k] for k in zip(pairs["prompt"], pairs["rejected"])],
                                        dtype=torch.long)
        self.count = len(pairs)

    def scores(self, score, row_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores; `score(list of fitted rows)` scores rows, `row_scores` are the held-out rows'
        scores when already computed."""
        if self.kind != "ratings":
            return score(self.chosen), score(self.rejected)
        if row_scores is None:
            row_scores = score(list(self.heldout[FITTED]))
        return row_scores[self.chosen_at], row_scores[self.rejected_at]


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """The share of pairs whose chosen side scores higher, a tie counting half; NaN without pairs (every held-out
    rating tied: undefined, and said so rather than inventing a number)."""
    if not len(chosen):
        return float("nan")
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


def heldout_metrics(rm, pairs: HeldoutPairs, scale, bins: int, pad_id: int, device) -> dict[str, float]:
    metrics, scores = {}, None
    if pairs.kind == "ratings":
        scores = score_rows(rm, list(pairs.heldout[FITTED]), pad_id, device)
        ratings = score_to_rating(scores, scale, bins)
        truth = torch.tensor(pairs.heldout["rating"].to_numpy(dtype=float), dtype=torch.float32)
        metrics["heldout_rating_rmse"] = float(((ratings - truth) ** 2).mean().sqrt())
    chosen, rejected = pairs.scores(lambda rows: score_rows(rm, rows, pad_id, device), scores)
    metrics["heldout_pair_accuracy"] = pair_accuracy(chosen, rejected)
    metrics["heldout_pairs"] = float(pairs.count)
    return metrics


def likelihood_pair_accuracy(palm, pairs: HeldoutPairs, pad_id: int, device) -> float:
    """How well the base model's own mean log-likelihood ranks the held-out pairs: near 1, the preference is one the
    pretrained model already has (sharpening it, e.g. a lower temperature, gets most of the way); near 0.5, it is
    new to the model, and only learning it (RLHF) can follow it."""
    return pair_accuracy(*pairs.scores(lambda rows: mean_loglik(palm, rows, pad_id, device)))


def _batch_loss(rm, rows: pd.DataFrame, kind: str, bins: int, scale, pad_id: int, device):
    if kind == "ratings":
        ids, mask, pmask = dialogue_batch(list(rows[FITTED]), pad_id)
        return rm(ids.to(device), mask=mask.to(device), prompt_mask=pmask.to(device),
                  labels=rating_targets(torch.tensor(rows["rating"].to_numpy(dtype=float)), scale, bins).to(device))
    c_ids, c_mask, c_pmask = dialogue_batch([f[0] for f in rows[FITTED]], pad_id)
    r_ids, r_mask, r_pmask = dialogue_batch([f[1] for f in rows[FITTED]], pad_id)
    loss, accuracy = rm.preference_loss(c_ids.to(device), r_ids.to(device), chosen_mask=c_mask.to(device),
                                        rejected_mask=r_mask.to(device), chosen_prompt_mask=c_pmask.to(device),
                                        rejected_prompt_mask=r_pmask.to(device))
    return loss, {"accuracy": accuracy}


class RewardFitting:
    """One step: a batch of feedback rows (ratings or pairs), its loss through the reward model's LoRA scope and head,
    AdamW with warmup and cosine decay. At each checkpoint the held-out prompts' pair accuracy (and rating RMSE) is
    measured; the last one also records the mean and spread of the scores on the training responses, which PPO
    standardises with."""

    shown = ("loss", "heldout_pair_accuracy")
    # undefined when every held-out rating ties
    may_be_nan = frozenset({"heldout_pair_accuracy", "likelihood_pair_accuracy"})

    def __init__(self, config: RewardConfig, pretrained: ModelInput, feedback: PreparedFeedback, source: dict,
                 prompts: dict | None):
        self.config, self.pretrained, self.feedback, self.source = config, pretrained, feedback, source
        self.prompts = prompts  # the prompt sets written for PPO and evaluation (user feedback only)
        self.steps, self.checkpoint_every = config.steps, config.checkpoint_every
        self.pad_id = pretrained.tokenizer.pad_id
        self.scale = tuple(source["rating_scale"]) if source.get("rating_scale") else None
        self.model_config = {"palm": pretrained.palm_config, **asdict(config.model)}

    def start(self, run: StageRun, resumed: Checkpoint | None) -> None:
        self.train_rows, self.heldout = split_by_prompt(self.feedback.frame, self.config.heldout_fraction)
        self.pairs = HeldoutPairs(self.feedback, self.heldout, self.config, self.scale)
        palm = load_palm(self.pretrained, "cpu")
        torch.manual_seed(self.config.seed)  # the LoRA and head initialisation
        self.rm = RewardModel.from_config(palm, self.config.model).to(run.device)
        for p in self.rm.palm.base_parameters():
            p.requires_grad_(False)
        self.device, self.amp = run.device, run.amp_dtype
        self.data_rng = torch.Generator().manual_seed(self.config.seed)  # the same global batches on every rank
        if resumed is not None:  # whole weights, before FSDP shards them
            self.rm.load_state_dict(resumed.weights)
            restore_rng(resumed.state, {"data": self.data_rng})
        # DDP or FSDP across ranks; in one process, _batch_loss(rm, ...) itself
        self.batch_loss = parallel.data_parallel(parallel.LossModule(self.rm, _batch_loss), self.config.runtime)
        self.params = self.rm.finetune_parameters()  # after FSDP, which replaces the parameters it shards
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=0.0)
        if resumed is not None:
            parallel.load_optimizer_state(self.rm, self.optimizer, optimizer_state_dict(resumed.state))
        self.clock, self.records = Throughput(), {}

    def lr(self, step: int) -> float:
        cfg = self.config
        return lr_at(step, lr=cfg.lr, warmup_steps=min(20, cfg.steps // 10), total_steps=cfg.steps)

    def describe(self, step: int) -> str:
        return f"lr {self.lr(step):.3g}"

    def step(self, step: int) -> dict[str, float]:
        cfg, done = self.config, step + 1
        set_lr(self.optimizer, self.lr(step))
        idx = parallel.shard(torch.randint(0, len(self.train_rows), (cfg.batch_size,), generator=self.data_rng))
        rows = self.train_rows.iloc[idx.tolist()]
        stats = train_step(parallel.global_loss(lambda: self.batch_loss(
            rows, self.feedback.kind, cfg.model.num_binned_output, self.scale, self.pad_id, self.device)),
            self.params, self.optimizer, device=self.device, amp_dtype=self.amp)
        metrics = {"loss": stats["loss"], "lr": self.lr(step), "examples_per_s": self.clock.rate(cfg.batch_size)}
        if "accuracy" in stats:
            metrics["train_pair_accuracy"] = stats["accuracy"]
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            with parallel.gathered(self.batch_loss):  # every rank evaluates: FSDP gathers collectively
                metrics.update(heldout_metrics(self.rm, self.pairs, self.scale, cfg.model.num_binned_output,
                                               self.pad_id, self.device))
        if done == cfg.steps:
            with parallel.gathered(self.batch_loss):
                scores = score_rows(self.rm, _all_rows(self.train_rows, self.feedback.kind), self.pad_id, self.device)
            self.records["score_norm"] = {"mean": float(scores.mean()), "std": float(scores.std().clamp(min=1e-6))}
            finite_or_raise("the mean reward-model score", self.records["score_norm"]["mean"])
            with parallel.gathered(self.batch_loss):
                metrics["likelihood_pair_accuracy"] = likelihood_pair_accuracy(self.rm.palm, self.pairs, self.pad_id,
                                                                               self.device)
            metrics.update(self.feedback.stats)  # what reading the feedback took, once, with the final numbers
        return metrics

    def checkpoint(self) -> dict:
        weights, optimizer = parallel.full_state(self.rm, self.optimizer)
        pretrained = self.pretrained
        return dict(weights=weights, state={**optimizer_state(optimizer), **capture_rng({"data": self.data_rng})},
                    kind="reward", model_config=self.model_config,
                    parents=[{"uri": pretrained.checkpoint_uri, "digest": pretrained.digest}],
                    data={"feedback": self.source["digest"]},
                    extra={"feedback": self.source, "prompts": self.prompts,
                           # where the head's score means a rating (trained on ratings): serving speaks in it
                           "rating_scale": list(self.scale) if self.scale else None,
                           "tokenizer": pretrained.manifest["tokenizer"], **self.records},
                    files={TOKENIZER_FILE: pretrained.tokenizer.to_file()})

    def report(self, run: StageRun, ref: CheckpointRef, metrics: dict[str, float]) -> dict[str, float]:
        scorer, device = parallel.plain_copy(
            self.rm, lambda: RewardModel.from_config(PaLM.from_config(self.pretrained.palm_config), self.config.model),
            ref)
        log_curves(run.run_id, run.metrics.history, ["loss", "heldout_pair_accuracy"], "reward model",
                   "plots/reward.png")
        log_scored_examples(run.run_id, scorer, self.heldout.head(16), self.feedback.kind, self.pad_id, device)
        headline = {"heldout_pair_accuracy": float("nan")}  # stays NaN when no held-out pair exists (all ratings tied)
        headline.update({k: v for k, v in metrics.items()
                         if k.startswith(("heldout_", "feedback.")) or k in ("loss", "likelihood_pair_accuracy")})
        return headline


def log_scored_examples(run_id: str, rm, rows: pd.DataFrame, kind: str, pad_id: int, device) -> None:
    """Held-out feedback beside the reward model's scores, for people to check what it learned."""
    shown = rows.drop(columns=[FITTED])
    if kind == "ratings":
        shown["reward_model_score"] = score_rows(rm, list(rows[FITTED]), pad_id, device).tolist()
    else:
        for i, side in enumerate(("chosen", "rejected")):
            shown[f"score_{side}"] = score_rows(rm, [f[i] for f in rows[FITTED]], pad_id, device).tolist()
    log_table(run_id, shown, "samples/heldout_scored.json")


def _all_rows(rows: pd.DataFrame, kind: str) -> list:
    if kind == "ratings":
        return list(rows[FITTED])
    return [f[0] for f in rows[FITTED]] + [f[1] for f in rows[FITTED]]


def _check_split(frame: pd.DataFrame, config: RewardConfig, what: str) -> None:
    train_rows, heldout = split_by_prompt(frame, config.heldout_fraction)
    if len(train_rows) < 2 or len(heldout) < 1:
        raise ValueError(f"{what} has {len(frame)} rows: too few to split into training and held-out prompts "
                         f"(reward.heldout_fraction {config.heldout_fraction})")


def read_user_feedback(config: RewardConfig, tokenizer, context: int) -> PreparedFeedback:
    """The user's feedback file, read, checked and tokenized for the model it fits on; one clear error otherwise."""
    shown = redact_uri(config.feedback)
    table = read_feedback(config.feedback, rating_scale=config.rating_scale)
    if table.kind == "ratings" and table.rating_scale is None:
        raise FeedbackError(f"feedback {shown}: every rating is {table.frame['rating'].iloc[0]:g}, which says nothing "
                            "of the scale: set reward.rating_scale (e.g. [0, 1] for thumbs)")
    feedback = prepare_feedback(table, tokenizer, context, config.on_too_long, shown)
    _check_split(feedback.frame, config, f"feedback {shown}")
    return feedback


def check_inputs(config: RewardConfig, pretrained_uri: str) -> tuple[ModelInput, PreparedFeedback | None]:
    """Every check on the stage's inputs, before any compute: the pretrained model, the device, and its files."""
    pretrained = resolve_input(pretrained_uri, "palm", "--pretrained")
    resolve_runtime(config.runtime)
    return pretrained, check_files(config, Upstream.of(pretrained))


def check_files(config: RewardConfig, upstream: Upstream) -> PreparedFeedback | None:
    """The stage's files and rater, against the model it fits on (`upstream`: a checkpoint's, or the one a pipeline
    is about to pretrain): the feedback file, read and tokenized, or, when feedback is to be simulated (None is
    returned for it), the prompts and the labeler it will use."""
    if config.feedback is not None:
        return read_user_feedback(config, upstream.tokenizer, upstream.context)
    sample, _ = upstream.corpus
    load_labeler(config.labeler, sample)
    prompts = make_prompts(sample, config.num_prompts, config.prompt_chars, split="train", seed=config.seed)
    check_prompts_fit(prompts, upstream.tokenizer, upstream.context, config.response_tokens, "reward.feedback")
    rows = pd.DataFrame({"prompt": [p for p in prompts for _ in range(config.samples_per_prompt)]})
    _check_split(rows, config, "simulated feedback (reward.num_prompts x reward.samples_per_prompt)")
    return None


def write_prompt_sets(prefix: str, feedback: PreparedFeedback, config: RewardConfig) -> dict:
    """The feedback's training and held-out prompts (the reward stage's own split) as JSON-lines files beside the
    stage's checkpoints: PPO trains on the first and evaluation uses the second unless given prompt files."""
    records = {}
    for name, rows in zip(("train", "heldout"), split_by_prompt(feedback.frame, config.heldout_fraction)):
        prompts = list(dict.fromkeys(rows["prompt"]))
        data = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts).encode()
        uri = join_uri(prefix, "prompts", f"{name}.jsonl")
        create_file(uri, data)  # the same run key writes the same bytes: an earlier attempt's file is this one
        records[name] = {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "count": len(prompts)}
    return records


def run_reward(config: RewardConfig, pretrained_uri: str, *, parent_run_id: str | None = None) -> StageResult:
    """Check inputs, simulate feedback when none is given, then fit (or reuse, or resume) `palm-reward`."""
    pretrained, feedback = check_inputs(config, pretrained_uri)
    tracking.check_tracking()
    simulated, feedback_uri = None, config.feedback
    if feedback is None:
        sample, corpus_digest = corpus_sample(pretrained)
        device, _ = resolve_runtime(config.runtime)
        simulated = simulate_feedback(pretrained, config, sample, corpus_digest, device,
                                      sampling_dtype(config.runtime, device))
        feedback_uri = simulated["ratings_uri"]
        table = read_feedback(feedback_uri, rating_scale=(MIN_RATING, MAX_RATING), empty_responses=True)
        feedback = prepare_feedback(table, pretrained.tokenizer, pretrained.palm_config["max_seq_len"], "cut",
                                    feedback_uri)
        _check_split(feedback.frame, config, f"feedback {feedback_uri}")
    table = feedback.table
    source = {"uri": redact_uri(feedback_uri), "digest": table.digest, "kind": table.kind,
              "simulated": simulated is not None, "labeler": config.labeler if simulated else None,
              "rating_scale": list(table.rating_scale) if table.rating_scale else None}

    def log_inputs(run_id: str) -> None:
        log_frame_dataset(run_id, table.frame, name=f"feedback-{table.kind}", source_uri=feedback_uri,
                          digest=table.digest, context="training")
        if simulated:
            log_params(run_id, {"feedback.simulated_mean_rating": round(simulated["mean_rating"], 4)})

    with stage_run("reward", config, inputs={"pretrained": pretrained.digest, "feedback": table.digest},
                   model_name=MODEL_NAME, lineage={"parent.pretrained": pretrained.ref, "data.feedback": table.digest},
                   parent_run_id=parent_run_id, log_inputs=log_inputs) as run:
        if not run.cached:
            prompts = None if simulated else write_prompt_sets(run.prefix, feedback, config)
            run.trained(*train(run, RewardFitting(config, pretrained, feedback, source, prompts)))
    return run.result


@compute_task("reward-fit")
def reward_task(config: RewardConfig, pretrained: str, parent_run_id: str | None) -> StageResult:
    return run_reward(config, pretrained, parent_run_id=parent_run_id)
