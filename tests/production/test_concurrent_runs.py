"""Pipeline runs started at the same time on one bucket, one tracking server and one Prefect server.

Runs that differ (here: the pretraining seed) have different run keys, so every stage writes under its own prefix and
registers its own versions. Identical runs share a run key by design (same config and inputs, same checkpoint
prefix): they make the same model at the same steps, so whichever writes a step second gets the checkpoint the first
wrote (the store compares weights, configs and lineage; the saved Python RNG may differ), registration keeps one
version per run key, and both report one set of checkpoints and models.
"""

from __future__ import annotations

import pytest

from tasks.tracking import client as tracking
from tasks.tracking.lineage import lineage
from tasks.redact import redact
from tasks.storage.checkpoints import read_manifest, verify_checkpoint
from tests.production.conftest import MODELS, SHORT, STAGES, read_summary, stage_checkpoints

pytestmark = [pytest.mark.servers, pytest.mark.timeout(900)]

SEEDS = {"a": 21, "b": 22, "b-again": 22}


@pytest.fixture(scope="module")
def together(production):
    """Three CLI pipelines started at once: pretraining seeds 21 and 22, and 22 a second time."""
    started = {}
    for name, seed in SEEDS.items():
        settings = [arg for setting in [*SHORT, f"pretrain.seed={seed}"] for arg in ("--set", setting)]
        started[name] = production.start_cli("run", "--preset", "tiny", *settings,
                                             "--summary", str(production.tmp / f"{name}.json"),
                                             log=production.tmp / f"{name}.log")
    try:
        codes = {name: process.wait(timeout=800) for name, process in started.items()}
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
    for name, code in codes.items():
        log = (production.tmp / f"{name}.log").read_text(errors="replace")
        assert code == 0, redact(f"pipeline {name} exited with {code}:\n{log[-3000:]}")
    return {name: read_summary(production.tmp / f"{name}.json") for name in SEEDS}


def test_different_runs_write_under_their_own_prefixes(together, production):
    a, b = together["a"], together["b"]
    for stage in MODELS:
        prefix_a, prefix_b = (s[stage]["checkpoint_uri"].rsplit("/", 1)[0] for s in (a, b))
        assert prefix_a != prefix_b, stage
        assert a[stage]["digest"] != b[stage]["digest"], stage
        for summary in (a, b):
            ref = verify_checkpoint(summary[stage]["checkpoint_uri"])
            assert ref.digest == summary[stage]["digest"], "nobody replaced the final checkpoint"
            for uri in stage_checkpoints(production, summary[stage]["checkpoint_uri"]):
                verify_checkpoint(uri)
    for summary in (a, b):
        parents = read_manifest(summary["ppo"]["checkpoint_uri"])["parents"]
        assert {p["digest"] for p in parents} == {summary["pretrain"]["digest"], summary["reward"]["digest"]}


def test_each_policy_lineage_names_its_own_parents(together):
    for name in ("a", "b"):
        summary = together[name]
        chain = lineage(f"models:/palm-policy/{summary['ppo']['model_version']}")
        policy = chain[0]
        assert policy["digest"] == summary["ppo"]["digest"]
        assert policy["parents"] == {"pretrained": f"palm-pretrained/{summary['pretrain']['model_version']}",
                                     "reward": f"palm-reward/{summary['reward']['model_version']}"}, name
        by_ref = {f"{node['name']}/{node['version']}": node for node in chain}
        assert by_ref[policy["parents"]["pretrained"]]["digest"] == summary["pretrain"]["digest"]
        assert by_ref[policy["parents"]["reward"]]["digest"] == summary["reward"]["digest"]
    versions = {stage: {together[n][stage]["model_version"] for n in ("a", "b")} for stage in MODELS}
    assert all(len(v) == 2 for v in versions.values()), versions


def test_identical_runs_share_one_set_of_checkpoints_and_versions(together):
    b, again = together["b"], together["b-again"]
    client = tracking.get_client()
    for stage in MODELS:
        assert again[stage]["checkpoint_uri"] == b[stage]["checkpoint_uri"], stage
        assert again[stage]["digest"] == b[stage]["digest"], stage
        assert again[stage]["model_version"] == b[stage]["model_version"], stage
        assert verify_checkpoint(b[stage]["checkpoint_uri"]).digest == b[stage]["digest"]
        key = client.get_model_version(MODELS[stage], b[stage]["model_version"]).tags["palm_rlhf.run_key"]
        same_key = client.search_model_versions(f"name = '{MODELS[stage]}' and tags.`palm_rlhf.run_key` = '{key}'")
        assert len(same_key) == 1, f"{stage}: one version per run key"
    assert list(again) == list(STAGES)
