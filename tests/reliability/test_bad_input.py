"""Bad input through the CLI: each case gets exit code 2 and one line on stderr naming the problem, before Prefect
starts or any compute runs, and leaves the store, the MLflow runs and the registry as they were.

The cases run `flows.cli.main` in this process with the Prefect flows made unimportable, so a case that got past the
checks would fail with exit code 1 instead of quietly starting a flow. One case runs the real command in a fresh
project against a Prefect server, to show what a user sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

import flows
from flows.cli import main
from tasks.data.tokenizer import ByteTokenizer
from tasks.data.tokenizer import record as tokenizer_record
from tests.reliability import copy_checkpoint, footprint, stderr_line, use_home, workspace

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


def write_inputs(root: Path, ws) -> dict[str, str]:
    """Files and checkpoints a user might hand the pipeline by mistake."""
    from models.palm import PaLM
    from tasks.storage.checkpoints import read_manifest, save_checkpoint

    root.mkdir()
    files = {"empty": "", "small": "A corpus of one short line.\n", "no_prompts": "\n \n"}
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text)
    (root / "long_prompt.txt").write_text("a long prompt " * 20 + "\n")
    pd.DataFrame({"body": ["some text"] * 50}).to_parquet(root / "corpus.parquet")
    rows = [("p1", "an answer", "4"), ("p2", "another", "NaN"), ("p3", "a third", "5")]
    tables = {
        "missing_columns": pd.DataFrame({"prompt": ["p"], "answer": ["a"], "score": [3]}),
        "nan_rating": pd.DataFrame(rows, columns=["prompt", "response", "rating"]),
        "out_of_range": pd.DataFrame({"prompt": ["p1", "p2"], "response": ["a", "b"], "rating": [4, 11]}),
        "same_pair": pd.DataFrame({"prompt": ["p1", "p2"], "chosen": ["x", "same"], "rejected": ["y", "same"]}),
        "too_small": pd.DataFrame({"prompt": ["p1"], "response": ["a"], "rating": [3]}),
    }
    for name, frame in tables.items():
        frame.to_csv(root / f"{name}.csv", index=False)
    (root / "word_rating.csv").write_text("prompt,response,rating\np1,an answer,four\np2,another,3\n")
    (root / "empty_table.csv").write_text("")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (root / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
    (root / "no_prompt_column.csv").write_text("question\nWhat is a list?\n")
    tables.update({name: None for name in ("word_rating", "empty_table", "binary", "no_prompt_column")})

    paths = {name: str(root / f"{name}.txt") for name in files}
    paths.update({name: str(root / f"{name}.csv") for name in tables})
    paths["long_prompt"], paths["parquet"] = str(root / "long_prompt.txt"), str(root / "corpus.parquet")
    paths["binary_txt"] = str(root / "binary.txt")

    # A checkpoint whose manifest describes another architecture than its weights hold.
    folder = copy_checkpoint(ws.pretrained.checkpoint_uri, root / "edited" / "step-00000002")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model_config"]["dim"] *= 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    paths["wrong_architecture"] = str(folder)

    # A well-formed model from elsewhere whose vocabulary cannot hold byte tokens.
    original = read_manifest(ws.pretrained.checkpoint_uri)
    small = PaLM.from_config({**original["model_config"], "num_tokens": 200})
    tokenizer = ByteTokenizer()
    paths["vocab_200"] = save_checkpoint(str(root / "foreign"), 1, small.state_dict(), kind="palm",
                                         model_config=asdict(small.config),
                                         extra={"corpus": original["corpus"], "tokenizer": tokenizer_record(tokenizer)},
                                         files={"tokenizer.json": tokenizer.to_file()}).uri
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The shared workspace plus bad inputs; one more model, pretrained with a 300-token vocabulary."""
    from tasks.config import apply_overrides, tiny
    from tasks.pretrain import run_pretrain
    from tests.reliability import TINY

    ws = workspace(tmp_path_factory)
    paths = write_inputs(tmp_path_factory.mktemp("bad") / "inputs", ws)
    with pytest.MonkeyPatch.context() as mp:
        use_home(mp, ws.home)
        config = apply_overrides(tiny(), [*TINY, "pretrain.model.num_tokens=300", "pretrain.steps=1"])
        paths["vocab_300"] = run_pretrain(config.pretrain).checkpoint_uri
    paths["pretrained"], paths["reward"] = ws.pretrained.checkpoint_uri, ws.reward.checkpoint_uri
    return ws, paths


@pytest.fixture
def cli(inputs, monkeypatch, capsys):
    """Run the CLI in this process; return its one stderr line after checking the exit code and the footprint."""
    ws, _ = inputs
    use_home(monkeypatch, ws.home)
    for name in ("stages", "pipeline"):  # reaching Prefect is a failure of the checks: make it loud
        monkeypatch.setitem(sys.modules, f"flows.{name}", None)
        monkeypatch.delattr(flows, name, raising=False)

    def run(args: list[str], env: dict | None = None, expect: int = 2) -> str:
        before = footprint(ws.home)
        with monkeypatch.context() as mp:
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            try:
                code = main(args)
            except SystemExit as stop:  # argparse
                code = stop.code
        err = capsys.readouterr().err
        line = stderr_line(err)
        assert code == expect, err
        assert line.startswith("palm-rlhf: error: ")
        assert footprint(ws.home) == before, "bad input must leave no file, run or model version behind"
        return line

    return run


def stage(name: str, *flags: str) -> list[str]:
    return ["stage", name, "--preset", "tiny", *flags]


def sets(name: str, setting: str, *flags: str) -> list[str]:
    return stage(name, "--set", setting, *flags)


# case -> (CLI arguments, given the paths of the inputs; what the one line must say)
CASES = {
    # settings
    "unknown preset": (lambda p: ["run", "--preset", "huge"],
                       r"unknown preset 'huge'; choose one of demo, demo-hard, tiny"),
    "unknown setting": (lambda p: sets("pretrain", "pretrain.lrate=0.1"), r"unknown setting 'pretrain.lrate'"),
    "setting without key=value": (lambda p: sets("pretrain", "pretrain.steps"), r"--set expects key=value"),
    "negative steps": (lambda p: sets("pretrain", "pretrain.steps=-5"), r"pretrain.steps: Input should be greater"),
    "zero model width": (lambda p: sets("pretrain", "pretrain.model.dim=0"), r"pretrain.model.dim: .*greater than 0"),
    "zero rollout batch": (lambda p: sets("ppo", "ppo.rollout_batch=0"), r"ppo.rollout_batch: .*greater than 0"),
    "not a number": (lambda p: sets("reward", "reward.lr=fast"), r"reward.lr: Input should be a valid number"),
    "window longer than the context": (lambda p: sets("pretrain", "pretrain.seq_len=500"),
                                       r"seq_len \(500\) is longer than the model context"),
    "vocabulary too small for bytes": (lambda p: sets("pretrain", "pretrain.model.num_tokens=100"),
                                       r"model.num_tokens \(100\) is too small for byte tokens"),
    "temperature not above 0": (lambda p: sets("reward", "reward.temperature=[1.0,0]"),
                                r"reward.temperature: .*give one temperature above 0 or a non-empty list of them "
                                r"\(got \[1.0, 0\]\)$"),
    "unknown device": (lambda p: sets("ppo", "ppo.runtime.device=gpu"), r"ppo.runtime.device: String should match"),
    "unknown stage": (lambda p: ["stage", "finetune"], r"invalid choice: 'finetune'"),
    "stage without its inputs": (lambda p: stage("ppo", "--pretrained", p["pretrained"]),
                                 r"stage ppo needs --reward-model"),
    # data
    "empty corpus": (lambda p: sets("pretrain", f"pretrain.corpus={p['empty']}"), r"corpus .*empty.txt is empty"),
    "empty corpus, whole pipeline": (lambda p: ["run", "--preset", "tiny", "--set", f"pretrain.corpus={p['empty']}"],
                                     r"corpus .*empty.txt is empty"),
    "corpus that does not exist": (lambda p: sets("pretrain", "pretrain.corpus=/no/such/corpus.txt"),
                                   r"no file matches /no/such/corpus.txt"),
    "corpus too small for a window": (lambda p: sets("pretrain", f"pretrain.corpus={p['small']}"),
                                      r"small.txt has \d+ characters, fewer than the \d+ required"),
    "corpus without its text column": (lambda p: sets("pretrain", f"pretrain.corpus={p['parquet']}"),
                                       r"corpus.parquet has no column 'text'; columns present: \['body'\]"),
    "credentials inside a URI": (lambda p: sets("pretrain", f"pretrain.corpus=s3://AKIAEXAMPLE:{SECRET}@b/c.txt"),
                                 r"credentials inside a URI are not supported.*: s3://\S*b/c.txt"),
    "feedback with missing columns": (lambda p: sets("reward", f"reward.feedback={p['missing_columns']}",
                                                     "--pretrained", p["pretrained"]),
                                      r"matches neither accepted shape.*as ratings it lacks 'response', 'rating'"),
    "feedback with a NaN rating": (lambda p: sets("reward", f"reward.feedback={p['nan_rating']}",
                                                  "--pretrained", p["pretrained"]),
                                   r"column 'rating' is NaN, empty or not a number in 1 row \(first: row 1\)"),
    "feedback rating out of range": (lambda p: sets("reward", f"reward.feedback={p['out_of_range']}",
                                                    "--set", "reward.rating_scale=[1,5]",
                                                    "--pretrained", p["pretrained"]),
                                     r"column 'rating' is outside \[1, 5\] in 1 row \(first: row 1\)"),
    "pairs where chosen equals rejected": (lambda p: sets("reward", f"reward.feedback={p['same_pair']}",
                                                          "--pretrained", p["pretrained"]),
                                           r"chosen == rejected, which states no preference, in 1 row"),
    "feedback too small to split": (lambda p: sets("reward", f"reward.feedback={p['too_small']}",
                                                   "--set", "reward.rating_scale=[1,5]",
                                                   "--pretrained", p["pretrained"]),
                                    r"too_small.csv has 1 rows: too few to split"),
    "prompt longer than the context": (lambda p: sets("ppo", f"ppo.prompts={p['long_prompt']}", "--pretrained",
                                                      p["pretrained"], "--reward-model", p["reward"]),
                                       r"ppo.prompts: prompt 0 has 280 tokens; with 12 new tokens that exceeds the "
                                       r"model context of 96 tokens"),
    "prompt file without prompts": (lambda p: sets("ppo", f"ppo.prompts={p['no_prompts']}", "--pretrained",
                                                   p["pretrained"], "--reward-model", p["reward"]),
                                    r"no_prompts.txt holds no prompts"),
    # models
    "vocabulary differs between stages": (lambda p: stage("ppo", "--pretrained", p["vocab_300"],
                                                          "--reward-model", p["reward"]),
                                          r"vocabulary sizes differ: .* has 300 tokens, .* has 258"),
    "token ids out of the model's range": (lambda p: stage("reward", "--pretrained", p["vocab_200"]),
                                           r"has a vocabulary of 200 tokens; byte tokens need 258"),
    "weights not of the manifest's architecture": (
        lambda p: stage("reward", "--pretrained", p["wrong_architecture"]),
        r"weights.safetensors does not match the architecture in its manifest \(\S+ has shape \[[\d, ]+\], "
        r"the architecture needs \[[\d, ]+\]\)"),
    "a reward model given as the pretrained model": (lambda p: stage("reward", "--pretrained", p["reward"]),
                                                     r"--pretrained .* is a 'reward' checkpoint; this stage needs a "
                                                     r"'palm' checkpoint"),
    "a pretrained model given as the policy": (lambda p: stage("eval", "--pretrained", p["pretrained"],
                                                               "--reward-model", p["reward"],
                                                               "--policy", p["pretrained"]),
                                               r"--policy .* is a 'palm' checkpoint; this stage needs a 'policy'"),
    "checkpoint that does not exist": (lambda p: stage("reward", "--pretrained", "/no/such/checkpoint"),
                                       r"checkpoint file:///no/such/checkpoint: no checkpoint at this URI"),
    "registry alias that does not exist": (lambda p: stage("reward", "--pretrained", "models:/palm-pretrained@nightly"),
                                           r"palm-pretrained has no alias @nightly; aliases: @candidate"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, cli, inputs):
    args, expected = CASES[case]
    line = cli(args(inputs[1]))
    assert re.search(expected, line), line
    assert SECRET not in line


def run(*settings: str) -> list[str]:
    return ["run", "--preset", "tiny", *(arg for setting in settings for arg in ("--set", setting))]


# A file that only a later stage reads, given to the whole pipeline: refused before pretraining starts.
LATE_FILES = {
    "feedback with a rating that is a word": (lambda p: run(f"reward.feedback={p['word_rating']}"),
                                              r"column 'rating' is NaN, empty or not a number in 1 row \(first: row 0\)"),
    "an empty feedback file": (lambda p: run(f"reward.feedback={p['empty_table']}"),
                               r"cannot read .*empty_table.csv: No columns to parse from file"),
    "a binary feedback file": (lambda p: run(f"reward.feedback={p['binary']}"), r"cannot read .*binary.csv: "),
    "feedback without its columns": (lambda p: run(f"reward.feedback={p['missing_columns']}"),
                                     r"missing_columns.csv matches neither accepted shape"),
    "a binary prompts file": (lambda p: run(f"ppo.prompts={p['binary_txt']}"),
                              r"binary.txt is not UTF-8 text \(byte 0\)"),
    "an empty prompts table": (lambda p: run(f"ppo.prompts={p['empty_table']}"),
                               r"cannot read .*empty_table.csv: No columns"),
    "prompts without a prompt column": (lambda p: run(f"eval.prompts={p['no_prompt_column']}"),
                                        r"no_prompt_column.csv has no column 'prompt'; columns present: "
                                        r"\['question'\]"),
    "evaluation prompts too long for the model to be pretrained": (
        lambda p: run(f"eval.prompts={p['long_prompt']}"),
        r"eval.prompts: prompt 0 has 280 tokens; with 12 new tokens that exceeds the model context of 96 tokens"),
    "a rater that cannot be imported": (lambda p: run("eval.labeler=no_such_module:Rater"),
                                        r"labeler 'no_such_module:Rater': cannot import module 'no_such_module'"),
}


@pytest.mark.parametrize("case", LATE_FILES)
def test_a_bad_file_for_a_later_stage_fails_the_pipeline_before_pretraining(case, cli, inputs):
    args, expected = LATE_FILES[case]
    began = time.monotonic()
    line = cli(args(inputs[1]))  # exit code 2, one line, nothing written (the harness checks)
    assert re.search(expected, line), line
    assert time.monotonic() - began < 30, "the checks take seconds, not a pretraining"


def test_an_unreachable_tracking_server_is_named_before_any_work(cli, inputs):
    """Not bad input but an outage (exit code 1), named at once before any work."""
    line = cli(stage("pretrain"), env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, expect=1)
    assert "MLflow tracking at http://127.0.0.1:9 is unreachable (connection refused)" in line


@pytest.fixture(scope="module")
def denied_s3(tmp_path_factory):
    """An S3 server that checks credentials, and knows none: every request is refused as unauthorised."""
    from tests.servers import launch_s3

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        server = launch_s3(tmp_path_factory.mktemp("denied-s3"))
    try:
        server.process.wait_ready()
        yield server
    finally:
        server.process.stop()


@pytest.mark.parametrize("setting", ["pretrain.corpus=s3://private/corpus.txt"])
def test_an_unauthorised_uri_is_named_before_any_work(setting, cli, denied_s3):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # one built for another endpoint would be reused
    try:
        line = cli(sets("pretrain", setting), env=denied_s3.env)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "cannot read s3://private/corpus.txt: PermissionError: Forbidden; check the storage credentials" in line


def flow_runs(server) -> int:
    request = urllib.request.Request(f"{server.api_url}/flow_runs/count", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
        return json.load(response)


def test_the_command_in_a_fresh_project_prints_one_line_and_starts_no_flow(prefect_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PALM_RLHF_"))}
    env.update(prefect_server.env, PALM_RLHF_HOME=str(tmp_path / "home"), PYTHONPATH=str(Path(__file__).parents[2]))
    before = flow_runs(prefect_server)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "reward", "--preset", "tiny", "--pretrained",
                           "models:/palm-pretrained@champion"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert stderr_line(done.stderr) == ("palm-rlhf: error: models:/palm-pretrained@champion: no registered model "
                                        "'palm-pretrained'; registered: none")
    assert flow_runs(prefect_server) == before
    assert not (tmp_path / "home" / "store").exists()
