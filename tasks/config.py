"""One typed config per stage, presets as small functions, and `stage.key=value` overrides.

Prefect validates these pydantic models as flow parameters; the CLI builds them from a preset plus `--set` strings.
Every training stage has `steps`, `checkpoint_every` and `seed`. The model architecture is set once, in pretraining:
later stages read it from the checkpoint's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

from models.palm import PaLMConfig
from models.ppo import PPOConfig as PPOAlgorithm
from models.reward import RewardModelConfig

def _positive_number(value) -> bool:
    try:
        return not isinstance(value, bool) and float(value) > 0
    except (TypeError, ValueError):
        return False


class ConfigError(ValueError):
    """A bad preset, setting or value; the message names it."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Runtime(_Config):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: cuda when there is one; cpu, cuda, cuda:1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on CPU
    # the weights tokens are drawn with (simulated feedback, PPO rollouts, evaluation): auto is bf16 on a GPU and fp32
    # on a CPU, where bf16 sampling measured slower at every batch size (benchmarks/RESULTS.md). Training, log-probs,
    # KL and scores stay in `precision`.
    sampling_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Data-parallel training (tasks/runtime/launch.py): nproc_per_node processes on each of nnodes machines.
    nproc_per_node: PositiveInt = 1  # one per GPU
    nnodes: PositiveInt = 1
    node_rank: int = Field(0, ge=0)  # this machine's place; node 0 owns the MLflow run and the checkpoints
    rdzv_endpoint: str | None = Field(None, pattern=r"^\S+:\d+$")  # node 0's host:port, needed with nnodes > 1
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards weights, gradients and optimizer state across ranks
    collective_timeout_s: PositiveInt = 600  # a rank stuck this long in a collective fails the stage
    # Reuse an earlier run of the same config and inputs made by other code (tasks/runtime/fingerprint.py), when no
    # run of this code exists: for a change its author knows leaves the stage's output alone. Never by default.
    reuse_across_code: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _placement(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes is {self.nnodes}: set rdzv_endpoint to node 0's host:port")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be below nnodes ({self.nnodes})")
        if self.nproc_per_node > 1 and ":" in self.device:
            raise ValueError(f"device {self.device!r} names one GPU but nproc_per_node is {self.nproc_per_node}: "
                             "use device=cuda (rank i takes GPU i) and CUDA_VISIBLE_DEVICES to choose them")
        return self


def _split_evenly(runtime: Runtime, **sizes: int) -> None:
    """Every rank trains on an equal slice of the global batch, so a step means the same on any number of ranks."""
    for name, size in sizes.items():
        if size % runtime.world_size:
            raise ValueError(f"{name} ({size}) must be divisible by the number of processes, runtime.nproc_per_node "
                             f"x runtime.nnodes = {runtime.world_size}")


BYTES_VOCAB = 258  # UTF-8 bytes, end-of-text and padding (tasks/data/tokenizer.py)
DEFAULT_BPE_VOCAB = 4096


class PretrainConfig(_Config):
    corpus: str | None = None  # fsspec URL (text, Parquet, JSONL); None: the built-in CPython documentation text
    text_column: str = "text"
    # bytes: UTF-8 bytes; bpe: a byte-level BPE trained on the corpus before the first step. Either way an
    # end-of-text token follows every document, and every later stage and served model uses this tokenizer.
    tokenizer: Literal["bytes", "bpe"] = "bytes"
    vocab_size: PositiveInt | None = None  # bpe's vocabulary (4096 unless set); bytes has 258
    # the architecture, set here only: later stages read it from the checkpoint. num_tokens follows the tokenizer's
    # vocabulary unless set
    model: PaLMConfig = PaLMConfig(num_tokens=BYTES_VOCAB, dim=128, depth=4, heads=4, dim_head=32, ff_mult=4,
                                   max_seq_len=256)
    steps: PositiveInt = 600
    batch_size: PositiveInt = 16
    seq_len: PositiveInt = 128
    lr: PositiveFloat = 3e-3
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    heldout_fraction: float = Field(0.05, gt=0, lt=1)
    eval_every: PositiveInt = 100
    checkpoint_every: PositiveInt = 200
    seed: int = 0
    runtime: Runtime = Runtime()

    @property
    def tokenizer_vocab(self) -> int:
        return BYTES_VOCAB if self.tokenizer == "bytes" else self.vocab_size or DEFAULT_BPE_VOCAB

    @model_validator(mode="before")
    @classmethod
    def _vocabulary_follows_the_tokenizer(cls, data):
        """A model left at the default vocabulary gets the tokenizer's; one set otherwise keeps it (and is checked)."""
        if not isinstance(data, dict) or data.get("tokenizer", "bytes") == "bytes":
            return data
        model = data.get("model")
        model = dataclasses.asdict(model) if dataclasses.is_dataclass(model) else dict(model or {})
        if model.get("num_tokens", BYTES_VOCAB) == BYTES_VOCAB:
            vocab = data.get("vocab_size") or DEFAULT_BPE_VOCAB
            defaults = dataclasses.asdict(cls.model_fields["model"].default)
            data = {**data, "model": {**defaults, **model, "num_tokens": vocab}}
        return data

    @model_validator(mode="after")
    def _fits_context(self):
        if self.tokenizer == "bytes" and self.vocab_size not in (None, BYTES_VOCAB):
            raise ValueError(f"vocab_size ({self.vocab_size}) is for the bpe tokenizer; bytes has {BYTES_VOCAB} ids")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) is longer than the model context model.max_seq_len "
                             f"({self.model.max_seq_len})")
        if not self.model.causal:
            raise ValueError("model.causal must be true: pretraining predicts each next token from the ones before")
        if self.model.num_tokens < self.tokenizer_vocab:
            what = "byte tokens" if self.tokenizer == "bytes" else "the BPE vocabulary"
            raise ValueError(f"model.num_tokens ({self.model.num_tokens}) is too small for {what} "
                             f"({self.tokenizer_vocab})")
        _split_evenly(self.runtime, batch_size=self.batch_size)
        return self


class RewardConfig(_Config):
    feedback: str | None = None  # a feedback table URL; None: simulate it with `labeler` on the pretrained policy
    labeler: str = "builtin:real-words"  # or "package.module:attr"
    num_prompts: PositiveInt = 2048  # simulated feedback: prompts x samples_per_prompt rated responses
    samples_per_prompt: PositiveInt = 4
    prompt_chars: PositiveInt = 32
    response_tokens: PositiveInt = 64
    # one sampling temperature, or several that the samples of each prompt take in turn: feedback on sharper text
    # too, which is where PPO will take the policy (the reward model must know that region, not only T = 1)
    temperature: PositiveFloat | list[PositiveFloat] = [1.0, 0.9, 0.8, 0.7]
    # a clear preference between two rated answers: stars on a five-star scale (a quarter of it per star on others)
    pair_margin: float = Field(1.5, gt=0)
    # the ratings' scale, e.g. [0, 1] for thumbs or [1, 10]; None: the feedback's lowest and highest rating (the
    # simulated labeler's is [1, 5]). The reward model's scores and reports speak in it.
    rating_scale: tuple[float, float] | None = None
    on_too_long: Literal["cut", "drop", "error"] = "cut"  # a row longer than the context: cut it to fit, drop, refuse
    # the head and LoRA (models.reward.RewardModelConfig): per-token, an MLP scores each response token from its
    # embedding and log-likelihood and the reward is their mean; mean-pooled, the reference's linear head on the mean
    # embedding (models/reward.py says why per-token is better). num_binned_output: 0 = scalar head (MSE on ratings)
    model: RewardModelConfig = RewardModelConfig(num_binned_output=0, lora_r=16, head="per-token", head_hidden=64)
    # 300 steps of 64 rows at 2e-3 fit the demo's feedback as well as 700 of 32 at 1e-3 did (held-out pair accuracy
    # 0.880 against 0.875) in two thirds of the time (benchmarks/RESULTS.md)
    steps: PositiveInt = 300
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    checkpoint_every: PositiveInt = 100
    seed: int = 0
    runtime: Runtime = Runtime()

    @property
    def temperatures(self) -> list[float]:
        return self.temperature if isinstance(self.temperature, list) else [self.temperature]

    @field_validator("temperature", mode="before")
    @classmethod
    def _one_or_several(cls, value):
        # one message for either shape, not one per branch of the union
        values = value if isinstance(value, list) else [value]
        if not values or not all(_positive_number(v) for v in values):
            raise ValueError("give one temperature above 0 or a non-empty list of them")
        return value

    @field_validator("rating_scale")
    @classmethod
    def _low_to_high(cls, value):
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"give the lowest and then the highest rating, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _ranks(self):
        _split_evenly(self.runtime, batch_size=self.batch_size)
        return self


class PPOConfig(_Config):
    # training prompts: a file URL (JSONL/CSV/Parquet with a `prompt` column, or text lines); None: the feedback file's
    # training prompts, or (the built-in demo, whose feedback is simulated) prompts cut from the corpus
    prompts: str | None = None
    num_prompts: PositiveInt = 512
    prompt_chars: PositiveInt = 32
    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 1.0
    steps: PositiveInt = 60  # PPO iterations: one batch of rollouts and its update each
    rollout_batch: PositiveInt = 32
    minibatch_size: PositiveInt = 16
    # PPO's own hyperparameters (models.ppo.PPOConfig): kl_coef, clip_eps, ppo_epochs, gamma, lam, dense_rewards, ...
    # The KL budget: the coefficient adapts toward kl_target nats per answer (Ziegler et al. 2019), moving by up to
    # 20% x rollout_batch / kl_horizon per step. Set adaptive_kl=false for a fixed kl_coef.
    algorithm: PPOAlgorithm = PPOAlgorithm(ppo_epochs=2, kl_coef=0.15, adaptive_kl=True, kl_target=6.0,
                                           kl_horizon=320)
    # the reward PPO sees is held within this many standard deviations of the reward model's training responses'
    # scores: past them the reward model is guessing, and a policy paid for going there learns to game it. None:
    # unbounded.
    reward_bound: PositiveFloat | None = 3.0
    actor_lr: PositiveFloat = 1e-3
    critic_lr: PositiveFloat = 1e-3
    actor_lora: bool = True
    lora_r: PositiveInt = 16
    checkpoint_every: PositiveInt = 20
    seed: int = 0
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _ranks(self):
        if self.runtime.strategy == "fsdp" and self.runtime.world_size > 1:
            raise ValueError("runtime.strategy fsdp is for pretraining and reward fitting; PPO trains LoRA weights "
                             "that fit every rank, so it all-reduces gradients (strategy ddp)")
        _split_evenly(self.runtime, rollout_batch=self.rollout_batch, minibatch_size=self.minibatch_size)
        return self


class EvalConfig(_Config):
    # held-out prompts: a file URL; None: the feedback file's held-out prompts, or (the built-in demo, whose feedback
    # is simulated) held-out prompts cut from the corpus
    prompts: str | None = None
    # the oracle, a rater no model saw: a spec as reward.labeler takes; None: the simulated feedback's own rater for
    # the built-in demo, and no oracle when you brought feedback (no stars are made up for your data)
    labeler: str | None = None
    num_prompts: PositiveInt = 64
    prompt_chars: PositiveInt = 32
    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 1.0  # every policy's, and the baseline every win rate is against: pretrained at it
    n_values: list[PositiveInt] = [1, 4, 16]
    # what a user could do without RLHF: the pretrained policy sampled at these temperatures too ("pretrained_t070"
    # is T = 0.70), each with baseline_samples answers per prompt
    temperatures: list[PositiveFloat] = [0.7, 0.85]
    baseline_samples: PositiveInt = 4
    # the frontier: this many of the PPO run's checkpoints (evenly spaced) measured too, baseline_samples each
    frontier_checkpoints: NonNegativeInt = 4
    # the alarms (tasks/evaluation/alarms.py): collapse below these shares of the pretrained policy's distinct-2 and
    # entropy, or one answer above this share of all; runaway past kl_factor x the PPO run's KL budget, or a reward
    # model score this many standard deviations past its training responses'; hacking when the oracle falls this
    # share of its scale below its best while the reward model's score rises
    alarm_diversity: float = Field(0.5, ge=0, le=1)
    alarm_entropy: float = Field(0.25, ge=0, le=1)
    alarm_same_answer: float = Field(0.25, gt=0, le=1)
    alarm_kl_factor: PositiveFloat = 2.0
    alarm_reward_sd: PositiveFloat = 4.0
    alarm_oracle_drop: float = Field(0.1, gt=0, le=1)
    num_examples: PositiveInt = 8  # sample generations logged for people to read
    seed: int = 0
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _one_process(self):
        if self.runtime.world_size > 1:
            raise ValueError("evaluation runs in one process: leave runtime.nproc_per_node and runtime.nnodes at 1")
        return self


class PipelineConfig(_Config):
    pretrain: PretrainConfig = PretrainConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()


STAGES = ("pretrain", "reward", "ppo", "eval")


def demo() -> PipelineConfig:
    """The default: minutes per stage on a 2-core CPU, enough to watch RLHF raise the labeler's rating."""
    return PipelineConfig()


def demo_hard() -> PipelineConfig:
    """The demo's model and budget with a rater whose taste the base model lacks (`builtin:a-to-m`: the share of
    real words that begin with a to m, tasks/data/labeler.py): its likelihood ranks the held-out pairs near chance
    (0.51), and sampling at T = 0.7 buys 0.04 stars, so what PPO gains (1.4 stars, README) is what RLHF taught it."""
    config = demo()
    config.reward.labeler = "builtin:a-to-m"
    return config


def tiny() -> PipelineConfig:
    """Seconds per stage on CPU: for tests and smoke runs. Numbers mean nothing at this size."""
    model = PaLMConfig(num_tokens=BYTES_VOCAB, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=96)
    return PipelineConfig(
        pretrain=PretrainConfig(model=model, steps=12, batch_size=4, seq_len=48, warmup_steps=2, eval_every=6,
                                checkpoint_every=6),
        reward=RewardConfig(num_prompts=12, samples_per_prompt=3, prompt_chars=16, response_tokens=12,
                            model=RewardModelConfig(lora_r=4, head="per-token", head_hidden=64), steps=8, batch_size=8,
                            lr=1e-3, checkpoint_every=4),
        ppo=PPOConfig(num_prompts=16, prompt_chars=16, max_new_tokens=12, steps=4, rollout_batch=4, minibatch_size=4,
                      algorithm=PPOAlgorithm(ppo_epochs=1, kl_coef=0.15, adaptive_kl=True, kl_target=6.0,
                                             kl_horizon=320), lora_r=4, checkpoint_every=2),
        eval=EvalConfig(num_prompts=4, prompt_chars=16, max_new_tokens=12, n_values=[1, 4, 16], num_examples=2,
                        temperatures=[0.7], baseline_samples=2, frontier_checkpoints=2),
    )


PRESETS = {"demo": demo, "demo-hard": demo_hard, "tiny": tiny}


def preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def _parse_value(text: str):
    """JSON when it parses (numbers, true/false, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: BaseModel, overrides: list[str] | tuple[str, ...], prefix: str = "") -> BaseModel:
    """Apply `a.b.c=value` settings to a config, validating each; errors name the setting."""
    data = config.model_dump()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        path = _shorthand(type(config), key.split("."))
        node, group = data, type(config)
        for depth, part in enumerate(path):
            settings = _settings(group)
            if part not in settings:
                where = prefix + ".".join(path[:depth]) if depth or prefix else "the config"
                raise ConfigError(f"unknown setting {prefix + key!r}: {where} has {', '.join(sorted(settings))}")
            if depth == len(path) - 1:
                node[part] = _parse_value(raw)
            elif not _settings(settings[part]):
                raise ConfigError(f"setting {prefix + '.'.join(path[:depth + 1])!r} has no sub-settings")
            else:
                node, group = node[part], settings[part]
    return validate(type(config), data, prefix)


def _settings(group) -> dict[str, object]:
    """A group's settings by name (their types): a config's fields, or a models/ config dataclass's; {} for a value."""
    if isinstance(group, type) and issubclass(group, BaseModel):
        return {name: field.annotation for name, field in group.model_fields.items()}
    if isinstance(group, type) and dataclasses.is_dataclass(group):
        hints = typing.get_type_hints(group)
        return {f.name: hints[f.name] for f in dataclasses.fields(group)}
    return {}


def _shorthand(group, path: list[str]) -> list[str]:
    """A setting of a group nested one level down may be named without it, where no other group has that name:
    `ppo.kl_coef` is `ppo.algorithm.kl_coef`, `reward.head` is `reward.model.head`, `pretrain.nproc_per_node` is
    `pretrain.runtime.nproc_per_node`."""
    for part in path[:-1]:
        group = _settings(group).get(part)
        if not _settings(group):
            return path
    settings, last = _settings(group), path[-1]
    if last in settings:
        return path
    owners = [name for name, kind in settings.items() if last in _settings(kind)]
    return [*path[:-1], owners[0], last] if len(owners) == 1 else path


def as_params(config: BaseModel) -> dict:
    """A stage's settings as its MLflow params: the hyperparameter objects that models/ defines (the PaLM and reward
    model's architecture, PPO's algorithm) are spread at the stage's level, by the names `--set` takes for them
    (`kl_coef`, `head`, `dim`); runtime settings stay under `runtime.`."""
    params = config.model_dump(mode="json")
    for name, kind in _settings(type(config)).items():
        if dataclasses.is_dataclass(kind):
            spread = params.pop(name)
            clash = sorted(spread.keys() & params.keys())
            if clash:
                raise ConfigError(f"{type(config).__name__}.{name} repeats the stage's own settings {clash}")
            params.update(spread)
    return params


def validate(model: type[BaseModel], data: dict, prefix: str = "") -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = prefix + ".".join(str(p) for p in e["loc"]) if e["loc"] else (prefix.rstrip(".") or "config")
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            problems.append(f"{where}: {e['msg']}{got}")
        raise ConfigError("; ".join(problems)) from None
