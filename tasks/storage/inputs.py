"""Model inputs of a stage: resolve a checkpoint or registry URI, check its kind, and build the model from it.

A downstream stage never restates an architecture: it reads it from the checkpoint's manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import fsspec
import torch

from models.actor_critic import ActorCritic
from models.palm import PaLM
from models.reward import RewardModel
from tasks.data.tokenizer import Tokenizer, TokenizerError, digest, tokenizer_from_file
from tasks.redact import redact_uri
from tasks.storage.checkpoints import WEIGHTS, checkpoint_file, load_checkpoint, read_manifest, verify_checkpoint
from tasks.storage.store import join_uri, read_file
from tasks.tracking.registry import resolve_model_uri


TOKENIZER_FILE = "tokenizer.json"  # every checkpoint carries the tokenizer its model reads and writes


class InputError(ValueError):
    """A stage input that cannot be used: wrong kind, digest mismatch, missing."""


@dataclass
class ModelInput:
    requested: str  # what the user gave: a checkpoint URI or models:/name@alias
    checkpoint_uri: str
    digest: str
    manifest: dict
    name: str | None = None
    version: str | None = None

    @property
    def ref(self) -> str:
        """How lineage names it: "palm-reward/3" for a registered model, else the checkpoint URI."""
        return f"{self.name}/{self.version}" if self.name else redact_uri(self.checkpoint_uri)

    @property
    def palm_config(self) -> dict:
        cfg = self.manifest["model_config"]
        return cfg["palm"] if "palm" in cfg else cfg

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer this model was trained with: the tokenizer.json its checkpoint carries (read once)."""
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = tokenizer_from_file(checkpoint_file(self.checkpoint_uri, TOKENIZER_FILE))
        return self._tokenizer


def resolve_input(uri: str, kind: str, role: str) -> ModelInput:
    """Resolve and check one model input before any compute: its kind, every file's sha256, its vocabulary, and that
    its weights have the shapes of the architecture its manifest describes (checked without building tensors)."""
    if not uri:
        raise InputError(f"{role}: no model given")
    info = resolve_model_uri(uri)
    manifest = read_manifest(info["checkpoint_uri"])
    if manifest.get("kind") != kind:
        raise InputError(f"{role} {redact_uri(uri)} is a {manifest.get('kind')!r} checkpoint; this stage needs a "
                         f"{kind!r} checkpoint")
    if info["digest"] and info["digest"] != manifest["digest"]:
        raise InputError(f"{role} {redact_uri(uri)}: the registry says digest {info['digest']} but the checkpoint "
                         f"at {redact_uri(info['checkpoint_uri'])} has {manifest['digest']}")
    verify_checkpoint(info["checkpoint_uri"])  # a torn or corrupt input fails here, naming the file and the check
    found = ModelInput(uri, info["checkpoint_uri"], manifest["digest"], manifest, info["name"], info["version"])
    _check_tokenizer(found, role)
    _check_architecture(found, role)
    return found


def _check_tokenizer(inp: ModelInput, role: str) -> None:
    """The checkpoint carries the tokenizer its manifest names, and its model has an embedding for every id."""
    record = inp.manifest.get("tokenizer")
    if not isinstance(record, dict) or TOKENIZER_FILE not in inp.manifest["files"]:
        raise InputError(f"{role} {redact_uri(inp.requested)} carries no tokenizer ({TOKENIZER_FILE}): it was made "
                         "before checkpoints recorded theirs; retrain it")
    try:
        tokenizer = inp.tokenizer
    except TokenizerError as err:
        raise InputError(f"{role} {redact_uri(inp.requested)}: {TOKENIZER_FILE} {err}") from None
    if digest(tokenizer) != record.get("digest"):
        raise InputError(f"{role} {redact_uri(inp.requested)}: {TOKENIZER_FILE} is not the tokenizer its manifest "
                         f"names ({record.get('digest')})")
    vocab = inp.palm_config["num_tokens"]
    if vocab < tokenizer.vocab_size:
        what = "byte tokens need" if tokenizer.kind == "bytes" else "its BPE tokenizer has"
        raise InputError(f"{role} {redact_uri(inp.requested)} has a vocabulary of {vocab} tokens; {what} "
                         f"{tokenizer.vocab_size} (ids {vocab} and up would be out of range)")


def _empty_model(inp: ModelInput) -> torch.nn.Module:
    """The module the manifest describes, on the meta device: shapes without memory."""
    cfg = inp.manifest["model_config"]
    with torch.device("meta"):
        if inp.manifest["kind"] == "palm":
            return PaLM.from_config(cfg)
        palm = PaLM.from_config(cfg["palm"])
        return RewardModel.from_config(palm, cfg) if inp.manifest["kind"] == "reward" else build_actor_critic(palm, cfg)


def _check_architecture(inp: ModelInput, role: str) -> None:
    """Compare the safetensors header (names and shapes) with the manifest's architecture, before any compute."""
    with fsspec.open(join_uri(inp.checkpoint_uri, WEIGHTS), "rb") as f:  # verified just before: the header parses
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    found = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    try:
        expected = {k: list(v.shape) for k, v in _empty_model(inp).state_dict().items()}
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{role} {redact_uri(inp.requested)}: its manifest's model_config cannot build a "
                         f"{inp.manifest['kind']!r} model ({type(err).__name__}: {err})") from None
    if found == expected:
        return
    wrong = sorted(k for k in found.keys() & expected.keys() if found[k] != expected[k])
    if wrong:
        detail = f"{wrong[0]} has shape {found[wrong[0]]}, the architecture needs {expected[wrong[0]]}"
    else:
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
    raise InputError(f"{role} {redact_uri(inp.requested)}: {WEIGHTS} does not match the architecture in its manifest "
                     f"({detail})")


def check_same_base(a: ModelInput, b: ModelInput) -> None:
    """Models that read each other's tokens (a policy and the reward model scoring it) share one tokenizer and one
    vocabulary: the same ids mean the same text to both."""
    ta, tb = a.manifest["tokenizer"]["digest"], b.manifest["tokenizer"]["digest"]
    if ta != tb:
        raise InputError(f"{a.ref} and {b.ref} were trained with different tokenizers ({ta} and {tb}): the same ids "
                         "would mean different text to them")
    va, vb = a.palm_config["num_tokens"], b.palm_config["num_tokens"]
    if va != vb:
        raise InputError(f"vocabulary sizes differ: {a.ref} has {va} tokens, {b.ref} has {vb}")


def _weights(inp: ModelInput) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(inp.checkpoint_uri, load_state=False)  # verifies every sha256 first
    if ckpt.ref.digest != inp.digest:
        raise InputError(f"{inp.ref} changed while this stage was starting ({inp.digest} -> {ckpt.ref.digest})")
    return ckpt.weights


def load_palm(inp: ModelInput, device) -> PaLM:
    palm = PaLM.from_config(inp.palm_config)
    _load(palm, _weights(inp), inp)
    return palm.to(device)


def load_reward_model(inp: ModelInput, device) -> RewardModel:
    cfg = inp.manifest["model_config"]
    rm = RewardModel.from_config(PaLM.from_config(cfg["palm"]), cfg)
    _load(rm, _weights(inp), inp)
    return rm.to(device).eval()


def build_actor_critic(palm: PaLM, model_config: dict) -> ActorCritic:
    return ActorCritic(palm, actor_lora=model_config["actor_lora"], critic_lora=model_config["critic_lora"],
                       lora_r=model_config["lora_r"])


def load_policy(inp: ModelInput, device) -> ActorCritic:
    cfg = inp.manifest["model_config"]
    ac = build_actor_critic(PaLM.from_config(cfg["palm"]), cfg)
    _load(ac, _weights(inp), inp)
    return ac.to(device).eval()


def _load(module: torch.nn.Module, weights: dict, inp: ModelInput) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise InputError(f"{inp.ref}: weights do not match the architecture in its manifest ({first})") from None


def corpus_sample(pretrained: ModelInput) -> tuple[str, str]:
    """The text sample of the corpus the base model was pretrained on (prompts are cut from it, the built-in rater
    learns its words), checked against the sha256 its manifest records; and the corpus's digest. The corpus itself is
    never read again."""
    corpus = pretrained.manifest.get("corpus") or {}
    sample = corpus.get("sample") or {}
    if "uri" not in sample:
        raise InputError(f"{pretrained.ref}: its manifest records no corpus sample; pass a prompts file instead")
    data = read_file(sample["uri"])
    if data is None or hashlib.sha256(data).hexdigest() != sample["sha256"]:
        raise InputError(f"{pretrained.ref}: its corpus sample {redact_uri(sample['uri'])} is "
                         f"{'missing' if data is None else 'not the one it recorded'}: rerun pretraining, or pass "
                         "prompts files")
    return data.decode("utf-8"), corpus["digest"]


def feedback_prompts(reward: ModelInput, split: str) -> list[str] | None:
    """The training ("train") or held-out ("heldout") prompts of the feedback the reward model was fitted on, as its
    stage wrote them; None when that feedback was simulated (its prompts came from the corpus)."""
    from tasks.data.prompts import read_prompts

    record = (reward.manifest.get("prompts") or {}).get(split)
    if record is None:
        return None
    data = read_file(record["uri"])
    if data is None or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise InputError(f"{reward.ref}: its {split} prompts {redact_uri(record['uri'])} are "
                         f"{'missing' if data is None else 'not the ones it recorded'}: rerun the reward stage, or "
                         "pass a prompts file")
    return read_prompts(record["uri"])


@dataclass
class Upstream:
    """What a stage's files are checked against: the context length and tokenizer of the model it builds on, and the
    text sample of the corpus that model was pretrained on (prompts are cut from it, the built-in rater learns its
    words there). Of a checkpoint that exists (`Upstream.of`), or of the model a pipeline is about to pretrain (its
    corpus scanned and its tokenizer made as pretraining will), so that its later stages' files are checked before the
    first compute. The sample and tokenizer are made only when asked for."""

    context: int
    plan: Callable[[], tuple[str, str, Tokenizer]]  # () -> (corpus sample, corpus digest, tokenizer)

    @cached_property
    def _planned(self) -> tuple[str, str, Tokenizer]:
        return self.plan()

    @property
    def corpus(self) -> tuple[str, str]:
        """(the corpus sample, the corpus digest)."""
        return self._planned[0], self._planned[1]

    @property
    def tokenizer(self) -> Tokenizer:
        return self._planned[2]

    @classmethod
    def of(cls, model: ModelInput) -> "Upstream":
        return cls(model.palm_config["max_seq_len"], lambda: (*corpus_sample(model), model.tokenizer))
