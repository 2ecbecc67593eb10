"""Side-by-side benchmark of models/ against the reference library, palm-rlhf-pytorch 0.8.0, on CPU in fp32.

Run by hand from the repository root, in the separate bench environment (see benchmarks/README.md):

    .venv-bench/bin/python benchmarks/bench_models.py [--repeats 3] [--profile]

Both implementations get the same PaLM hyperparameters and run in one process, alternating ours / reference for every
repeat so that drift in the machine (thermal, noisy neighbours) hits both alike; the table reports medians.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference wraps every rollout in progress bars; tqdm reads this at import

import argparse
import contextlib
import inspect
import io
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import models as ours
import palm_rlhf_pytorch as ref
from models.threads import intra_op_threads

THREADS = 2
SIZE = dict(num_tokens=256, dim=256, depth=4)
PROMPT_LEN, NEW_TOKENS = 16, 128


def reference_shape_defaults() -> dict:
    """dim_head, heads, ff_mult as the reference defaults them, so both models are built from the same numbers."""
    params = inspect.signature(ref.PaLM.__init__).parameters
    return {k: params[k].default for k in ("dim_head", "heads", "ff_mult")}


CONFIG = {**SIZE, **reference_shape_defaults()}


def build(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = {**CONFIG, **overrides}
    return ours.PaLM(**cfg) if kind == "ours" else ref.PaLM(**cfg)


def alternate(cases: dict[str, Callable[[], float]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Run each case once to warm up (allocator, lazy buffers), then `repeats` times in turn; seconds per run."""
    if warmup:
        for fn in cases.values():
            fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(fn())
    return times


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- machine peak ------------------------------------------------------------------------------------------------
def matmul_peak(n: int = 2048, iters: int = 8) -> float:
    """Best fp32 FLOP/s of an n^3 torch.matmul: the ceiling a dense model could reach on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = min(timed(lambda: a @ b) for _ in range(iters))
    return 2 * n**3 / best


def train_flops_per_token(cfg: dict, seq: int) -> float:
    """PaLM paper, appendix B: 6N + 12 L H Q T per token (forward + backward).

    N counts every weight used in a matmul: the blocks' projections plus the tied output projection (vocab x dim); the
    embedding lookup itself is free. H Q is heads * dim_head, T the sequence length; the attention term counts the full
    T x T score matrix, as the paper does, even though causal attention could skip half of it.
    """
    attn, ff = cfg["heads"] * cfg["dim_head"], cfg["dim"] * cfg["ff_mult"]
    per_layer = cfg["dim"] * (attn + 2 * cfg["dim_head"] + 2 * ff) + attn * cfg["dim"] + ff * cfg["dim"]
    n_matmul = cfg["depth"] * per_layer + cfg["num_tokens"] * cfg["dim"]
    return 6 * n_matmul + 12 * cfg["depth"] * attn * seq


# ---- (a) training ------------------------------------------------------------------------------------------------
def training_case(kind: str, batch: int, seq: int, steps: int) -> Callable[[], float]:
    model = build(kind).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # token 0 is padding to the reference's loss (ignore_index=0): keep it out so both average over the same targets
    data = torch.randint(1, CONFIG["num_tokens"], (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def run() -> float:
        def steps_() -> None:
            for _ in range(steps):
                loss = model(data, return_loss=True)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return timed(steps_)
    return run


# ---- (b) generation ----------------------------------------------------------------------------------------------
def generation_case(kind: str, batch: int, new_tokens: int = NEW_TOKENS, dtype: torch.dtype = torch.float32,
                    threads: int | None = None) -> Callable[[], float]:
    """One generate call, timed. dtype: the model's weights (`PaLM(...).to(dtype)`); threads: intra-op threads for
    the call (None: the process's), through models.threads.intra_op_threads on either side."""
    model = build(kind).eval().to(dtype)
    prompt = torch.randint(1, CONFIG["num_tokens"], (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    seq_len = PROMPT_LEN + new_tokens

    def run() -> float:
        # both with their defaults: top-k filter_thres 0.9, temperature 1; ours uses its KV cache, the reference has none
        with intra_op_threads(threads or torch.get_num_threads()):
            start = time.perf_counter()
            out = model.generate(seq_len, prompt=prompt)
            elapsed = time.perf_counter() - start
        assert out.shape == (batch, new_tokens), out.shape
        return elapsed
    return run


def weight_floor(dtype: torch.dtype, transposed: bool, threads: int, tokens: int = 64, repeats: int = 7) -> float:
    """Seconds per token to read the model's weights once through torch's matrix-vector products and nothing else:
    the 13 projections of one decoding step at one row (4 blocks x fused, attention out, feed-forward out, plus the
    tied output projection), as F.linear's (out, in) weights or transposed (in, out), best of `repeats` runs."""
    model = build("ours").to(dtype)
    weights = [w for block in model.layers for w in (block.fused_proj.weight, block.attn_out.weight,
                                                     block.ff_out.weight)] + [model.token_emb.weight]
    if transposed:
        weights = [w.t().contiguous() for w in weights]
        rows = [torch.randn(1, w.shape[0], dtype=dtype) for w in weights]
        step = lambda: [x @ w for x, w in zip(rows, weights)]  # noqa: E731
    else:
        rows = [torch.randn(1, w.shape[1], dtype=dtype) for w in weights]
        step = lambda: [torch.nn.functional.linear(x, w) for x, w in zip(rows, weights)]  # noqa: E731
    best = float("inf")
    with intra_op_threads(threads), torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for _ in range(tokens):
                step()
            best = min(best, (time.perf_counter() - start) / tokens)
    return best


# ---- (c) PPO -----------------------------------------------------------------------------------------------------
PPO_RUN = dict(num_episodes=1, max_timesteps=16, update_timesteps=16, max_batch_size=16,
               max_seq_len=PROMPT_LEN + NEW_TOKENS)


def prompts(n: int = 32, vocab: int = CONFIG["num_tokens"]) -> torch.Tensor:
    # no token 0: the reference strips its pad value (0) out of each prompt
    return torch.randint(1, vocab, (n, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def our_trainer(**palm_overrides) -> ours.RLHFTrainer:
    rm = ours.RewardModel(build("ours", seed=1, **palm_overrides))
    # one PPO epoch, to match the reference's default `epochs=1`; minibatch = max_batch_size = 16 on both sides
    return ours.RLHFTrainer(palm=build("ours", **palm_overrides), reward_model=rm,
                            prompt_token_ids=prompts(vocab=palm_overrides.get("num_tokens", CONFIG["num_tokens"])),
                            ppo=ours.PPOConfig(ppo_epochs=1))


def ref_trainer(**palm_overrides) -> ref.RLHFTrainer:
    rm = ref.RewardModel(build("ref", seed=1, **palm_overrides))
    return ref.RLHFTrainer(palm=build("ref", **palm_overrides), reward_model=rm,
                           prompt_token_ids=prompts(vocab=palm_overrides.get("num_tokens", CONFIG["num_tokens"])),
                           epochs=1, minibatch_size=16)


def ppo_case(kind: str) -> Callable[[], float]:
    trainer = our_trainer() if kind == "ours" else ref_trainer()

    def run() -> float:
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints every loss
            return timed(lambda: trainer.train(**PPO_RUN))
    return run


# ---- (d) experience memory ---------------------------------------------------------------------------------------
def ref_memory_bytes_formula(total_len: int, new_tokens: int, vocab: int, value_bins: int = 6) -> tuple[int, int]:
    """Bytes of one reference Memory, read off its RLHFTrainer.train: (elements, storage retained).

    Every position of the sequence keeps a vocab-sized fp32 distribution (`action_prob`), beside int64 ids, two bool
    masks, fp32 log-probs of the new tokens (a slice whose base row covers the whole sequence, so the whole row stays
    alive), a scalar reward and the pooled critic's value bins.
    """
    n, t = total_len, new_tokens
    common = n * 8 + n + n + n * vocab * 4 + 4 + value_bins * 4
    return common + t * 4, common + n * 4


def retained_bytes(tensors) -> int:
    """Bytes of the storages the tensors keep alive, each storage once (a slice keeps its whole base)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure_ref_memory(vocab: int, total_len: int) -> tuple[int, int]:
    """One real reference rollout: (bytes of its fields' elements, bytes of storage they retain)."""
    trainer = ref_trainer(num_tokens=vocab, dim=64, depth=1)
    captured = []
    trainer.learn = captured.extend  # keep the rollout's Memory instead of training on it
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.train(num_episodes=1, max_timesteps=1, update_timesteps=1, max_batch_size=1, max_seq_len=total_len)
    (memory,) = captured
    return sum(t.element_size() * t.nelement() for t in memory), retained_bytes(memory)


def measure_our_memory(vocab: int, total_len: int, batch: int = 4) -> tuple[int, int]:
    """Experience.nbytes() per rollout, and the storage it retains per rollout, from one real batch of rollouts."""
    trainer = our_trainer(num_tokens=vocab, dim=64, depth=1)
    idx = torch.arange(batch)
    exp, _ = trainer.rollout(trainer.prompts[idx], trainer.prompts_mask[idx], total_len - PROMPT_LEN)
    fields = [getattr(exp, f) for f in exp.__dataclass_fields__]
    return exp.nbytes() // batch, retained_bytes(fields) // batch


# ---- profile of our side, for targets that were missed -------------------------------------------------------------
def profile_ours(name: str, fn: Callable[[], float], rows: int = 12) -> str:
    """torch.profiler table of one run of our case: which operators the time goes to."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"\n### profile of ours: {name}\n\n```\n{table}\n```\n"


# ---- report --------------------------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float], scale: float) -> str:
    """min..max of a rate derived from seconds, for the reader to judge the noise."""
    rates = sorted(scale / x for x in xs)
    return f"{num(rates[0])}..{num(rates[-1])}"


def num(x: float) -> str:
    """Three significant figures or so, without scientific notation."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return (f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"nice {os.nice(0)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case, alternating ours / reference")
    parser.add_argument("--train-steps", type=int, default=3, help="optimiser steps per timed training run")
    parser.add_argument("--profile", action="store_true", help="profile our side of every case, met or not")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.train_steps < 1:
        parser.error("--repeats and --train-steps must be at least 1")

    torch.set_num_threads(THREADS)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens when piped to a file
    print(f"machine: {machine()}")
    print(f"config (both sides): {CONFIG}")
    load_before = os.getloadavg()
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3, best of 8): {peak / 1e9:.1f} GFLOP/s")
    rows, ours_runs = [], {}

    def measure(key, label, cases, units, target, warmup=True, extra=None):
        """Alternate the cases; one table row of ours against the reference, plus one per `extra` case of ours
        (name -> (label, target)) against the same reference runs."""
        times = alternate(cases, args.repeats, warmup)
        for name, (row_key, row_label, row_target) in {"ours": (key, label, target), **{
                k: (f"{key} {k[5:]}", lab, tgt) for k, (lab, tgt) in (extra or {}).items()}}.items():
            pair = {"ours": times[name], "ref": times["ref"]}
            rows.append(dict(key=row_key, label=row_label, times=pair, units=units, target=row_target,
                             rate={k: units / median(v) for k, v in pair.items()}))
            ours_runs[row_key] = cases[name]
        print(f"{key}: seconds per run, " + ", ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in times.items()))

    # (a) training: tokens are batch x positions predicted, per timed run of train_steps steps
    batch, seq = 4, 256
    measure("training", "training tokens/s (4 x 256, fwd+bwd+AdamW)",
            {k: training_case(k, batch, seq, args.train_steps) for k in ("ours", "ref")},
            args.train_steps * batch * seq, 1.0)
    # (b) generation, batch 1: fp32 and bf16 weights on our side against the reference in fp32, first with the
    # process's threads on both sides, then with one intra-op thread on both sides
    bf16 = torch.bfloat16
    for threads in (THREADS, 1):
        suffix = f", {threads} thread{'s' if threads > 1 else ''}"
        cases = {"ours": generation_case("ours", 1, threads=threads), "ref": generation_case("ref", 1, threads=threads),
                 "ours bf16": generation_case("ours", 1, dtype=bf16, threads=threads)}
        measure(f"generation b1 t{threads}", f"generation tokens/s, batch 1 (16 -> +128){suffix}", cases, NEW_TOKENS,
                7.0, extra={"ours bf16": (f"generation tokens/s, batch 1 (16 -> +128), ours in bf16{suffix}", 10.0)})
    # the batch-16 reference run is the slowest case, and batch 1 has already warmed both sides up
    measure("generation b16", "generation tokens/s, batch 16 (16 -> +128)",
            {k: generation_case(k, 16) for k in ("ours", "ref")}, 16 * NEW_TOKENS, None, warmup=False)
    # not a target: how the cache's advantage grows with the context the reference recomputes at every token
    long = 512 - PROMPT_LEN
    measure("generation b1 long", f"generation tokens/s, batch 1 (16 -> +{long})",
            {k: generation_case(k, 1, long) for k in ("ours", "ref")}, long, None, warmup=False)
    floors = {(dtype, transposed, threads): weight_floor(dtype, transposed, threads)
              for dtype in (torch.float32, bf16) for transposed in (False, True) for threads in (THREADS, 1)}
    # (c) PPO: 16 rollouts of 16 -> +128 tokens, then one learning pass
    with contextlib.redirect_stderr(io.StringIO()):  # accelerate's episode bar ignores TQDM_DISABLE
        measure("ppo", "PPO runs/s (16 rollouts + 1 update, 1 epoch)", {k: ppo_case(k) for k in ("ours", "ref")},
                1, 10.0, warmup=False)
    load_after = os.getloadavg()
    print_table(rows, peak, load_before, load_after)
    print_floors(rows, floors)
    print_memory()

    missed = [r["key"] for r in rows if r["target"] and r["rate"]["ours"] / r["rate"]["ref"] < r["target"]]
    for key in (ours_runs if args.profile else missed):
        print(profile_ours(key, ours_runs[key]))
    return 0


def print_memory(vocab: int = 20000, total: int = 512, small: int = 128) -> None:
    ref_measured = measure_ref_memory(vocab, small)
    ref_formula_small = ref_memory_bytes_formula(small, small - PROMPT_LEN, vocab)
    ref_elem, ref_kept = ref_memory_bytes_formula(total, total - PROMPT_LEN, vocab)
    our_elem, our_kept = measure_our_memory(vocab, total)
    ratio = ref_elem / our_elem
    print(f"\n(d) experience memory per rollout, vocab {vocab}, {PROMPT_LEN}-token prompt + {total - PROMPT_LEN} new "
          f"tokens = {total} (ours measured on a real rollout; the reference from its formula, below)\n")
    print("| per rollout | ours (Experience.nbytes) | reference (Memory) | ref / ours | target | met |")
    print("|---|---:|---:|---:|---:|:---:|")
    print(f"| bytes of the stored tensors | {our_elem:,} | {ref_elem:,} | {ratio:,.0f}x | >= 100x | "
          f"{'yes' if ratio >= 100 else 'NO'} |")
    print(f"| storage they keep alive | {our_kept:,} | {ref_kept:,} | {ref_kept / our_kept:,.0f}x | | |")
    check = "matches" if ref_measured == ref_formula_small else "DOES NOT MATCH"
    print(f"\nreference formula vs one real reference rollout at length {small}: measured {ref_measured[0]:,} / "
          f"{ref_measured[1]:,} bytes (tensors / retained), formula {ref_formula_small[0]:,} / "
          f"{ref_formula_small[1]:,}: {check}")


def print_table(rows, peak, load_before, load_after) -> None:
    print(f"\nmedians of {len(rows[0]['times']['ours'])} timed runs, [min..max] beside them; load average "
          f"(1, 5, 15 min) before {fmt_load(load_before)}, after {fmt_load(load_after)}\n")
    print("| benchmark | ours | reference | ours / ref | best / best | target | met |")
    print("|---|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        ratio = r["rate"]["ours"] / r["rate"]["ref"]
        # under load, noise only ever adds time: the fastest runs are the closest to an idle machine
        best = min(r["times"]["ref"]) / min(r["times"]["ours"])
        met = "" if r["target"] is None else ("yes" if ratio >= r["target"] else "NO")
        target = "" if r["target"] is None else f">= {r['target']:g}x"
        cells = [f"{num(r['rate'][k])} [{spread(r['times'][k], r['units'])}]" for k in ("ours", "ref")]
        print(f"| {r['label']} | {cells[0]} | {cells[1]} | {ratio:,.1f}x | {best:,.1f}x | {target} | {met} |")
    flops = train_flops_per_token(CONFIG, 256)
    share = {k: rows[0]["rate"][k] * flops / peak for k in ("ours", "ref")}
    print(f"| training model FLOP/s as a share of the matmul peak | {share['ours']:.1%} | {share['ref']:.1%} | | | "
          f">= 50% | {'yes' if share['ours'] >= 0.5 else 'NO'} |")
    print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s; model FLOPs per training token 6N + 12 L H Q T = "
          f"{flops / 1e6:.2f} MFLOP (N = {CONFIG['depth']} blocks' matmul weights + tied output projection, "
          f"H Q = heads x dim_head, T = 256)")


def print_floors(rows, floors) -> None:
    """Batch-1 decoding against the time it takes to read the weights once per token through torch's own
    matrix-vector products (weight_floor), in both weight layouts."""
    print("\n| batch-1 decoding, 16 -> +128 | threads | ours, ms/token: median [best] | floor, F.linear (out, in) | "
          "floor, (in, out) | ours / best floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, name in ((torch.float32, ""), (torch.bfloat16, " bf16")):
        for threads in sorted({t for (_, _, t) in floors}, reverse=True):
            row = next(r for r in rows if r["key"] == f"generation b1 t{threads}{name}")
            med, best = (1e3 * f(row["times"]["ours"]) / row["units"] for f in (median, min))
            lin, tr = (1e3 * floors[(dtype, t, threads)] for t in (False, True))
            print(f"| {str(dtype)[6:]} | {threads} | {med:.2f} [{best:.2f}] | {lin:.2f} | {tr:.2f} | "
                  f"{med / min(lin, tr):.2f}x |")


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    raise SystemExit(main())
