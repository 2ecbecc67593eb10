"""The one training loop, through the stages' own entry points: a stage cut off after a checkpoint and run again ends
at the same bytes as one that never stopped, and checkpoints come every N steps and at the end."""

from __future__ import annotations

import pytest

from tasks.config import apply_overrides, tiny
from tasks.ppo import PPOTraining, run_ppo
from tasks.pretrain import Pretraining, run_pretrain
from tasks.reward import RewardFitting, run_reward
from tasks.storage.checkpoints import list_checkpoints, load_checkpoint

SETTINGS = ["pretrain.steps=9", "pretrain.checkpoint_every=3", "pretrain.eval_every=3",
            "reward.steps=6", "reward.checkpoint_every=2",
            "ppo.steps=6", "ppo.checkpoint_every=2", "ppo.adaptive_kl=true", "ppo.kl_target=0.01"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    def use(name: str):
        monkeypatch.setenv("PALM_RLHF_HOME", str(tmp_path / name))
        for var in ("PALM_RLHF_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            monkeypatch.delenv(var, raising=False)
    return use


def cut_off(monkeypatch, training: type, at: int, steps_run: list[int]) -> None:
    """The stage's step `at` is interrupted (as Ctrl-C would) the first time it comes; every step run is recorded."""
    original = training.step

    def step(self, step: int):
        if step == at and at not in steps_run:
            steps_run.append(at)
            raise KeyboardInterrupt
        steps_run.append(step)
        return original(self, step)

    monkeypatch.setattr(training, "step", step)


def test_stages_cut_off_after_a_checkpoint_resume_to_the_same_weights_and_state(home, monkeypatch):
    config = apply_overrides(tiny(), SETTINGS)
    home("uninterrupted")
    pretrained = run_pretrain(config.pretrain)
    reward = run_reward(config.reward, pretrained.checkpoint_uri)
    policy = run_ppo(config.ppo, pretrained.checkpoint_uri, reward.checkpoint_uri)
    expected = {"pretrain": pretrained, "reward": reward, "ppo": policy}

    home("interrupted")
    stages = {
        "pretrain": (Pretraining, 7, lambda: run_pretrain(config.pretrain)),  # after the checkpoint at step 6
        "reward": (RewardFitting, 3, lambda: run_reward(config.reward, uris["pretrain"])),  # after step 2's
        "ppo": (PPOTraining, 5, lambda: run_ppo(config.ppo, uris["pretrain"], uris["reward"])),  # after step 4's
    }
    uris = {}
    for stage, (training, at, run) in stages.items():
        steps_run: list[int] = []
        cut_off(monkeypatch, training, at, steps_run)
        with pytest.raises(KeyboardInterrupt):
            run()
        result = run()
        resumed_from = at - at % getattr(config, stage).checkpoint_every
        assert steps_run == [*range(at + 1), *range(resumed_from, getattr(config, stage).steps)], stage
        assert not result.cached and result.digest == expected[stage].digest, stage
        got, want = load_checkpoint(result.checkpoint_uri), load_checkpoint(expected[stage].checkpoint_uri)
        assert set(got.state) == set(want.state), stage
        for name, value in want.state.items():  # optimiser moments, random streams, the KL controller
            assert (value.equal(got.state[name]) if hasattr(value, "equal") else value == got.state[name]), name
        uris[stage] = result.checkpoint_uri


def test_checkpoints_come_every_n_steps_and_at_the_end(home):
    home("home")
    config = apply_overrides(tiny(), ["pretrain.steps=7", "pretrain.checkpoint_every=3"]).pretrain
    result = run_pretrain(config)
    prefix = result.checkpoint_uri.rsplit("/", 1)[0]
    assert [ref.step for ref in list_checkpoints(prefix)] == [3, 6, 7]
    assert load_checkpoint(result.checkpoint_uri).manifest["metrics"]["loss"] == result.metrics["loss"]
