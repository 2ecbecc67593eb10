"""Damaged checkpoints at the stage level: a stage refuses a damaged input with one error naming the file and the
failed check, before any compute, and registers nothing. (tests/tasks/test_store.py covers the store itself.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from tasks.config import apply_overrides, tiny
from tasks.ppo import run_ppo
from tasks.reward import run_reward
from tasks.storage.store import CheckpointError
from tests.reliability import copy_checkpoint, footprint, stderr_line, use_home, workspace


def truncate(folder: Path) -> None:
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def flip_byte(folder: Path) -> None:
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def drop(name: str):
    return lambda folder: (folder / name).unlink()


def unlist_weights(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["weights.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


# damage -> what the error must say: the file, and the check that failed
DAMAGE = {
    "truncated file": (truncate, r"weights\.safetensors size mismatch .*truncated"),
    "flipped byte": (flip_byte, r"weights\.safetensors sha256 mismatch"),
    "missing file": (drop("state.safetensors"), r"state\.safetensors is missing \(listed in manifest\.json\)"),
    "manifest without its weights": (drop("weights.safetensors"),
                                     r"weights\.safetensors is missing \(listed in manifest\.json\)"),
    "manifest listing no weights": (unlist_weights, r"manifest\.json lists no weights\.safetensors"),
    "weights without a manifest": (drop("manifest.json"), r"no checkpoint at this URI \(manifest\.json missing\)"),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return workspace(tmp_path_factory)


@pytest.fixture
def ws(shared, monkeypatch):
    use_home(monkeypatch, shared.home)
    return shared


@pytest.mark.parametrize("damage", DAMAGE)
def test_reward_stage_refuses_a_damaged_pretrained_model(damage, ws, tmp_path, capsys):
    harm, expected = DAMAGE[damage]
    folder = copy_checkpoint(ws.pretrained.checkpoint_uri, tmp_path / "step-00000002")
    harm(folder)
    config = tiny().reward
    before = footprint(ws.home)

    with pytest.raises(CheckpointError, match=expected) as raised:
        run_reward(config, str(folder))  # what a Prefect task or deployment runs
    assert str(folder) in str(raised.value)

    assert main(["stage", "reward", "--preset", "tiny", "--pretrained", str(folder)]) == 2
    line = stderr_line(capsys.readouterr().err)
    assert line == f"palm-rlhf: error: {raised.value}"
    assert footprint(ws.home) == before, "a damaged input must leave no run, file or model version behind"


def test_ppo_stage_refuses_a_damaged_reward_model(ws, tmp_path):
    folder = copy_checkpoint(ws.reward.checkpoint_uri, tmp_path / "step-00000002")
    flip_byte(folder)
    config = apply_overrides(tiny(), ["ppo.steps=1"]).ppo
    before = footprint(ws.home)
    with pytest.raises(CheckpointError, match=r"weights\.safetensors sha256 mismatch"):
        run_ppo(config, ws.pretrained.checkpoint_uri, str(folder))
    assert footprint(ws.home) == before


def test_a_registered_model_whose_checkpoint_changed_is_refused(ws, tmp_path):
    """The registry records a digest; a checkpoint replaced behind its back is not the model that was registered."""
    from tasks.tracking import client as tracking
    from tasks.tracking.registry import register_checkpoint
    from tasks.storage.inputs import InputError

    folder = Path(ws.pretrained.checkpoint_uri.removeprefix("file://"))
    manifest = json.loads((folder / "manifest.json").read_text())
    version = tracking.get_client().get_model_version("palm-pretrained", ws.pretrained.model_version)
    assert version.tags["checkpoint_digest"] == manifest["digest"]
    # Register a second version that names the same checkpoint under another digest, as if it had been swapped.
    other = register_checkpoint("palm-pretrained", checkpoint_uri=ws.pretrained.checkpoint_uri,
                                         digest="sha256:" + "0" * 64, run_id=ws.pretrained.mlflow_run_id, lineage={})
    before = footprint(ws.home)
    with pytest.raises(InputError, match="the registry says digest sha256:0+ but the checkpoint"):
        run_reward(tiny().reward, f"models:/palm-pretrained/{other}")
    assert footprint(ws.home) == before
