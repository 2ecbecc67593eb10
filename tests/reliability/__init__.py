"""Reliability: kill and resume, damaged checkpoints, numerical faults and bad input, each at the stage level.

`workspace()` builds, once per test session, a project home holding a tiny pretrained model and a reward model fitted
on it, both registered, as a user's home would. Tests run in that home and compare `footprint()` before and after, so
"nothing was written or registered" is checked against a populated store and registry, not an empty one. A test that
damages a checkpoint damages a copy.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.runtime.stage import StageResult

# Two steps each: enough for every file a stage writes, cheap enough to build for every session.
TINY = ["pretrain.steps=2", "pretrain.checkpoint_every=2", "pretrain.eval_every=2",
        "reward.steps=2", "reward.checkpoint_every=2"]


@dataclass(frozen=True)
class Workspace:
    home: Path
    pretrained: StageResult
    reward: StageResult


_built: dict[str, Workspace] = {}


def workspace(tmp_path_factory) -> Workspace:
    """The session's shared home, built on first use."""
    if "home" not in _built:
        from tasks.config import apply_overrides, tiny
        from tasks.pretrain import run_pretrain
        from tasks.reward import run_reward

        home = tmp_path_factory.mktemp("reliability") / "home"
        config = apply_overrides(tiny(), TINY)
        with pytest.MonkeyPatch.context() as mp:
            use_home(mp, home)
            pretrained = run_pretrain(config.pretrain)
            reward = run_reward(config.reward, pretrained.checkpoint_uri)
        _built["home"] = Workspace(home, pretrained, reward)
    return _built["home"]


def use_home(monkeypatch, home: Path) -> None:
    """Point the store and the embedded MLflow at `home`, as PALM_RLHF_HOME does for a user."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_STORE", "PALM_RLHF_EXPERIMENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PALM_RLHF_HOME", str(home))


def footprint(home: Path) -> dict:
    """What a stage could leave behind: files in the store, MLflow runs, registered model versions."""
    from mlflow.entities import ViewType

    from tasks.tracking import client as tracking
    store = home / "store"
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*")) if store.exists() else []
    client = tracking.get_client()
    runs = sorted(r.info.run_id for r in client.search_runs([tracking.experiment_id()], run_view_type=ViewType.ALL))
    versions = sorted((v.name, v.version) for v in client.search_model_versions())
    return {"files": files, "runs": runs, "versions": versions}


def copy_checkpoint(uri: str, dest: Path) -> Path:
    """A copy of a local checkpoint folder, to damage without touching the shared one."""
    source = Path(uri.removeprefix("file://"))
    shutil.copytree(source, dest)
    return dest


def stderr_line(text: str) -> str:
    """The one line a failing CLI call may print; anything more is a failure of its own."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text[-3000:]}"
    assert "Traceback" not in text
    return lines[0]


__all__ = ["TINY", "Workspace", "copy_checkpoint", "footprint", "stderr_line", "use_home", "workspace"]
