"""What serving a registered policy costs on this machine: load time from the registry, the scoring server's
first-token and per-token latency at best-of-1 and best-of-8, and the served model's size against its checkpoint.

    python benchmarks/serving.py [--model models:/palm-policy@champion] [--repeats 5]

Run it where `palm-rlhf run` ran (it reads ./.palm-rlhf, or MLFLOW_TRACKING_URI), from the activated virtual
environment. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tasks.tracking.client import tracking_uri  # noqa: E402

PROMPT = "The function"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_times(model_uri: str, repeats: int) -> list[float]:
    """mlflow.pyfunc.load_model from the registry into a fresh folder each time: download, read, build."""
    import mlflow

    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as dst:
            start = time.perf_counter()
            mlflow.pyfunc.load_model(model_uri, dst_path=dst)
            times.append(time.perf_counter() - start)
    return times


def post(url: str, body: dict) -> float:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    start = time.perf_counter()
    with _DIRECT.open(request, timeout=600) as response:
        json.load(response)
    return time.perf_counter() - start


def serve(model_uri: str):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tempfile.mktemp(suffix=".log"), "wb")
    process = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url, start = f"http://127.0.0.1:{port}", time.perf_counter()
    while True:
        try:
            with _DIRECT.open(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return process, url, time.perf_counter() - start
        except OSError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"mlflow models serve exited; see {log.name}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/palm-policy@champion")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())

    loads = load_times(args.model, args.repeats)
    info = mlflow.pyfunc.load_model(args.model).unwrap_python_model().bundle.info  # the served model's model.json
    process, url, started = serve(args.model)
    rows = []
    try:
        for n in (1, 8):
            body = {"inputs": [PROMPT], "params": {"num_samples": n, "seed": 0}}
            post(url, {**body, "params": {**body["params"], "max_new_tokens": 1}})  # warm-up
            first = [post(url, {**body, "params": {**body["params"], "max_new_tokens": 1}}) for _ in range(args.repeats)]
            full = [post(url, {**body, "params": {**body["params"], "max_new_tokens": args.new_tokens}})
                    for _ in range(args.repeats)]
            per_token = (statistics.median(full) - statistics.median(first)) / (args.new_tokens - 1)
            rows.append((n, statistics.median(first), per_token, statistics.median(full)))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    load = os.getloadavg()
    print(f"model {args.model}; {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"median of {args.repeats}")
    print(f"\nload_model from the registry: {statistics.median(loads):.2f} s (min {min(loads):.2f}); "
          f"scoring server up in {started:.1f} s")
    weights = info["files"]["weights.safetensors"]["bytes"]
    print(f"served model: {info['model_bytes'] / 1e6:.1f} MB (merged policy {weights / 1e6:.1f} MB, its reward "
          f"model {(info['model_bytes'] - weights) / 1e6:.1f} MB); checkpoint {info['checkpoint_bytes'] / 1e6:.1f} MB")
    print(f"\n| best-of-n | first token (1 new token), s | per further token, ms | {args.new_tokens} tokens, s |")
    print("|---:|---:|---:|---:|")
    for n, first, per_token, full in rows:
        print(f"| {n} | {first:.3f} | {per_token * 1000:.1f} | {full:.2f} |")


if __name__ == "__main__":
    main()
