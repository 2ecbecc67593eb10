"""MLflow: the server and experiment (client.py), runs, params and metrics (runs.py), what runs show people
(artifacts.py, samples.py), the model registry (registry.py) and lineage through its tags (lineage.py).

Imports data/ (to decode sample generations) and models/; never storage/, runtime/, a stage module or flows/.
"""
