"""The files a served model carries, and loading them: what a registered version's MLflow model holds.

    model.json           what the folder is: its kind (palm, policy, reward), the PaLM's architecture, each file with
                         its size and sha256, and the checkpoint it was made from
    weights.safetensors  the model's weights; for a policy, the actor's LoRA merged into the base: one plain PaLM
    reward.safetensors   a policy's reward model (the one PPO trained against), for best-of-n
    tokenizer.json       the tokenizer the model was trained with (bytes or BPE, with its end-of-text token)

Reading checks every file against model.json before building a tensor, and needs torch, safetensors and models/ only:
it is what runs inside `mlflow models serve`. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from models.palm import PaLM
from models.reward import RewardModel
from models.sampling import sampling_dtype
from tasks.data.tokenizer import Tokenizer, tokenizer_from_file

BUNDLE_FORMAT = 1
MODEL_JSON = "model.json"
WEIGHTS, REWARD_WEIGHTS, TOKENIZER = "weights.safetensors", "reward.safetensors", "tokenizer.json"
KINDS = ("palm", "policy", "reward")


class BundleError(ValueError):
    """A served model's files are missing, damaged or not of this format."""


@dataclass
class Bundle:
    """A loaded served model: a PaLM that answers prompts (kind palm or policy) and/or a reward model that scores
    answers (kind reward, or the reward model a policy bundles for best-of-n)."""

    kind: str
    info: dict  # model.json
    tokenizer: Tokenizer
    device: torch.device
    palm: PaLM | None = None
    reward: RewardModel | None = None
    rating_scale: tuple[float, float] | None = None  # the reward model's score as a rating, where it was trained on one
    defaults: dict = field(default_factory=dict)  # generation settings the model was trained with

    @property
    def context(self) -> int:
        model = self.palm if self.palm is not None else self.reward.palm
        return model.config.max_seq_len


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": sha256(data)}


def _verified(folder: Path, name: str, entry: dict) -> bytes:
    path = folder / name
    if not path.is_file():
        raise BundleError(f"{folder}: {name} is missing (listed in {MODEL_JSON})")
    data = path.read_bytes()
    if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
        raise BundleError(f"{folder}: {name} does not match the size and sha256 in {MODEL_JSON}")
    return data


def read_info(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        info = json.loads((folder / MODEL_JSON).read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder} holds no {MODEL_JSON}: not a palm-rlhf served model") from None
    except ValueError as err:
        raise BundleError(f"{folder}/{MODEL_JSON} is not JSON ({err})") from None
    if info.get("format") != BUNDLE_FORMAT or info.get("kind") not in KINDS:
        raise BundleError(f"{folder}/{MODEL_JSON}: format {info.get('format')!r}, kind {info.get('kind')!r}; this code "
                          f"reads format {BUNDLE_FORMAT} of kind {', '.join(KINDS)}")
    return info


def read_bundle(folder: str | Path, device: str | torch.device | None = None,
                sampling_precision: str = "auto") -> Bundle:
    """Load a served model's folder onto `device` (the GPU when there is one, by default), in eval mode. The writer
    answers in `sampling_precision`: "auto" is bf16 on a GPU and fp32 on a CPU (where bf16 decoding measured slower,
    benchmarks/RESULTS.md); a reward model always scores in fp32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dtype = sampling_dtype(sampling_precision, device)
    except ValueError as err:
        raise BundleError(str(err)) from None
    folder = Path(folder)
    info = read_info(folder)
    files = info["files"]
    tokenizer = tokenizer_from_file(_verified(folder, TOKENIZER, files[TOKENIZER]))
    bundle = Bundle(info["kind"], info, tokenizer, device, defaults=info.get("defaults", {}))
    if info["kind"] in ("palm", "policy"):
        bundle.palm = _module(PaLM.from_config(info["palm"]), _verified(folder, WEIGHTS, files[WEIGHTS]), device)
        if dtype is not None:
            bundle.palm = bundle.palm.to(dtype)  # it only samples: nothing trains or takes log-probs here
    reward = info.get("reward")
    if reward is not None:
        name = WEIGHTS if info["kind"] == "reward" else REWARD_WEIGHTS
        model = RewardModel.from_config(PaLM.from_config(reward["palm"]), reward["model_config"])
        bundle.reward = _module(model, _verified(folder, name, files[name]), device)
        scale = reward.get("rating_scale")
        bundle.rating_scale = tuple(scale) if scale else None
    return bundle


def _module(module: torch.nn.Module, weights: bytes, device) -> torch.nn.Module:
    module.load_state_dict(load_safetensors(weights))
    return module.to(device).eval()
