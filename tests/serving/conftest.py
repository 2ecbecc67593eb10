"""One tiny pipeline run, registered in a local MLflow of its own, shared by the serving tests."""

from __future__ import annotations

import pytest

from tasks.config import tiny
from tasks.ppo import run_ppo
from tasks.pretrain import run_pretrain
from tasks.reward import run_reward


@pytest.fixture(scope="package")
def registry(tmp_path_factory):
    """The tiny pipeline's three trained stages, registered in a local MLflow (SQLite) of their own."""
    home = tmp_path_factory.mktemp("serving-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("PALM_RLHF_HOME", str(home))
    patch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # loading must never need it
    for var in ("PALM_RLHF_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_EXPERIMENT"):
        patch.delenv(var, raising=False)
    config = tiny()
    pretrained = run_pretrain(config.pretrain)
    reward = run_reward(config.reward, pretrained.checkpoint_uri)
    policy = run_ppo(config.ppo, pretrained.checkpoint_uri, reward.checkpoint_uri)
    from tasks.tracking.client import tracking_uri

    patch.setenv("MLFLOW_TRACKING_URI", tracking_uri())  # for mlflow's own calls in the tests (load_model)
    yield {"home": home, "pretrain": pretrained, "reward": reward, "ppo": policy}
    patch.undo()
