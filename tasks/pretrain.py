"""Stage 1: next-token pretraining of a PaLM on a text corpus (byte tokens)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch

from models.palm import PaLM
from models.training import capture_rng, finite_or_raise, lr_at, set_lr, train_step
from tasks import distributed, tracking
from tasks.config import PretrainConfig
from tasks.data import BUILTIN_CORPUS_URI, ByteTokenizer, encode_corpus, read_corpus, split_tokens, text_digest
from tasks.progress import progress_bar
from tasks.samples import log_samples
from tasks.redact import redact_uri
from tasks.stage import StageResult, StageRun, Throughput, log_curves, resolve_runtime, resume_into
from tasks.store import CheckpointRef, load_checkpoint, save_checkpoint

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
    train, heldout = split_tokens(tokens, config.heldout_fraction)
    need = config.seq_len + 1
    if len(train) < need or len(heldout) < need:
        raise ValueError(f"corpus {redact_uri(uri)} has {len(tokens)} tokens: too few for training and validation "
                         f"windows of seq_len + 1 = {need} (heldout_fraction {config.heldout_fraction})")
    return CorpusInput(uri, text_digest(text), tokens)


def build_model(config: PretrainConfig) -> PaLM:
    return PaLM(**config.model.model_dump())


@torch.no_grad()
def validation_loss(model: PaLM, heldout: torch.Tensor, config: PretrainConfig, device, batches: int = 4) -> float:
    """Loss on the same held-out windows every time (a fixed generator), so the curve is comparable."""
    from tasks.data import sample_windows

    g = torch.Generator().manual_seed(1234)
    model.eval()
    losses = [model(sample_windows(heldout, config.batch_size, config.seq_len, g).to(device), return_loss=True).item()
              for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def train(run: StageRun, config: PretrainConfig, corpus: CorpusInput) -> tuple[CheckpointRef, dict[str, float]]:
    from tasks.data import sample_windows

    train_tokens, heldout = split_tokens(corpus.tokens, config.heldout_fraction)
    torch.manual_seed(config.seed)  # the initial weights
    model = build_model(config).to(run.device)
    data_rng = torch.Generator().manual_seed(config.seed)  # the same global batches on every rank
    start, ckpt = resume_into(run, model, {"data": data_rng})
    trained = distributed.data_parallel(model, config.runtime)  # DDP or FSDP across ranks; `model` in one process
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)
    if ckpt is not None:
        distributed.load_optimizer_state(model, optimizer, ckpt.state["optimizer"])

    model_config = asdict(model.config)
    data = {"corpus": corpus.digest}
    extra = {"corpus": {"uri": redact_uri(corpus.uri), "digest": corpus.digest, "text_column": config.text_column},
             "tokenizer": "bytes"}
    tokens_per_step = config.batch_size * config.seq_len
    clock, ref, metrics = Throughput(), run.resume_from, {}
    with progress_bar("pretrain", config.steps, start) as show:
        for step in range(start, config.steps):
            lr = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps, total_steps=config.steps)
            set_lr(optimizer, lr)
            batch = distributed.shard(sample_windows(train_tokens, config.batch_size, config.seq_len, data_rng))
            batch = batch.to(run.device)
            done = step + 1
            try:  # a non-finite number stops the stage before it is logged or checkpointed
                stats = train_step(distributed.global_loss(lambda: trained(batch, return_loss=True)),
                                   list(model.parameters()), optimizer, device=run.device, amp_dtype=run.amp_dtype)
                metrics = {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                           "tokens_per_s": clock.rate(tokens_per_step)}
                if done % config.eval_every == 0 or done == config.steps:
                    metrics["val_loss"] = validation_loss(model, heldout, config, run.device)
                    finite_or_raise("val_loss", metrics["val_loss"])
            except FloatingPointError as err:
                kept = (f"the last good checkpoint, step {ref.step}, is kept: {ref.uri}" if ref
                        else "no checkpoint was written")
                raise FloatingPointError(f"pretrain stopped at step {done} (lr {lr:.3g}): {err}; {kept}") from None
            run.metrics.log(done, **metrics)
            show(done, loss=stats["loss"])
            if done % config.checkpoint_every == 0 or done == config.steps:
                run.metrics.flush()  # the curve up to a checkpoint outlives a crash; a resume logs only later steps
                weights, optimizer_state = distributed.full_state(model, optimizer)
                if distributed.is_main():
                    ref = save_checkpoint(
                        run.prefix, done, weights, kind="palm", model_config=model_config,
                        stage_config=config.model_dump(mode="json"), data=data,
                        extra={**extra, "metrics": {k: v for k, v in metrics.items() if k != "tokens_per_s"}},
                        state={"optimizer": optimizer_state, "rng": capture_rng({"data": data_rng})})
                distributed.barrier()
    run.metrics.flush()
    sampler, sample_device = distributed.plain_copy(model, partial(build_model, config))
    if not distributed.is_main():  # rank 0 reports; the stage returns its result
        return ref, {}
    if not metrics:  # resumed at the final step: nothing left to train
        metrics = load_checkpoint(ref.uri, load_state=False).manifest.get("metrics", {})
    log_curves(run, ["loss", "val_loss"], "pretraining loss", "plots/loss.png")
    log_samples(run.run_id, sampler, device=sample_device, max_new_tokens=config.seq_len // 2, seed=config.seed)
    return ref, {k: metrics[k] for k in ("loss", "val_loss", "tokens_per_s") if k in metrics}


def run_pretrain(config: PretrainConfig, *, parent_run_id: str | None = None) -> StageResult:
    """The whole stage: check the corpus, then train (or reuse, or resume) and register `palm-pretrained`."""
    corpus = load_corpus(config)
    resolve_runtime(config.runtime)
    tracking.check_tracking()

    def log_inputs(run_id: str) -> None:
        tracking.log_text_dataset(run_id, name="corpus", source_uri=corpus.uri, digest=corpus.digest,
                                  context="training", preview=None)

    return distributed.execute("pretrain", config, inputs={"corpus": corpus.digest}, model_name=MODEL_NAME,
                               train_fn=partial(train, config=config, corpus=corpus),
                               lineage={"data.corpus": corpus.digest}, parent_run_id=parent_run_id,
                               log_inputs=log_inputs)
