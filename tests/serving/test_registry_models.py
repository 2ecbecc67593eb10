"""Registered versions are MLflow models: they load without pickle, answer prompts (best-of-n through the reward model
the policy was trained against), score answers, and keep their lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from models.reward import score_to_rating
from tasks.serving.generation import GenerationError, GenerationParams, complete
from tasks.serving.requests import open_model
from tasks.storage.inputs import load_policy, load_reward_model, resolve_input

pytestmark = pytest.mark.timeout(900)


def load(name: str):
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}@candidate")


@pytest.mark.parametrize("stage,name", [("pretrain", "palm-pretrained"), ("reward", "palm-reward"),
                                        ("ppo", "palm-policy")])
def test_each_registered_version_is_an_mlflow_model_logged_with_its_run(registry, stage, name):
    from mlflow.models import Model

    from tasks.tracking.client import get_client

    result, client = registry[stage], get_client()
    version = client.get_model_version(name, result.model_version)
    model_id = version.source.removeprefix("models:/")
    assert version.source.startswith("models:/m-"), "the version is the logged model, not a checkpoint pointer"
    assert version.tags["checkpoint_digest"] == result.digest and version.tags["checkpoint_uri"] == result.checkpoint_uri
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == result.mlflow_run_id
    assert model_id in [o.model_id for o in client.get_run(result.mlflow_run_id).outputs.model_outputs]
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": name, "version": result.model_version}]

    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location))
    meta = Model.load(str(folder / "MLmodel"))
    assert meta.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert meta.signature is not None and meta.signature.inputs.to_dict()
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin")]
    pins = (folder / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in pins and any(p.startswith("mlflow==") for p in pins)
    bundle = json.loads((folder / "artifacts" / "bundle" / "model.json").read_text())
    assert bundle["source"]["digest"] == result.digest  # verified against the checkpoint when logged
    if stage != "ppo":  # the checkpoint's own weights, byte for byte
        assert "sha256:" + bundle["files"]["weights.safetensors"]["sha256"] == result.digest


def test_policy_answers_prompts_as_a_list_or_a_table_reproducibly(registry):
    model = load("palm-policy")
    prompts = ["The function", "A module is"]
    answers = model.predict(prompts, params={"max_new_tokens": 6, "seed": 3})
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 6, "seed": 3}) == answers
    assert model.predict(prompts, params={"max_new_tokens": 6, "seed": 4}) != answers
    assert model.metadata.signature.params.to_dict()[0]["name"] == "max_new_tokens"


def test_best_of_n_returns_the_sample_its_reward_model_scores_highest(registry):
    """Recomputed outside the served code: the same n samples drawn from the merged policy, scored by the reward
    model loaded from its checkpoint; on a seed where the best is not the first sample, so the choice shows."""
    bundle = open_model(f"models:/palm-policy/{registry['ppo'].model_version}", device="cpu")
    reward_input = resolve_input(registry["reward"].checkpoint_uri, "reward", "reward")
    rm, tok = load_reward_model(reward_input, "cpu"), bundle.tokenizer
    ids = torch.tensor([tok.encode("The function")] * 5)
    for seed in range(30):
        gen = bundle.palm.sample(ids, None, 8, temperature=1.0, filter_thres=0.0, eos_token=tok.eos_id,
                                 pad_value=tok.pad_id, generator=torch.Generator().manual_seed(seed))
        prompt_part = torch.cat((torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(gen.mask)), dim=-1)
        with torch.no_grad():
            raw = rm.score(gen.sequences, mask=gen.sequence_mask, prompt_mask=prompt_part)
        stars = score_to_rating(raw, tuple(reward_input.manifest["rating_scale"]), rm.num_binned_output)
        best = int(stars.argmax())
        if best != 0:
            break
    assert best != 0 and stars.unique().numel() > 1, "the first sample always won: the choice would prove nothing"
    result = load("palm-policy").predict(["The function"], params={"max_new_tokens": 8, "num_samples": 5,
                                                                    "seed": seed, "return_scores": True})
    assert list(result.columns) == ["completion", "score"] and len(result) == 1
    assert result["completion"][0] == tok.decode(gen.tokens[best][gen.mask[best]].tolist())
    assert result["score"][0] == pytest.approx(float(stars[best]), abs=1e-5)


def test_the_served_policy_is_the_trained_policy_with_its_lora_merged(registry):
    bundle = open_model(f"models:/palm-policy/{registry['ppo'].model_version}", device="cpu")
    ac = load_policy(resolve_input(registry["ppo"].checkpoint_uri, "policy", "policy"), "cpu")
    seq = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bundle.palm(seq), ac.policy_logits(seq, None), rtol=1e-5, atol=1e-5)
    meta = json.loads(Path(bundle.info["source"]["checkpoint_uri"].removeprefix("file://"), "manifest.json")
                      .read_text())
    # one plain PaLM: the base without the actor's and critic's adapters and the value head the checkpoint holds
    assert bundle.info["files"]["weights.safetensors"]["bytes"] < meta["files"]["weights.safetensors"]["bytes"]


def test_reward_model_scores_prompt_response_pairs_on_the_rating_scale(registry):
    frame = pd.DataFrame({"prompt": ["The function", "A module is"], "response": [" returns the value.", "qz xv"]})
    scores = load("palm-reward").predict(frame)
    reward_input = resolve_input(registry["reward"].checkpoint_uri, "reward", "reward")
    rm = load_reward_model(reward_input, "cpu")
    from tasks.data.tokens import encode_dialogues

    ids, mask, pmask = encode_dialogues(list(frame["prompt"]), list(frame["response"]), reward_input.tokenizer, 96)
    with torch.no_grad():
        expected = score_to_rating(rm.score(ids, mask=mask, prompt_mask=pmask), (1.0, 5.0), rm.num_binned_output)
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_request_the_model_cannot_answer_is_one_clear_error(registry):
    policy, pretrained = load("palm-policy"), load("palm-pretrained")
    cases = [(policy, ["x"], {"num_samples": 0}, "num_samples must be between 1 and 64, got 0"),
             (policy, ["x"], {"temperature": -1.0}, "temperature must be between 0 and 100"),
             (policy, ["x" * 90], {"max_new_tokens": 12}, "prompt 0 has 90 tokens; with max_new_tokens 12 that exceeds "
                                                          "the model's context of 96 tokens"),
             (policy, [""], {}, "prompt 0 is empty"),
             (pretrained, ["x"], {"num_samples": 2}, "needs a reward model to choose with")]
    from mlflow.exceptions import MlflowException

    for model, data, params, message in cases:
        with pytest.raises(MlflowException, match=message) as err:
            model.predict(data, params=params)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_generation_params_are_checked_and_defaulted():
    assert GenerationParams.parse({}, {"max_new_tokens": 12}).max_new_tokens == 12
    assert GenerationParams.parse({"max_new_tokens": 5}, {"max_new_tokens": 12}).max_new_tokens == 5
    for params, message in (({"top_k": -1}, "top_k"), ({"seed": 1.5}, "whole number"), ({"nope": 1}, "unknown"),
                            ({"return_scores": "maybe"}, "true or false")):
        with pytest.raises(GenerationError, match=message):
            GenerationParams.parse(params)


def test_complete_refuses_a_reward_model_and_a_too_large_top_k(registry):
    reward = open_model(registry["reward"].checkpoint_uri, device="cpu")
    with pytest.raises(GenerationError, match="it scores"):
        complete(reward, ["x"], GenerationParams())
    policy = open_model(registry["ppo"].checkpoint_uri, device="cpu")
    with pytest.raises(GenerationError, match="top_k must be at most the vocabulary size 258"):
        complete(policy, ["x"], GenerationParams(top_k=300))


def test_a_version_loads_to_answer_in_bf16_through_model_config(registry):
    """MLflow's load-time model_config picks the writer's precision; the reward model beside it keeps scoring in fp32,
    and the bf16 writer answers the same requests as reproducibly as the fp32 one. A bad value is refused by name."""
    import mlflow

    from tasks.serving.bundle import BundleError

    model = mlflow.pyfunc.load_model("models:/palm-policy@candidate", model_config={"sampling_precision": "bf16"})
    bundle = model.unwrap_python_model().bundle
    assert bundle.palm.token_emb.weight.dtype == torch.bfloat16
    assert next(bundle.reward.parameters()).dtype == torch.float32
    params = {"max_new_tokens": 8, "seed": 3, "num_samples": 2, "return_scores": True}
    answers = model.predict(["The function"], params=params)
    assert answers.equals(model.predict(["The function"], params=params)) and len(answers) == 1
    auto = load("palm-policy").unwrap_python_model().bundle.palm
    assert auto.token_emb.weight.dtype == torch.float32  # auto, on a CPU
    with pytest.raises(BundleError, match="sampling_precision must be one of auto, fp32, bf16, got 'fp16'"):
        open_model(registry["ppo"].checkpoint_uri, device="cpu", sampling_precision="fp16")
