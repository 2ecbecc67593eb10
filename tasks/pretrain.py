"""Stage 1: next-token pretraining of a PaLM on a text corpus.

First the corpus is prepared, once for this stage and every one after it: the tokenizer (bytes, or a BPE trained on
it), a token file with an end-of-text token after every document, and a text sample for prompts and raters
(tasks/data/tokenfile.py), all in the store and keyed by the corpus and the tokenizer. Training reads windows from the
token file memory-mapped, so the corpus is never in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from models.palm import PaLM
from models.training import capture_rng, finite_or_raise, lr_at, restore_rng, set_lr, train_step
from tasks.config import PretrainConfig
from tasks.data.corpus import BUILTIN_CORPUS_URI, CorpusError, check_corpus, iter_corpus, sample_windows, split_tokens
from tasks.data.tokenfile import open_tokens, scan, write_tokens
from tasks.data.tokenizer import ByteTokenizer, Tokenizer, digest, train_bpe
from tasks.data.tokenizer import record as tokenizer_record
from tasks.redact import redact_uri
from tasks.runtime import parallel
from tasks.runtime.loop import Throughput, optimizer_state, optimizer_state_dict, train
from tasks.runtime.orchestration import compute_task
from tasks.runtime.progress import progress_bar
from tasks.runtime.stage import StageResult, StageRun, resolve_runtime, stage_run
from tasks.storage.checkpoints import Checkpoint, CheckpointRef
from tasks.storage.inputs import TOKENIZER_FILE
from tasks.storage.store import check_store, create_file, join_uri, local_copy, read_file, store_root, upload_file
from tasks.tracking import client as tracking
from tasks.tracking.artifacts import log_curves, log_text_dataset
from tasks.tracking.samples import log_samples

MODEL_NAME = "palm-pretrained"


CORPUS_FORMAT = 1  # the layout of a prepared corpus folder
TOKENS, SAMPLE, RECORDS = "tokens.bin", "sample.txt", "corpus.json"


@dataclass
class PreparedCorpus:
    """A corpus tokenized once: where its files are in the store, and what they hold."""

    uri: str
    text_column: str
    digest: str  # of the documents (tasks/data/tokenfile.py)
    folder: str  # <store>/corpus/<key>/
    tokenizer: Tokenizer = field(repr=False)
    tokens: dict  # tokens.bin: dtype, count, documents, sha256
    sample: dict  # sample.txt: sha256, chars, paragraphs, complete

    @property
    def tokenizer_digest(self) -> str:
        return digest(self.tokenizer)

    def records(self) -> dict:
        """What a checkpoint's manifest says of its data: later stages find their prompts and raters from here."""
        return {"corpus": {"uri": redact_uri(self.uri), "digest": self.digest, "text_column": self.text_column,
                           "tokens": {**self.tokens, "uri": join_uri(self.folder, TOKENS)},
                           "sample": {**self.sample, "uri": join_uri(self.folder, SAMPLE)}},
                "tokenizer": tokenizer_record(self.tokenizer)}


def check_corpus_input(config: PretrainConfig) -> None:
    """Before any compute, cheaply: the corpus is readable and has text for both splits' windows (it stops reading as
    soon as it has seen enough). The exact token counts are checked once it is tokenized."""
    check_corpus(config.corpus, config.text_column, min_chars=round((config.seq_len + 1) / config.heldout_fraction))


_planned: dict[tuple, tuple] = {}  # a pipeline's up-front check hands its scan to pretraining in the same process


def plan_corpus(config: PretrainConfig) -> tuple[str, str, Tokenizer]:
    """What pretraining will make of the corpus, for checking the later stages' files before it starts: (the text
    sample, the corpus digest, the tokenizer). One pass over the corpus; pretraining in this process reuses it."""
    found, tokenizer = _scan(config)
    _planned[_plan_key(config)] = (found, tokenizer)
    return "\n".join(found.sample), found.digest, tokenizer


def _plan_key(config: PretrainConfig) -> tuple:
    return (config.corpus or BUILTIN_CORPUS_URI, config.text_column, config.tokenizer, config.tokenizer_vocab)


def _scan(config: PretrainConfig):
    uri = config.corpus or BUILTIN_CORPUS_URI
    found = scan(iter_corpus(uri, config.text_column))
    if not found.chars:
        raise CorpusError(f"corpus {redact_uri(uri)} is empty")
    tokenizer = ByteTokenizer() if config.tokenizer == "bytes" else train_bpe(found.sample, config.tokenizer_vocab)
    return found, tokenizer


def prepare_corpus(config: PretrainConfig) -> PreparedCorpus:
    """The corpus's digest and sample (one pass), its tokenizer, and its token file (a second pass), reused when this
    corpus was prepared with this tokenizer before. The token file always holds the documents of the digest it is
    recorded under: writing it checks the corpus still reads as scanned."""
    uri = config.corpus or BUILTIN_CORPUS_URI
    found, tokenizer = _planned.pop(_plan_key(config), None) or _scan(config)
    key = hashlib.sha256(json.dumps([CORPUS_FORMAT, found.digest, digest(tokenizer)]).encode()).hexdigest()[:20]
    folder = join_uri(store_root(), "corpus", key)
    raw = read_file(join_uri(folder, RECORDS))
    if raw is None:
        raw = _write_prepared(folder, uri, config.text_column, found, tokenizer)
    records = json.loads(raw)
    corpus = PreparedCorpus(uri, config.text_column, found.digest, folder, tokenizer, records["tokens"],
                            records["sample"])
    train_tokens = round(corpus.tokens["count"] * (1 - config.heldout_fraction))
    need = config.seq_len + 1
    if train_tokens < need or corpus.tokens["count"] - train_tokens < need:
        raise CorpusError(f"corpus {redact_uri(uri)} has {corpus.tokens['count']} tokens: too few for training and "
                          f"validation windows of seq_len + 1 = {need} (heldout_fraction {config.heldout_fraction})")
    return corpus


def _write_prepared(folder: str, uri: str, text_column: str, found, tokenizer: Tokenizer) -> bytes:
    with tempfile.TemporaryDirectory(prefix="palm-rlhf-tokens-") as tmp:
        with progress_bar("tokenize", found.chars) as show:
            tokens = write_tokens(iter_corpus(uri, text_column), tokenizer, Path(tmp, TOKENS), progress=show)
        if tokens["digest"] != found.digest:
            raise CorpusError(f"corpus {redact_uri(uri)} changed while it was being read: rerun")
        upload_file(str(Path(tmp, TOKENS)), join_uri(folder, TOKENS))
    sample = "\n".join(found.sample).encode("utf-8")
    create_file(join_uri(folder, SAMPLE), sample)
    create_file(join_uri(folder, TOKENIZER_FILE), tokenizer.to_file())
    records = {"format": CORPUS_FORMAT, "corpus": found.digest, "tokenizer": digest(tokenizer),
               "tokens": {k: v for k, v in tokens.items() if k != "digest"},
               "sample": {"sha256": hashlib.sha256(sample).hexdigest(), "chars": len(sample),
                          "paragraphs": len(found.sample), "complete": found.sample_complete}}
    raw = json.dumps(records, indent=2, sort_keys=True).encode()
    if not create_file(join_uri(folder, RECORDS), raw):  # written last; another process prepared the same meanwhile
        raw = read_file(join_uri(folder, RECORDS))
    return raw


def local_tokens(corpus: PreparedCorpus):
    """The token file memory-mapped: from the store itself when it is a local folder, else from a local copy."""
    cache = os.path.join(os.path.expanduser(os.environ.get("PALM_RLHF_HOME") or ".palm-rlhf"), "cache", "corpus")
    path = local_copy(join_uri(corpus.folder, TOKENS), os.path.abspath(cache))
    return open_tokens(Path(path), corpus.tokens["dtype"], corpus.tokens["count"])


def build_model(config: PretrainConfig) -> PaLM:
    return PaLM.from_config(config.model)


class Pretraining:
    """One step: a batch of random windows of the training split, next-token loss, AdamW with warmup and cosine
    decay. A checkpoint holds the weights, the optimiser and the window sampler's random stream."""

    shown = ("loss",)
    may_be_nan = frozenset()

    def __init__(self, config: PretrainConfig, corpus: PreparedCorpus):
        self.config, self.corpus = config, corpus
        self.steps, self.checkpoint_every = config.steps, config.checkpoint_every

    def start(self, run: StageRun, resumed: Checkpoint | None) -> None:
        self.train_tokens, self.heldout = split_tokens(local_tokens(self.corpus), self.config.heldout_fraction)
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
        return dict(weights=weights, state={**optimizer_state(optimizer), **capture_rng({"data": self.data_rng})},
                    kind="palm", model_config=asdict(self.model.config), data={"corpus": self.corpus.digest},
                    extra=self.corpus.records(), files={TOKENIZER_FILE: self.corpus.tokenizer.to_file()})

    def report(self, run: StageRun, ref: CheckpointRef, metrics: dict[str, float]) -> dict[str, float]:
        log_curves(run.run_id, run.metrics.history, ["loss", "val_loss"], "pretraining loss", "plots/loss.png")
        sampler, device = parallel.plain_copy(self.model, partial(build_model, self.config), ref)
        log_samples(run.run_id, sampler, self.corpus.tokenizer, device=device, max_new_tokens=self.config.seq_len // 2,
                    seed=self.config.seed)
        return {k: metrics[k] for k in ("loss", "val_loss", "tokens_per_s") if k in metrics}


def run_pretrain(config: PretrainConfig, *, parent_run_id: str | None = None) -> StageResult:
    """The whole stage: check and prepare the corpus, then train (or reuse, or resume) and register
    `palm-pretrained`."""
    check_corpus_input(config)
    resolve_runtime(config.runtime)
    tracking.check_tracking()
    check_store()
    corpus = prepare_corpus(config)

    def log_inputs(run_id: str) -> None:
        log_text_dataset(run_id, name="corpus", source_uri=corpus.uri, digest=corpus.digest, context="training",
                         preview=None)

    inputs = {"corpus": corpus.digest, "tokenizer": corpus.tokenizer_digest}
    lineage = {"data.corpus": corpus.digest, "data.tokenizer": corpus.tokenizer_digest}
    with stage_run("pretrain", config, inputs=inputs, model_name=MODEL_NAME, lineage=lineage,
                   parent_run_id=parent_run_id, log_inputs=log_inputs) as run:
        if not run.cached:
            run.trained(*train(run, Pretraining(config, corpus)))
    return run.result


@compute_task("pretrain-train")
def pretrain_task(config: PretrainConfig, parent_run_id: str | None) -> StageResult:
    return run_pretrain(config, parent_run_id=parent_run_id)
