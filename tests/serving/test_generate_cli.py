"""`palm-rlhf generate`: prompts from arguments, stdin or a file, answers as text, JSON or a table; bad requests are
one line and exit code 2, before the model is fetched."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pandas as pd
import pytest

from flows.cli import main

pytestmark = pytest.mark.timeout(900)


def generate(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_answers_prompts_given_as_arguments_as_text_or_json(registry, capsys):
    uri = f"models:/palm-policy/{registry['ppo'].model_version}"
    code, out, _ = generate(capsys, uri, "The function", "A module is", "--max-new-tokens", "5", "--seed", "2")
    assert code == 0 and len(out.splitlines()) >= 2
    code, out, _ = generate(capsys, uri, "The function", "A module is", "--max-new-tokens", "5", "--seed", "2",
                            "--num-samples", "3", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["The function", "A module is"]
    assert all(set(r) == {"prompt", "completion", "score"} and 1 <= r["score"] <= 5 for r in rows)

    import mlflow

    served = mlflow.pyfunc.load_model(uri).predict(["The function", "A module is"],
                                                   params={"max_new_tokens": 5, "seed": 2, "num_samples": 3})
    assert [r["completion"] for r in rows] == served  # the same code as the MLflow model


def test_a_checkpoint_uri_answers_like_its_registered_version(registry, capsys):
    args = ["The function", "--max-new-tokens", "6", "--seed", "5", "--json"]
    _, from_registry, _ = generate(capsys, f"models:/palm-pretrained/{registry['pretrain'].model_version}", *args)
    code, from_checkpoint, _ = generate(capsys, registry["pretrain"].checkpoint_uri, *args)
    assert code == 0 and from_checkpoint == from_registry


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_batch_mode_reads_a_prompt_table_and_writes_the_answers(registry, capsys, tmp_path, suffix):
    pd.DataFrame({"prompt": ["The function", "A module is", "When"]}).to_json(tmp_path / "in.jsonl", orient="records",
                                                                               lines=True)
    out = tmp_path / "answers" / f"out{suffix}"
    code, printed, _ = generate(capsys, f"models:/palm-policy/{registry['ppo'].model_version}", "--input",
                                str(tmp_path / "in.jsonl"), "--output", str(out), "--max-new-tokens", "4")
    table = {".jsonl": lambda p: pd.read_json(p, lines=True), ".csv": pd.read_csv, ".parquet": pd.read_parquet}[suffix](out)
    assert code == 0 and printed == ""
    assert list(table["prompt"]) == ["The function", "A module is", "When"] and len(table["completion"]) == 3


def test_prompts_come_one_per_line_on_stdin(registry):
    env = {**os.environ, "PALM_RLHF_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "generate", registry["pretrain"].checkpoint_uri,
                           "--max-new-tokens", "3", "--json"], input="The function\n\nA module is\n", env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["prompt"] for line in done.stdout.splitlines()] == ["The function", "A module is"]


def test_bad_requests_are_one_line_and_exit_code_2(registry, capsys, tmp_path):
    from tasks.tracking.registry import register_checkpoint

    pointer = register_checkpoint("palm-policy", checkpoint_uri=registry["ppo"].checkpoint_uri,
                                  digest=registry["ppo"].digest, run_id=registry["ppo"].mlflow_run_id, lineage={})
    policy = f"models:/palm-policy/{registry['ppo'].model_version}"
    cases = [
        ([policy, "x", "--num-samples", "0"], "num_samples must be between 1 and 64, got 0"),
        ([policy, "x", "--temperature", "-1"], "temperature must be between 0 and 100"),
        ([policy, "x", "--top-k", "-2"], "top_k must be 0"),
        ([policy, "x" * 90, "--max-new-tokens", "12"], "prompt 0 has 90 tokens; with max_new_tokens 12"),
        ([policy, "x", "--output", str(tmp_path / "out.txt")], r"name a \.jsonl, \.csv, \.parquet file"),
        (["models:/palm-policy@nope", "x"], "palm-policy has no alias @nope; aliases: @candidate"),
        (["models:/no-such-model@champion", "x"], "no registered model 'no-such-model'"),
        ([f"models:/palm-policy/{pointer}", "x"], f"palm-policy version {pointer} points at a checkpoint but holds no "
                                                  "MLflow model"),
        ([f"models:/palm-pretrained/{registry['pretrain'].model_version}", "x", "--num-samples", "2"],
         "needs a reward model to choose with"),
        ([f"models:/palm-reward/{registry['reward'].model_version}", "x"], "scores .* and writes nothing"),
    ]
    for args, message in cases:
        code, out, err = generate(capsys, *args)
        assert code == 2 and out == "", (args, err)
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), (args, err)
