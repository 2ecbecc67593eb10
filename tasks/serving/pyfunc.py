"""The MLflow model of every palm-rlhf registry version (models-from-code: MLflow runs this file to load it).

    policy, pretrained   input: prompts (a list of strings, or a DataFrame with a `prompt` column)
                         output: one completion per prompt; with return_scores, a table of completion and score
                         params: max_new_tokens, temperature, top_k, num_samples (best-of-n), seed, return_scores
                         model_config (at load): sampling_precision, auto | fp32 | bf16 (auto: bf16 on a GPU)
    reward               input: a DataFrame with `prompt` and `response`; output: one score per row

The weights and the model's description travel as the artifact `bundle` (safetensors and JSON; tasks/serving/bundle.py),
this project's code as the model's code paths: loading runs no pickle.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class PalmRlhfModel(PythonModel):
    def load_context(self, context) -> None:
        from tasks.serving.bundle import read_bundle

        config = getattr(context, "model_config", None) or {}
        self.bundle = read_bundle(context.artifacts["bundle"],
                                  sampling_precision=config.get("sampling_precision", "auto"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        """model_input: MLflow's input check turns a list of prompts into a one-column table first."""
        from mlflow.exceptions import MlflowException

        from tasks.serving.generation import GenerationError

        try:
            return self._predict(model_input, params)
        except GenerationError as err:  # the scoring server answers 400 with the reason only for MLflow's own errors
            raise MlflowException.invalid_parameter_value(str(err)) from None

    def _predict(self, model_input, params: dict | None):
        from tasks.serving.generation import GenerationParams, complete, score

        if self.bundle.kind == "reward":
            frame = _frame(model_input, ("prompt", "response"))
            return score(self.bundle, list(frame["prompt"]), list(frame["response"]))
        request = GenerationParams.parse(params, self.bundle.defaults)
        answers = complete(self.bundle, list(_frame(model_input, ("prompt",))["prompt"]), request)
        if request.return_scores:
            return pd.DataFrame([{"completion": a["completion"], "score": a["score"]} for a in answers])
        return [a["completion"] for a in answers]


def _frame(model_input, columns: tuple[str, ...]) -> pd.DataFrame:
    """The request as a table with `columns`: a DataFrame, a list of strings (prompts), a list of records, or a
    single string."""
    from tasks.serving.generation import GenerationError

    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, list) and all(isinstance(x, str) for x in model_input) and columns == ("prompt",):
        model_input = pd.DataFrame({"prompt": model_input})
    if isinstance(model_input, list):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise GenerationError(f"expected a list of prompts or a table with columns {list(columns)}, "
                              f"got {type(model_input).__name__}")
    if len(model_input.columns) == 1 and columns == ("prompt",) and model_input.columns[0] != "prompt":
        model_input = model_input.set_axis(["prompt"], axis=1)  # a bare list that MLflow made into a one-column table
    missing = [c for c in columns if c not in model_input.columns]
    if missing:
        raise GenerationError(f"the input has no column {', '.join(map(repr, missing))}; "
                              f"columns present: {list(model_input.columns)}")
    return model_input


mlflow.models.set_model(PalmRlhfModel())
