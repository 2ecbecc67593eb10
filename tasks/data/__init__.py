"""What the stages read as data: fsspec readers and digests (files.py), the corpus (corpus.py), prompts (prompts.py),
feedback tables (tables.py), tokens (tokens.py) and the raters (labeler.py).

Imports nothing of the pipeline but `tasks.redact`: no MLflow, no Prefect, no store.
"""
