"""Stage 1: next-token pretraining of a PaLM on a text corpus (byte tokens)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch

from models.palm import PaLM
from models.training import capture_rng, finite_or_raise, lr_at, restore_rng, set_lr, train_step
from tasks.config import PretrainConfig
from tasks.data.corpus import BUILTIN_CORPUS_URI, encode_corpus, read_corpus, sample_windows, split_tokens
from tasks.data.files import text_digest
from tasks.data.tokens import ByteTokenizer
from tasks.redact import redact_uri
from tasks.runtime import parallel
from tasks.runtime.loop import Throughput, optimizer_state, optimizer_state_dict, train
from tasks.runtime.orchestration import compute_task
from tasks.runtime.stage import StageResult, StageRun, resolve_runtime, stage_run
from tasks.storage.checkpoints import Checkpoint, CheckpointRef
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_curves, log_text_dataset
from tasks.tracking.samples import log_samples

MODEL_NAME = "palm-pretrained"


@dataclass
class CorpusInput:
    uri: str
    digest: str
    tokens: torch.Tensor  # (n,) byte ids


def load_corpus(config: PretrainConfig) -> CorpusInput:
    """Read and check the corpus before any compute: it must hold enough text for training and validation."""
    uri = config.corpus or BUILTIN_CORPUS_URI
    text = read_corpus(uri, config.text_column)
    tokens = encode_corpus(text, ByteTokenizer())
    train_tokens, heldout = split_tokens(tokens, config.heldout_fraction)
    need = config.seq_len + 1
    if len(train_tokens) < need or len(heldout) < need:
        raise ValueError(f"corpus {redact_uri(uri)} has {len(tokens)} tokens: too few for training and validation "
                         f"windows of seq_len + 1 = {need} (heldout_fraction {config.heldout_fraction})")
    return CorpusInput(uri, text_digest(text), tokens)


def build_model(config: PretrainConfig) -> PaLM:
    return PaLM.from_config(config.model)


class Pretraining:
    """One step: a batch of random windows of the training split, next-token loss, AdamW with warmup and cosine
    decay. A checkpoint holds the weights, the optimiser and the window sampler's random stream."""

    shown = ("loss",)
    may_be_nan = frozenset()

    def __init__(self, config: PretrainConfig, corpus: CorpusInput):
        self.config, self.corpus = config, corpus
        self.steps, self.checkpoint_every = config.steps, config.checkpoint_every

    def start(self, run: StageRun, resumed: Checkpoint | None) -> None:
        self.train_tokens, self.heldout = split_tokens(self.corpus.tokens, self.config.heldout_fraction)
        torch.manual_seed(self.config.seed)  # the initial weights
        self.device, self.amp = run.device, run.amp_dtype
        self.model = build_model(self.config).to(run.device)
        self.data_rng = torch.Generator().manual_seed(self.config.seed)  # the same global batches on every rank
        if resumed is not None:  # whole weights, before FSDP shards them
            self.model.load_state_dict(resumed.weights)
            restore_rng(resumed.state, {"data": self.data_rng})
        self.trained = parallel.data_parallel(self.model, self.config.runtime)  # DDP or FSDP; `model` in one process
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, betas=(0.9, 0.95),
                                           weight_decay=self.config.weight_decay)
        if resumed is not None:
            parallel.load_optimizer_state(self.model, self.optimizer, optimizer_state_dict(resumed.state))
        self.clock = Throughput()

    def lr(self, step: int) -> float:
        return lr_at(step, lr=self.config.lr, warmup_steps=self.config.warmup_steps, total_steps=self.config.steps)

    def describe(self, step: int) -> str:
        return f"lr {self.lr(step):.3g}"

    def step(self, step: int) -> dict[str, float]:
        cfg = self.config
        set_lr(self.optimizer, self.lr(step))
        batch = parallel.shard(sample_windows(self.train_tokens, cfg.batch_size, cfg.seq_len, self.data_rng))
        batch = batch.to(self.device)
        stats = train_step(parallel.global_loss(lambda: self.trained(batch, return_loss=True)),
                           list(self.model.parameters()), self.optimizer, device=self.device, amp_dtype=self.amp)
        metrics = {"loss": stats["loss"], "lr": self.lr(step), "grad_norm": stats["grad_norm"],
                   "tokens_per_s": self.clock.rate(cfg.batch_size * cfg.seq_len)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics["val_loss"] = self.validation_loss()
            finite_or_raise("val_loss", metrics["val_loss"])
        return metrics

    @torch.no_grad()
    def validation_loss(self, batches: int = 4) -> float:
        """Loss on the same held-out windows every time (a fixed generator), so the curve is comparable."""
        g = torch.Generator().manual_seed(1234)
        self.model.eval()
        losses = [self.model(sample_windows(self.heldout, self.config.batch_size, self.config.seq_len, g)
                             .to(self.device), return_loss=True).item() for _ in range(batches)]
        self.model.train()
        return sum(losses) / len(losses)

    def checkpoint(self) -> dict:
        weights, optimizer = parallel.full_state(self.model, self.optimizer)
        corpus = self.corpus
        return dict(weights=weights, state={**optimizer_state(optimizer), **capture_rng({"data": self.data_rng})},
                    kind="palm", model_config=asdict(self.model.config), data={"corpus": corpus.digest},
                    extra={"corpus": {"uri": redact_uri(corpus.uri), "digest": corpus.digest,
                                      "text_column": self.config.text_column}, "tokenizer": "bytes"})

    def report(self, run: StageRun, ref: CheckpointRef, metrics: dict[str, float]) -> dict[str, float]:
        log_curves(run.run_id, run.metrics.history, ["loss", "val_loss"], "pretraining loss", "plots/loss.png")
        sampler, device = parallel.plain_copy(self.model, partial(build_model, self.config), ref)
        log_samples(run.run_id, sampler, device=device, max_new_tokens=self.config.seq_len // 2, seed=self.config.seed)
        return {k: metrics[k] for k in ("loss", "val_loss", "tokens_per_s") if k in metrics}


def run_pretrain(config: PretrainConfig, *, parent_run_id: str | None = None) -> StageResult:
    """The whole stage: check the corpus, then train (or reuse, or resume) and register `palm-pretrained`."""
    corpus = load_corpus(config)
    resolve_runtime(config.runtime)
    tracking.check_tracking()

    def log_inputs(run_id: str) -> None:
        log_text_dataset(run_id, name="corpus", source_uri=corpus.uri, digest=corpus.digest, context="training",
                         preview=None)

    with stage_run("pretrain", config, inputs={"corpus": corpus.digest}, model_name=MODEL_NAME,
                   lineage={"data.corpus": corpus.digest}, parent_run_id=parent_run_id, log_inputs=log_inputs) as run:
        if not run.cached:
            run.trained(*train(run, Pretraining(config, corpus)))
    return run.result


@compute_task("pretrain-train")
def pretrain_task(config: PretrainConfig, parent_run_id: str | None) -> StageResult:
    return run_pretrain(config, parent_run_id=parent_run_id)
