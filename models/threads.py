"""Intra-op threads for small-batch sampling on a CPU.

Decoding one token for a few rows is a chain of small operators (about a hundred per token); with more than one
intra-op thread every one of them is a parallel region whose threads must all arrive before it ends, and on a shared
machine the other cores are often busy. One thread then decodes faster. Measured on this project's 2-core CPU
(PaLM(256, dim 256, depth 4), fp32, 16 -> +128 tokens, benchmarks/RESULTS.md has the runs): one thread against two
is 1.6x faster at batch 1, 1.9x at batch 4 and 1.5x at batch 16 with the machine busy (load 6), and about level
at batch 16 when idle. Training and large-batch scoring are GEMMs that two threads do run faster, so this is a
scope around sampling, not a process setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(n: int = 1) -> Iterator[None]:
    """Run the body with `n` intra-op threads, then put the previous count back (also on an exception).

    torch's intra-op thread count is per process: other Python threads running torch operators meanwhile get the
    same count.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"intra-op threads must be a positive integer, got {n!r}")
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sampling_threads(batch: int, device: torch.device | str = "cpu", *, up_to: int = 16):
    """One intra-op thread for sampling `batch` rows on a CPU when batch <= up_to; elsewhere, leave threads alone.

        with sampling_threads(prompts.shape[0], device):
            gen = palm.sample(prompts, mask, 64)
    """
    if torch.device(device).type == "cpu" and batch <= up_to:
        return intra_op_threads(1)
    return intra_op_threads(torch.get_num_threads())
