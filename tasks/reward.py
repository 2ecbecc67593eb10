"""Stage 2: fit a reward model on feedback, through a LoRA scope on the pretrained PaLM.

Feedback is ratings (prompt, response, rating) or pairs (prompt, chosen, rejected). Ratings train a scalar head
(MSE on the rating) or a binned head (cross-entropy); pairs train with the pairwise loss. Rows are split into train
and held-out by prompt, so held-out prompts are never seen in training. Held-out pairwise accuracy is reported for both
shapes (for ratings, over pairs derived from the held-out ratings), plus the rating RMSE for ratings.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import pandas as pd
import torch

from models.palm import PaLM
from models.reward import RewardModel
from models.training import capture_rng, finite_or_raise, lr_at, restore_rng, set_lr, train_step
from tasks.config import RewardConfig
from tasks.data.labeler import load_labeler
from tasks.data.prompts import make_prompts
from tasks.data.tables import FeedbackTable, pairs_from_ratings, read_feedback
from tasks.data.tokens import check_prompts_fit, encode_dialogues
from tasks.feedback import simulate_feedback
from tasks.redact import redact_uri
from tasks.runtime import parallel
from tasks.runtime.loop import Throughput, optimizer_state, optimizer_state_dict, train
from tasks.runtime.orchestration import compute_task
from tasks.runtime.stage import StageResult, StageRun, resolve_runtime, stage_run
from tasks.storage.checkpoints import Checkpoint, CheckpointRef
from tasks.storage.inputs import ModelInput, Upstream, load_palm, resolve_input, training_corpus
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_curves, log_frame_dataset, log_table
from tasks.tracking.runs import log_params

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
        stars = _to_stars(scores, config.model.num_binned_output)
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


class RewardFitting:
    """One step: a batch of feedback rows (ratings or pairs), its loss through the reward model's LoRA scope and head,
    AdamW with warmup and cosine decay. At each checkpoint the held-out prompts' pair accuracy (and rating RMSE) is
    measured; the last one also records the mean and spread of the scores on the training responses, which PPO
    standardises with."""

    shown = ("loss", "heldout_pair_accuracy")
    may_be_nan = frozenset({"heldout_pair_accuracy"})  # undefined when every held-out rating ties

    def __init__(self, config: RewardConfig, pretrained: ModelInput, table: FeedbackTable, feedback_uri: str):
        self.config, self.pretrained, self.table, self.feedback_uri = config, pretrained, table, feedback_uri
        self.steps, self.checkpoint_every = config.steps, config.checkpoint_every
        self.context = pretrained.palm_config["max_seq_len"]
        self.model_config = {"palm": pretrained.palm_config, **asdict(config.model)}

    def start(self, run: StageRun, resumed: Checkpoint | None) -> None:
        self.train_rows, self.heldout = split_by_prompt(self.table.frame, self.config.heldout_fraction)
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
        stats = train_step(parallel.global_loss(
            lambda: self.batch_loss(rows, self.table.kind, cfg.model.num_binned_output, self.context, self.device)),
            self.params, self.optimizer, device=self.device, amp_dtype=self.amp)
        metrics = {"loss": stats["loss"], "lr": self.lr(step), "examples_per_s": self.clock.rate(cfg.batch_size)}
        if "accuracy" in stats:
            metrics["train_pair_accuracy"] = stats["accuracy"]
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            with parallel.gathered(self.batch_loss):  # every rank evaluates: FSDP gathers collectively
                metrics.update(heldout_metrics(self.rm, self.table, self.heldout, cfg, self.context, self.device))
        if done == cfg.steps:
            with parallel.gathered(self.batch_loss):
                scores = score_texts(self.rm, *_all_texts(self.train_rows, self.table.kind), self.context, self.device)
            self.records["score_norm"] = {"mean": float(scores.mean()), "std": float(scores.std().clamp(min=1e-6))}
            finite_or_raise("the mean reward-model score", self.records["score_norm"]["mean"])
        return metrics

    def checkpoint(self) -> dict:
        weights, optimizer = parallel.full_state(self.rm, self.optimizer)
        pretrained = self.pretrained
        return dict(weights=weights, state={**optimizer_state(optimizer), **capture_rng({"data": self.data_rng})},
                    kind="reward", model_config=self.model_config,
                    parents=[{"uri": pretrained.checkpoint_uri, "digest": pretrained.digest}],
                    data={"feedback": self.table.digest},
                    extra={"feedback": {"uri": self.feedback_uri, "digest": self.table.digest,
                                        "kind": self.table.kind}, **self.records})

    def report(self, run: StageRun, ref: CheckpointRef, metrics: dict[str, float]) -> dict[str, float]:
        scorer, device = parallel.plain_copy(
            self.rm, lambda: RewardModel.from_config(PaLM.from_config(self.pretrained.palm_config), self.config.model),
            ref)
        log_curves(run.run_id, run.metrics.history, ["loss", "heldout_pair_accuracy"], "reward model",
                   "plots/reward.png")
        log_scored_examples(run.run_id, scorer, self.heldout.head(16), self.table.kind, self.context, device)
        headline = {"heldout_pair_accuracy": float("nan")}  # stays NaN when no held-out pair exists (all ratings tied)
        headline.update({k: v for k, v in metrics.items() if k.startswith("heldout_") or k == "loss"})
        return headline


def log_scored_examples(run_id: str, rm, rows: pd.DataFrame, kind: str, context: int, device) -> None:
    """Held-out feedback beside the reward model's scores, for people to check what it learned."""
    rows = rows.copy()
    if kind == "ratings":
        rows["reward_model_score"] = score_texts(rm, list(rows["prompt"]), list(rows["response"]), context,
                                                 device).tolist()
    else:
        for side in ("chosen", "rejected"):
            rows[f"score_{side}"] = score_texts(rm, list(rows["prompt"]), list(rows[side]), context, device).tolist()
    log_table(run_id, rows, "samples/heldout_scored.json")


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
    """Every check on the stage's inputs, before any compute: the pretrained model, the device, and its files."""
    pretrained = resolve_input(pretrained_uri, "palm", "--pretrained")
    resolve_runtime(config.runtime)
    return pretrained, check_files(config, Upstream.of(pretrained))


def check_files(config: RewardConfig, upstream: Upstream) -> FeedbackTable | None:
    """The stage's files and rater, against the model it fits on (`upstream`: a checkpoint's, or the one a pipeline
    is about to pretrain): the feedback file or, when feedback is to be simulated (None is returned for it), the
    prompts and the labeler it will use."""
    context = upstream.context
    if config.feedback is None:
        corpus_text, _ = upstream.corpus
        load_labeler(config.labeler, corpus_text)
        prompts = make_prompts(corpus_text, config.num_prompts, config.prompt_chars, split="train", seed=config.seed)
        check_prompts_fit(prompts, context, config.response_tokens, "reward.feedback")
        rows = pd.DataFrame({"prompt": [p for p in prompts for _ in range(config.samples_per_prompt)]})
        _check_split(rows, config, "simulated feedback (reward.num_prompts x reward.samples_per_prompt)")
        return None
    table = read_feedback(config.feedback, min_rating=MIN_RATING, max_rating=MAX_RATING)
    _check_split(table.frame, config, f"feedback {redact_uri(config.feedback)}")
    encode_dialogues(list(table.frame["prompt"]), [""] * len(table.frame), context)  # every prompt fits
    return table


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
        log_frame_dataset(run_id, table.frame, name=f"feedback-{table.kind}", source_uri=feedback_uri,
                          digest=table.digest, context="training")
        if simulated:
            log_params(run_id, {"feedback.simulated_mean_rating": round(simulated["mean_rating"], 4)})

    with stage_run("reward", config, inputs={"pretrained": pretrained.digest, "feedback": table.digest},
                   model_name=MODEL_NAME, lineage={"parent.pretrained": pretrained.ref, "data.feedback": table.digest},
                   parent_run_id=parent_run_id, log_inputs=log_inputs) as run:
        if not run.cached:
            run.trained(*train(run, RewardFitting(config, pretrained, table, feedback_uri)))
    return run.result


@compute_task("reward-fit")
def reward_task(config: RewardConfig, pretrained: str, parent_run_id: str | None) -> StageResult:
    return run_reward(config, pretrained, parent_run_id=parent_run_id)
