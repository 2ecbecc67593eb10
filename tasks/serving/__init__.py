"""What makes a registered version deployable: the files a served model carries and how they load (bundle.py),
generation with best-of-n that the MLflow model and `palm-rlhf generate` share (generation.py), the code MLflow runs to
serve it (pyfunc.py, models-from-code), and logging a stage's model with its run (export.py).

bundle.py, generation.py and pyfunc.py need models/ and tasks/data/tokens.py only, since they run inside `mlflow models
serve`; export.py imports storage/ and tracking/. runtime/ imports this package to log a stage's model; this package
never imports runtime/, a stage module or flows/.
"""
