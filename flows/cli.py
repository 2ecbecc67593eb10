"""`palm-rlhf`: run the pipeline, run one stage, or trace a model's lineage.

    palm-rlhf run [--preset demo|demo-hard|tiny] [--set stage.key=value ...] [--summary FILE]
    palm-rlhf stage NAME [--pretrained URI] [--reward-model URI] [--policy URI] [--preset] [--set] [--summary]
    palm-rlhf lineage MODEL_URI
    palm-rlhf generate MODEL_URI [PROMPT ...] [--num-samples N] [--max-new-tokens N] [--temperature T] [--top-k K]
                       [--seed S] [--sampling-precision auto|fp32|bf16] [--json] [--input FILE_URL --output FILE_URL]

Errors are one line on stderr and a non-zero exit: 2 for bad input (settings, data, URIs, a damaged checkpoint), 1 for
anything else (an outage, after its retries); 130 after Ctrl-C, 143 after SIGTERM (tasks/runtime/errors.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

STAGES = ("pretrain", "reward", "ppo", "eval")
STAGE_INPUTS = {"pretrain": (), "reward": ("pretrained",), "ppo": ("pretrained", "reward_model"),
                "eval": ("pretrained", "reward_model", "policy")}


def _prefect_environment() -> None:
    """The embedded Prefect server needs ~25 s to start on 2 cores: more than its default timeout.
    MLflow's INFO lines (database migrations, registrations) would crowd the one-line errors of this CLI."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # per-file bars would bury the output


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other error of this CLI, instead of argparse's usage block."""
        self.exit(2, f"palm-rlhf: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="palm-rlhf", description="PaLM + RLHF as a pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="demo",
                       help="demo (minutes; default), demo-hard or tiny (seconds per stage)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                       help="override a setting, e.g. --set ppo.kl_coef=0.2 (repeatable)")
        p.add_argument("--summary", type=Path, help="write the stage results as JSON to this file")

    common(sub.add_parser("run", help="run the whole pipeline"))
    stage = sub.add_parser("stage", help="run one stage on given inputs")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--pretrained", help="pretrained model: checkpoint URI or models:/palm-pretrained@alias")
    stage.add_argument("--reward-model", help="reward model: checkpoint URI or models:/palm-reward@alias")
    stage.add_argument("--policy", help="policy: checkpoint URI or models:/palm-policy@alias")
    common(stage)
    lineage = sub.add_parser("lineage", help="print a model's chain back to its data")
    lineage.add_argument("model_uri", help="e.g. models:/palm-policy@champion")
    generate = sub.add_parser("generate", help="answer prompts with a registered model or a checkpoint")
    generate.add_argument("model_uri", help="models:/palm-policy@champion, models:/palm-policy/3, or a checkpoint URI")
    generate.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts; without any, one per line on stdin")
    generate.add_argument("--num-samples", type=int, help="best-of-n: the reward model picks the best of n answers")
    generate.add_argument("--max-new-tokens", type=int, help="at most this many new tokens per answer")
    generate.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy")
    generate.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    generate.add_argument("--seed", type=int, help="the same seed and request give the same answers (default 0)")
    generate.add_argument("--sampling-precision", choices=("auto", "fp32", "bf16"), default="auto",
                          help="the writer's weights while answering (auto: bf16 on a GPU, fp32 on a CPU)")
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, completion, score")
    generate.add_argument("--input", metavar="FILE_URL", help="prompts from a JSONL/CSV/Parquet file (a `prompt` "
                          "column) or a text file, at any fsspec URL")
    generate.add_argument("--output", metavar="FILE_URL", help="answers to a .jsonl, .csv or .parquet file")
    return parser


def _write_summary(path: Path | None, results: dict) -> None:
    text = json.dumps({name: r.model_dump(exclude={"stage", "run_key"}) for name, r in results.items()}, indent=2)
    if path is None:
        print(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def _run(args) -> int:
    from tasks.config import apply_overrides, preset

    config = apply_overrides(preset(args.preset), args.overrides)  # bad settings fail here, before Prefect starts
    if args.command == "run":
        _check_pipeline(config)
        from flows.pipeline import pipeline

        results = pipeline(preset=args.preset, overrides=args.overrides)
    else:
        results = {args.name: _run_stage(args, config)}
    _write_summary(args.summary, results)
    return 0


def _run_stage(args, config):
    missing = [f"--{name.replace('_', '-')}" for name in STAGE_INPUTS[args.name] if not getattr(args, name)]
    if missing:
        raise ValueError(f"stage {args.name} needs {' and '.join(missing)}")
    inputs = {name: getattr(args, name) for name in STAGE_INPUTS[args.name]}
    _check_stage(args.name, config, inputs)
    from flows import stages

    flow = {"pretrain": stages.pretrain_flow, "reward": stages.reward_flow, "ppo": stages.ppo_flow,
            "eval": stages.eval_flow}[args.name]
    return flow(config=getattr(config, args.name), **inputs)


def _check_stage(name: str, config, inputs: dict) -> None:
    """The stage's own input checks, run before Prefect starts: bad input is one line here, not a failed flow run
    with a traceback (the stage runs them again inside its task, for deployments that bypass this CLI)."""
    from tasks.preflight import check_stage

    check_stage(name, config, inputs)


def _check_pipeline(config) -> None:
    """Every stage's files, raters and devices, and the tracking server, before Prefect starts (tasks/preflight.py)."""
    from tasks.preflight import check_pipeline

    check_pipeline(config)


def _generate(args) -> int:
    from tasks.runtime.progress import progress_bar
    from tasks.serving.generation import GenerationParams, complete
    from tasks.serving.requests import check_output, open_model, request_prompts, write_answers

    asked = {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
             "top_k": args.top_k, "seed": args.seed,
             "return_scores": bool(args.num_samples and args.num_samples > 1 and args.json)}
    GenerationParams.parse(asked)  # bad settings, prompts and output paths fail before the model is fetched
    check_output(args.output)
    prompts = request_prompts(args.prompts, args.input)
    bundle = open_model(args.model_uri, sampling_precision=args.sampling_precision)
    params = GenerationParams.parse(asked, bundle.defaults)
    if args.input:  # a batch: show how far it is
        with progress_bar("generate", len(prompts)) as show:
            answers = complete(bundle, prompts, params, progress=show)
    else:
        answers = complete(bundle, prompts, params)
    write_answers(answers, args.output, args.json)
    return 0


def _lineage(args) -> int:
    from tasks.tracking.lineage import format_lineage, lineage

    print(format_lineage(lineage(args.model_uri)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _prefect_environment()
    from tasks.redact import redact
    from tasks.runtime import signals

    if argv is None and args.command != "lineage":  # as a program: stopped cleanly, and nothing it starts outlives it
        code = signals.supervise()
        if code is not None:
            return code
        signals.install()
    try:
        if args.command == "generate":
            return _generate(args)
        return _lineage(args) if args.command == "lineage" else _run(args)
    except Exception as err:  # one line for people; the traceback is in the Prefect and MLflow run records
        from tasks.runtime.errors import is_user_error

        message = " ".join(redact(str(err)).split())  # one line, whatever the message's own layout
        print(f"palm-rlhf: error: {message or type(err).__name__}", file=sys.stderr)
        return 2 if is_user_error(err) else 1
    except BaseException as stop:  # Ctrl-C, SIGTERM, SIGHUP (ours, or Prefect's bridge inside a flow)
        if not signals.is_stop(stop):
            raise
        signum = signals.stop_signal(stop)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"palm-rlhf: {how}; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return signals.exit_code(stop)

if __name__ == "__main__":
    sys.exit(main())
