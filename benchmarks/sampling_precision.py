"""Which precision the pipeline should sample in: fp32 against bf16 weights, at the batch sizes the stages use.

    python benchmarks/sampling_precision.py [--repeats 5] [--new-tokens 64]

The demo preset's model (tasks.config.demo().pretrain.model, random weights: the time does not depend on them),
32-token left-padded prompts, `max_new_tokens` new tokens each (no end-of-text, so every row runs to the cap), the
full distribution as the stages sample it, under `sampling_threads` as the stages run it. Batch 1 is serving, 32 a
PPO rollout batch, 64 a feedback or evaluation batch. The bf16 case casts a copy of the fp32 model, as the pipeline
does, and that cast is inside the timed call. Each case alternates fp32 / bf16 in one process; prints a markdown
table of medians, [min..max], and bf16's speed-up.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from models.palm import PaLM  # noqa: E402
from models.threads import sampling_threads  # noqa: E402
from tasks.config import demo  # noqa: E402

PROMPT_TOKENS = 32


def sample_once(model: PaLM, batch: int, new_tokens: int, dtype: torch.dtype) -> float:
    prompts = torch.randint(1, 256, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(prompts, dtype=torch.bool)
    mask[::2, :4] = False  # half the rows padded, as prompts of different lengths are
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad(), sampling_threads(batch):
        sampler = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        sampler.sample(prompts, mask, new_tokens, filter_thres=0.0, generator=generator)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = PaLM.from_config(demo().pretrain.model).eval()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; PaLM {demo().pretrain.model}; {PROMPT_TOKENS} -> +{args.new_tokens} tokens\n")
    print("| batch | fp32 ms/token | bf16 ms/token | bf16 speed-up (medians) |")
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        times = {torch.float32: [], torch.bfloat16: []}
        for dtype in times:  # warm-up
            sample_once(model, batch, 8, dtype)
        for _ in range(args.repeats):
            for dtype in times:
                times[dtype].append(sample_once(model, batch, args.new_tokens, dtype) * 1e3 / args.new_tokens)
        med = {d: statistics.median(t) for d, t in times.items()}
        cell = {d: f"{med[d]:.2f} [{min(t):.2f}..{max(t):.2f}]" for d, t in times.items()}
        print(f"| {batch} | {cell[torch.float32]} | {cell[torch.bfloat16]} | "
              f"{med[torch.float32] / med[torch.bfloat16]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
