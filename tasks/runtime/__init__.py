"""Running a stage: its run key, the cache and the run key's lease, its MLflow run and registered model (stage.py,
lease.py), the one training loop (loop.py), data-parallel ranks (launch.py, parallel.py), the progress bar, which
errors are whose (errors.py) and the Prefect task options and hand-off tasks (orchestration.py).

Imports storage/, tracking/, data/ and models/; never a stage module (pretrain, reward, ppo, evaluate) or flows/.
"""
