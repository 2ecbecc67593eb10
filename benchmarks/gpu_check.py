"""GPU check, for a lent GPU machine: pretraining throughput and model-FLOPs utilisation of a PaLM at dim 1024,
depth 12, sequence 2048 (bf16 autocast), generation speed with the KV cache, then the `demo` pipeline on the GPU in
bf16 through the stages' plain functions. About 5 minutes on an H100; nothing else needs a GPU.

    python benchmarks/gpu_check.py --out "$OUT"                  # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-check  # about a minute on CPU: checks the script itself

Writes gpu_check.json and gpu_check.md (a section for benchmarks/RESULTS.md) to --out, after every part, so a run cut
short still leaves what it measured. Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):
6 N + 12 L T d for N parameters, L layers, context T and width d (causal attention's skipped half counted, as there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models.palm import PaLM  # noqa: E402
from models.training import autocast, train_step  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity
BIG = dict(num_tokens=256, dim=1024, depth=12, heads=16, dim_head=64, ff_mult=4, max_seq_len=2048)
SMOKE = dict(num_tokens=256, dim=64, depth=2, heads=2, dim_head=32, ff_mult=4, max_seq_len=128)


def card(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count())
    else:
        info.update(name=f"CPU ({os.cpu_count()} cores)")
    return info


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretrain_throughput(size: dict, batches: list[int], device, amp, steps: int, peak: float | None) -> dict:
    """Tokens/s and MFU of full training steps (forward, backward, clip, AdamW) at the largest batch that fits."""
    T = size["max_seq_len"]
    for batch in batches:
        model = optimizer = None
        try:
            torch.manual_seed(0)
            model = PaLM(**size).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            x = torch.randint(0, size["num_tokens"], (batch, T + 1), device=device)
            step = lambda: train_step(lambda: model(x, return_loss=True), list(model.parameters()), optimizer,
                                      device=device, amp_dtype=amp)
            for _ in range(3):  # warm up kernels and the allocator
                step()
            sync(device)
            began = time.perf_counter()
            for _ in range(steps):
                stats = step()
            sync(device)
            seconds = time.perf_counter() - began
        except torch.OutOfMemoryError:
            model = optimizer = step = None  # free the batch that did not fit before trying the next
            torch.cuda.empty_cache()
            continue
        n = sum(p.numel() for p in model.parameters())
        tokens_per_s = batch * T * steps / seconds
        flops_per_token = 6 * n + 12 * size["depth"] * T * size["dim"]
        achieved = tokens_per_s * flops_per_token / 1e12
        out = {"params": n, "batch": batch, "seq_len": T, "steps": steps, "step_ms": 1000 * seconds / steps,
               "tokens_per_s": tokens_per_s, "model_tflops": achieved, "mfu": achieved / peak if peak else None,
               "final_loss": stats["loss"]}
        if device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out
    raise RuntimeError(f"no batch in {batches} fits")


@torch.no_grad()
def generation_speed(size: dict, batch: int, prompt_len: int, new_tokens: int, device, amp) -> dict:
    """New tokens per second of batched sampling with the KV cache (the rollout path of PPO and best-of-n)."""
    torch.manual_seed(0)
    model = PaLM(**size).to(device).eval()
    prompts = torch.randint(0, size["num_tokens"], (batch, prompt_len), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with autocast(device, amp):
        model.sample(prompts, None, 8, generator=g)  # warm-up
        sync(device)
        began = time.perf_counter()
        out = model.sample(prompts, None, new_tokens, filter_thres=0.0, generator=g)
        sync(device)
    seconds = time.perf_counter() - began
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": out.tokens.shape[1],
            "tokens_per_s": batch * out.tokens.shape[1] / seconds, "ms_per_token_step": 1000 * seconds / new_tokens}


def demo_pipeline(preset_name: str, runtime: list[str], settings: list[str] = ()) -> dict:
    """The preset's four stages through their plain functions (as the Prefect tasks call them), timed one by one.

    `runtime` settings (`key=value`) apply to every stage's runtime; `settings` are whole `stage.key=value` overrides.
    """
    from tasks.config import STAGES, apply_overrides, preset
    from tasks.evaluate import run_eval
    from tasks.ppo import run_ppo
    from tasks.pretrain import run_pretrain
    from tasks.reward import run_reward

    config = apply_overrides(preset(preset_name), [*(f"{s}.runtime.{kv}" for s in STAGES for kv in runtime), *settings])
    stages, uris = {}, {}
    for name in STAGES:
        began = time.perf_counter()
        if name == "pretrain":
            result = run_pretrain(config.pretrain)
        elif name == "reward":
            result = run_reward(config.reward, uris["pretrain"])
        elif name == "ppo":
            result = run_ppo(config.ppo, uris["pretrain"], uris["reward"])
        else:
            result = run_eval(config.eval, uris["pretrain"], uris["reward"], uris["ppo"])
        uris[name] = result.checkpoint_uri
        stages[name] = {"seconds": time.perf_counter() - began, "metrics": result.metrics}
    return {"preset": preset_name, "runtime": runtime, "settings": list(settings), "stages": stages,
            "total_seconds": sum(s["seconds"] for s in stages.values())}


def markdown(report: dict) -> str:
    c = report["card"]
    lines = [f"## GPU check: {c['name']}", "",
             f"`benchmarks/gpu_check.py` on {c['name']} ({c.get('memory_gib', '?')} GiB, CUDA {c.get('cuda')}, "
             f"torch {c['torch']}), {report['date']}.", ""]
    if p := report.get("pretrain_throughput"):
        mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] is not None else "n/a (unknown peak)"
        precision = "fp32 (smoke run on CPU)" if report["smoke"] else "bf16 autocast"
        lines += [f"| pretraining, {precision} | value |", "|---|---|",
                  f"| model | dim {report['size']['dim']}, depth {report['size']['depth']}, "
                  f"{p['params'] / 1e6:.0f}M parameters |",
                  f"| batch x sequence | {p['batch']} x {p['seq_len']} |",
                  f"| step | {p['step_ms']:.1f} ms |", f"| tokens/s | {p['tokens_per_s']:,.0f} |",
                  f"| model TFLOP/s | {p['model_tflops']:.1f} (peak {report['peak_tflops']}) |", f"| MFU | {mfu} |"]
        if "peak_memory_gib" in p:
            lines.append(f"| peak memory | {p['peak_memory_gib']:.1f} GiB |")
        lines.append("")
    if gen := report.get("generation"):
        lines += ["| generation (KV cache) | new tokens/s | ms per decode step |", "|---|---|---|"]
        lines += [f"| batch {g['batch']}, prompt {g['prompt_len']}, {g['new_tokens']} new | "
                  f"{g['tokens_per_s']:,.0f} | {g['ms_per_token_step']:.2f} |" for g in gen]
        lines.append("")
    if d := report.get("pipeline"):
        lines += [f"| `{d['preset']}` pipeline ({', '.join(d['runtime'])}) | seconds | headline |", "|---|---|---|"]
        for name, s in d["stages"].items():
            head = ", ".join(f"{k} {v:.3g}" for k, v in list(s["metrics"].items())[:3])
            lines.append(f"| {name} | {s['seconds']:.1f} | {head} |")
        lines.append(f"| total | {d['total_seconds']:.1f} | |")
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check the script")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    parser.add_argument("--preset", default=None, help="pipeline preset (default demo; tiny with --smoke)")
    args = parser.parse_args()

    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    amp = None if smoke else torch.bfloat16
    size = SMOKE if smoke else BIG
    home = Path(tempfile.mkdtemp(prefix="palm-rlhf-gpu-check-"))
    os.environ.update(PALM_RLHF_HOME=str(home), PALM_RLHF_PROGRESS="0")  # a fresh store and MLflow database
    os.environ.pop("MLFLOW_TRACKING_URI", None), os.environ.pop("PALM_RLHF_STORE", None)

    info = card(device)
    report = {"card": info, "date": time.strftime("%Y-%m-%d"), "smoke": smoke, "size": size,
              "peak_tflops": peak_tflops(info["name"], args.peak_tflops)}
    print(f"device: {info['name']}", flush=True)
    report["pretrain_throughput"] = pretrain_throughput(size, [4] if smoke else [16, 12, 8, 4, 2], device, amp,
                                                        3 if smoke else args.steps, report["peak_tflops"])
    print(json.dumps(report["pretrain_throughput"]), flush=True)
    save(report, args.out)
    report["generation"] = [generation_speed(size, b, 64 if smoke else 128, 32 if smoke else 256, device, amp)
                            for b in ((4,) if smoke else (8, 64))]
    print(json.dumps(report["generation"]), flush=True)
    save(report, args.out)
    runtime = ["device=cpu", "precision=fp32"] if smoke else ["device=cuda", "precision=bf16"]
    report["pipeline"] = demo_pipeline(args.preset or ("tiny" if smoke else "demo"), runtime)
    print(json.dumps(report["pipeline"]), flush=True)
    save(report, args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
