"""Shared test setup: settings every test needs before Prefect is imported, and the loopback server fixtures."""

import os

# The embedded Prefect server needs ~25 s to start on 2 cores, more than its default timeout.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PALM_RLHF_PROGRESS"] = "0"
# Two test workers on two cores, each starting pipelines and servers: one intra-op thread per process (this one and
# every command it starts), or each parallel operator waits for a thread that another process holds the core of.
# Tests that need more set it themselves (tests/models/test_threads.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.servers"]
