"""The stage work and the Prefect tasks that run it.

    config.py                        one typed config per stage, and the presets
    pretrain.py reward.py ppo.py     a training stage each: its step, what its checkpoint holds, its @task
    evaluate.py                      best-of-n evaluation and the champion decision, and its @task
    feedback.py                      simulated feedback for the reward stage (a labeler rates the policy's answers)

and what the stages share, one layer below them:

    runtime/    running a stage: run keys, the cache and leases, its MLflow run, the one training loop, data-parallel
                ranks, the Prefect task options, retries and exit codes
    storage/    the object store, checkpoints and their manifests, the models a stage reads
    serving/    a registered version as an MLflow model: its files, generation and best-of-n, `palm-rlhf generate`
    tracking/   MLflow: runs, metrics, artifacts, the registry, lineage
    data/       corpora, prompts, feedback tables, tokens, raters

Imports point down only: flows/ -> the stage modules -> runtime/ -> serving/ -> storage/ -> tracking/ -> data/ ->
models/. `redact.py` (credentials out of everything written) and `outage.py` (a store or server that did not answer,
told apart from bad input) sit at the bottom with `config.py`; `preflight.py` checks every stage's inputs before the
first one starts, beside the stage modules.
"""
