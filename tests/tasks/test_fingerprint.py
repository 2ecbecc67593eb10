"""The code in the run key: an edit to a source file, in a copy of the package, changes the fingerprint of exactly the
stages that run that file; comments, docstrings and files outside the package change nothing; and a stage run again
after an edit to its code retrains, while one whose code is untouched is reused (or, when asked, one of other code)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.runtime.fingerprint import ROOTS, code_text, stage_code, stage_modules

ROOT = Path(__file__).parents[2]
STAGES = tuple(ROOTS)


@pytest.fixture
def copy(tmp_path) -> Path:
    """The package as a user's checkout holds it: models/, tasks/, and a README beside them."""
    for name in ("models", "tasks"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def fingerprints(root: Path) -> dict[str, str]:
    return {stage: stage_code(stage, root) for stage in STAGES}


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def changed(root: Path, before: dict[str, str]) -> set[str]:
    return {stage for stage, code in fingerprints(root).items() if code != before[stage]}


def test_a_copy_of_the_package_has_the_fingerprints_of_the_original(copy):
    assert fingerprints(copy) == fingerprints(ROOT)
    version, digest = stage_code("ppo").split(":")
    assert version and len(digest) == 16
    assert len(set(fingerprints(ROOT).values())) == len(STAGES), "each stage runs its own set of modules"


# file edited -> the stages whose fingerprint must change (every other stage's must not)
EDITS = {
    "models/ppo.py": {"ppo", "eval"},  # PPO's losses: PPO and evaluation (its KL estimate) run them
    "models/reward.py": {"reward", "ppo", "eval"},  # PPO and evaluation score with the reward model
    "models/palm.py": set(STAGES),
    "models/training.py": {"pretrain", "reward", "ppo"},  # the optimiser step of the training stages
    "tasks/data/tokens.py": set(STAGES),  # the tokenizer
    "tasks/feedback.py": {"feedback", "reward"},
    "tasks/runtime/loop.py": {"pretrain", "reward", "ppo"},
    "tasks/evaluate.py": {"eval"},
    "tasks/tracking/registry.py": set(),  # records, never a number
    "tasks/runtime/stage.py": set(),
    "tasks/storage/checkpoints.py": set(),
}


@pytest.mark.parametrize("path", EDITS)
def test_an_edit_changes_the_fingerprint_of_the_stages_that_run_it_and_no_other(copy, path):
    before = fingerprints(copy)
    append(copy / path, "\n_EDITED_BY_THE_TEST = 1\n")
    assert changed(copy, before) == EDITS[path]


def test_comments_docstrings_blank_lines_and_the_readme_are_not_code(copy):
    before = fingerprints(copy)
    ppo = copy / "models" / "ppo.py"
    source = ppo.read_text()
    first_def = source.index("\ndef ")
    edited = source[:first_def] + "\n\n# a new comment\n" + source[first_def:]
    edited = edited.replace('"""', '"""Reworded. ', 1)  # the module docstring
    ppo.write_text(edited + "\n\n   \n# trailing comment\n")
    append(copy / "README.md", "\nA new paragraph.\n")
    assert code_text(edited) == code_text(source)
    assert changed(copy, before) == set()
    ppo.write_text(source.replace("return", "return  ", 1).replace("0.2", "0.25", 1))  # a real change
    assert "ppo" in changed(copy, before)


def test_the_fingerprint_names_its_modules():
    assert "models.ppo" in stage_modules("ppo") and "models.ppo" not in stage_modules("pretrain")
    assert "tasks.data.tokens" in stage_modules("pretrain")
    assert not [m for m in stage_modules("ppo") if m.startswith(("tasks.tracking", "tasks.storage"))]


# ---------------------------------------------------------------- a stage run again after an edit

PRETRAIN = """
import json, sys
from tasks.config import apply_overrides, tiny
from tasks.pretrain import run_pretrain
config = apply_overrides(tiny(), ["pretrain.steps=2", "pretrain.checkpoint_every=2", "pretrain.eval_every=2",
                                  *sys.argv[1:]])
print(json.dumps(run_pretrain(config.pretrain).model_dump()))
"""


def pretrain_in(copy: Path, home: Path, *settings: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_"))}
    env.update(PYTHONPATH=str(copy), PALM_RLHF_HOME=str(home), PALM_RLHF_PROGRESS="0")
    done = subprocess.run([sys.executable, "-c", PRETRAIN, *settings], env=env, cwd=home.parent, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]) | {"log": done.stderr}


def test_a_stage_rerun_after_an_edit_to_its_code_retrains_and_an_edit_elsewhere_reuses(copy, tmp_path,
                                                                                     monkeypatch):
    home = tmp_path / "home"
    first = pretrain_in(copy, home)
    assert not first["cached"] and first["code"] == stage_code("pretrain", copy)

    append(copy / "models" / "ppo.py", "\n_EDITED_BY_THE_TEST = 1\n")  # PPO's code: not pretraining's
    assert pretrain_in(copy, home)["cached"]

    append(copy / "models" / "training.py", "\n_EDITED_BY_THE_TEST = 1\n")  # pretraining's own code
    second = pretrain_in(copy, home)
    assert not second["cached"] and second["run_key"] != first["run_key"]
    assert second["mlflow_run_id"] != first["mlflow_run_id"] and second["code"] != first["code"]
    assert second["model_version"] == str(int(first["model_version"]) + 1)

    append(copy / "models" / "training.py", "\n_EDITED_AGAIN = 1\n")  # harmless, and its author says so
    reused = pretrain_in(copy, home, "pretrain.runtime.reuse_across_code=true")
    assert reused["cached"] and reused["mlflow_run_id"] == second["mlflow_run_id"]
    assert reused["code"] == second["code"] != stage_code("pretrain", copy)
    assert "reuse_across_code" in reused["log"]

    monkeypatch.setenv("PALM_RLHF_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PALM_RLHF_STORE"):
        monkeypatch.delenv(name, raising=False)
    from tasks.storage.checkpoints import read_manifest
    from tasks.tracking import client as tracking
    from tasks.tracking.lineage import CODE_TAG, format_lineage, lineage

    client = tracking.get_client()
    assert client.get_run(second["mlflow_run_id"]).data.tags["palm_rlhf.reused_across_code"] == \
        stage_code("pretrain", copy)
    manifest = read_manifest(second["checkpoint_uri"])
    assert manifest["code"]["fingerprint"] == second["code"] and "models.training" in manifest["code"]["modules"]
    assert client.get_model_version("palm-pretrained", second["model_version"]).tags[CODE_TAG] == second["code"]
    assert f"code {second['code']}" in format_lineage(lineage(f"models:/palm-pretrained/{second['model_version']}"))
