"""The object store (store.py), checkpoints and their manifests (checkpoints.py), and the models a stage reads: a
checkpoint or registry URI resolved, verified and built (inputs.py).

Imports tracking/ (to resolve registry URIs), data/ and models/; never runtime/, a stage module or flows/.
"""
