"""Running a stage: its run key, the cache and the run key's lease, its MLflow run and registered model (stage.py,
lease.py), the one training loop (loop.py), data-parallel ranks (launch.py, parallel.py), the progress bar, which
errors are whose (errors.py), the Prefect task options, device slots and hand-off tasks (orchestration.py), the code
fingerprint in every run key (fingerprint.py) and clean stops on SIGTERM or a killed CLI (signals.py).

Imports storage/, tracking/, data/ and models/; never a stage module (pretrain, reward, ppo, evaluate) or flows/.
"""
