"""Numerical faults: a learning rate of 1e30 makes each training stage diverge within a step or two. The stage stops
with a FloatingPointError naming the stage, the step and the number that went bad; checkpoints written before it
stay whole (and finite), none is written after it, the MLflow run is FAILED, and no model version is registered."""

from __future__ import annotations

import pytest
import torch

from tasks.tracking import client as tracking
from tasks.config import apply_overrides, tiny
from tasks.ppo import run_ppo
from tasks.pretrain import run_pretrain
from tasks.reward import run_reward
from tasks.runtime.stage import STAGE_TAG
from tasks.storage.checkpoints import list_checkpoints, load_checkpoint
from tests.reliability import footprint, use_home, workspace


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return workspace(tmp_path_factory)


@pytest.fixture
def ws(shared, monkeypatch):
    use_home(monkeypatch, shared.home)
    return shared


def check_stopped(stage: str, before: dict, ws, kept_steps: list[int]) -> str:
    """The one MLflow run the stage opened is FAILED, only finite checkpoints were kept, nothing was registered."""
    client = tracking.get_client()
    after = footprint(ws.home)
    new = [client.get_run(r) for r in after["runs"] if r not in before["runs"]]
    assert len(new) == 1 and new[0].data.tags[STAGE_TAG] == stage
    run = new[0]
    assert run.info.status == "FAILED" and "FloatingPointError" in run.data.tags["error"]
    prefix = run.data.tags["checkpoint_prefix"]
    assert [c.step for c in list_checkpoints(prefix)] == kept_steps
    for ref in list_checkpoints(prefix):  # what is kept loads whole and holds only finite numbers
        assert all(torch.isfinite(t).all() for t in load_checkpoint(ref.uri).weights.values())
    assert after["versions"] == before["versions"], "a diverged stage must register nothing"
    return run.info.run_id


def test_pretraining_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint(ws):
    config = apply_overrides(tiny(), ["pretrain.steps=6", "pretrain.checkpoint_every=1", "pretrain.lr=1e30"]).pretrain
    stopped = (r"^pretrain stopped at step 2 \(lr 1e\+30\): loss is nan.*"
               r"the last good checkpoint, step 1, is kept: file://")
    before = footprint(ws.home)
    with pytest.raises(FloatingPointError, match=stopped):
        run_pretrain(config)
    run_id = check_stopped("pretrain", before, ws, kept_steps=[1])

    # The same command again resumes in the same MLflow run from step 1, and diverges the same way.
    with pytest.raises(FloatingPointError, match=stopped):
        run_pretrain(config)
    assert check_stopped("pretrain", before, ws, kept_steps=[1]) == run_id


def test_reward_fitting_stops_before_checkpointing_nan_scores(ws):
    config = apply_overrides(tiny(), ["reward.steps=4", "reward.checkpoint_every=1", "reward.lr=1e30"]).reward
    before = footprint(ws.home)
    with pytest.raises(FloatingPointError, match=r"^reward stopped at step 1 \(lr 1e\+30\): heldout_\w+ is nan; "
                                                 r"no checkpoint was written"):
        run_reward(config, ws.pretrained.checkpoint_uri)
    check_stopped("reward", before, ws, kept_steps=[])


def test_ppo_stops_when_an_update_leaves_the_policy_non_finite(ws):
    config = apply_overrides(tiny(), ["ppo.steps=4", "ppo.checkpoint_every=1", "ppo.actor_lr=1e30"]).ppo
    before = footprint(ws.home)
    with pytest.raises(FloatingPointError, match=r"^ppo stopped at step 1 \(actor_lr 1e\+30\): the policy's logits "
                                                 r"are no longer finite"):
        run_ppo(config, ws.pretrained.checkpoint_uri, ws.reward.checkpoint_uri)
    check_stopped("ppo", before, ws, kept_steps=[])
