"""Stage inputs: a reward checkpoint is rebuilt from its manifest with the head it was trained with."""

from dataclasses import asdict

import pytest
import torch

from models.palm import PaLM
from models.reward import RewardModel
from tasks.storage.inputs import InputError, load_reward_model, resolve_input
from tasks.data.tokenizer import ByteTokenizer
from tasks.data.tokenizer import record as tokenizer_record
from tasks.storage.checkpoints import save_checkpoint

PALM = dict(num_tokens=258, dim=32, depth=1, heads=2, dim_head=16, ff_mult=2, max_seq_len=64)


def _reward_checkpoint(root, rm: RewardModel, model_config: dict) -> str:
    tokenizer = ByteTokenizer()
    return save_checkpoint(str(root), 1, rm.state_dict(), kind="reward", files={"tokenizer.json": tokenizer.to_file()},
                           extra={"tokenizer": tokenizer_record(tokenizer)},
                           model_config={"palm": asdict(rm.palm.config), **model_config}).uri


def _scores(rm: RewardModel) -> torch.Tensor:
    x = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :4] = True
    with torch.no_grad():
        return rm.score(x, prompt_mask=prompt_mask)


@pytest.mark.parametrize("head", ["mean-pooled", "per-token"])
def test_reward_model_loads_with_the_head_its_manifest_names(tmp_path, head):
    torch.manual_seed(0)
    rm = RewardModel(PaLM(**PALM), lora_r=4, head=head, head_hidden=8).eval()
    uri = _reward_checkpoint(tmp_path, rm, {"num_binned_output": 0, "lora_r": 4, "head": head, "head_hidden": 8})
    loaded = load_reward_model(resolve_input(uri, "reward", "--reward-model"), "cpu")
    assert loaded.head == head
    torch.testing.assert_close(_scores(loaded), _scores(rm))


def test_a_reward_manifest_that_does_not_name_its_head_is_refused_before_loading(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(PaLM(**PALM), lora_r=4).eval()
    uri = _reward_checkpoint(tmp_path, rm, {"num_binned_output": 0, "lora_r": 4})  # no "head", no "head_hidden"
    with pytest.raises(InputError, match=r"its manifest's model_config cannot build a 'reward' model \(KeyError: "):
        resolve_input(uri, "reward", "--reward-model")


def test_a_manifest_naming_the_wrong_head_is_refused_before_loading(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(PaLM(**PALM), lora_r=4, head="per-token", head_hidden=8)
    uri = _reward_checkpoint(tmp_path, rm, {"num_binned_output": 0, "lora_r": 4, "head": "mean-pooled",
                                            "head_hidden": 8})
    with pytest.raises(InputError, match="does not match the architecture in its manifest"):
        resolve_input(uri, "reward", "--reward-model")
