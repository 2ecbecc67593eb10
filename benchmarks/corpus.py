"""A corpus larger than memory wants: preparing it (digest, sample, tokenizer, token file) in bounded memory, and what a
stage after pretraining spends before its first step.

    python benchmarks/corpus.py [--gigabytes 1.0] [--tokenizers bytes,bpe] [--old CHECKOUT] [--old-only]
                                [--corpus-dir DIR] [--limit-gb 14]

It writes a generated corpus of text files (English-like words drawn from a Zipf distribution over a 50,000-word
vocabulary, paragraphs, documents between <|endoftext|> markers, no two files alike) into a folder, then runs each
measurement in a fresh process and reports its wall time and peak resident memory (ru_maxrss):

- prepare, bytes / bpe: pretraining's corpus preparation into a local store, in its two passes: the scan (digest and
  text sample) with the tokenizer made from the sample (tasks/pretrain.py::plan_corpus: a BPE is trained here), then
  the token file (prepare_corpus, which reuses the scan); "tokenize MB/s" is the corpus size over the second pass;
- later stage: what the reward and evaluation stages now do with the corpus before their first step: read the
  recorded text sample and check its sha256 (tasks/storage/inputs.py::corpus_sample), cut 2,048 prompts from it
  (make_prompts) and build the built-in rater from it (load_labeler);
- with --old CHECKOUT (a checkout of the code before the token file, e.g. `git worktree add /tmp/old 1679b8f`): the
  same two steps as that code did them: the whole corpus read into one string and a Python list of byte ids
  (pretrain.load_corpus), and every later stage re-reading and re-hashing the whole corpus (training_corpus), then
  cutting its prompts and building its rater from all of it.

--limit-gb caps each measuring process's address space (RLIMIT_AS), so that a step that would take more memory than
the machine can spare fails with a MemoryError instead of pushing other work out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 64 << 20
LETTERS = "etaoinshrdlucmfwypvbgk"


def generate(root: Path, gigabytes: float) -> Path:
    """Text files of made-up English-like prose, about FILE_BYTES each: words drawn from a Zipf distribution (as
    natural text's are), paragraphs of 8-60 words, a document every 4.5 paragraphs on average, documents separated by
    <|endoftext|>. Every file is new text, so no paragraph repeats across the corpus (a repeated block would let the
    old code's paragraph de-duplication and the BPE's word cache look better than on real text). Reused when the
    folder already holds a corpus of this size. Returns the folder of text files (root/text)."""
    folder, marker = root / "text", root / "generated.json"
    if marker.exists() and json.loads(marker.read_text())["gigabytes"] == gigabytes:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.txt"):
        old.unlink()
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 10, size=50_000)
    vocab = np.array(["".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), size=n)) for n in lengths],
                     dtype=object)
    weights = 1 / np.arange(1, len(vocab) + 1) ** 1.05
    cdf = np.cumsum(weights / weights.sum())
    written, index = 0, 0
    while written < gigabytes * (1 << 30):
        parts, size = [], 0
        while size < FILE_BYTES:
            n = 1 << 18
            words = vocab[np.minimum(np.searchsorted(cdf, rng.random(n)), len(vocab) - 1)]
            ends = np.cumsum(rng.integers(8, 61, size=n // 8))
            ends = ends[ends < n]
            seps = np.full(n, " ", dtype=object)
            seps[ends] = ".\n"
            seps[ends[rng.random(len(ends)) < 1 / 4.5]] = ".<|endoftext|>"
            seps[-1] = ".<|endoftext|>"
            chunk = "".join((words + seps).tolist())
            parts.append(chunk)
            size += len(chunk)
        text = f"{index} " + "".join(parts)
        (folder / f"part-{index:04d}.txt").write_text(text)
        written, index = written + len(text.encode()), index + 1
    marker.write_text(json.dumps({"gigabytes": gigabytes, "bytes": written}))
    return folder


# what a later stage does with the corpus text it got (`text`, timed from `start`), the same in the new and old code
_PROMPTS_AND_RATER = """
read = time.perf_counter()
prompts = make_prompts(text, 2048, 32, split="train", seed=0)
cut = time.perf_counter()
rater = load_labeler("builtin:real-words", text)
done = time.perf_counter()
print(json.dumps({"seconds": done - start, "read_seconds": read - start, "prompts_seconds": cut - read,
                  "rater_seconds": done - cut, "prompts": len(prompts), "text_chars": len(text)}))
"""

PREPARE = """
import json, sys, time
import numpy as np
from tasks.config import apply_overrides, tiny
from tasks.pretrain import plan_corpus, prepare_corpus
config = apply_overrides(tiny(), [f"pretrain.corpus={sys.argv[1]}", f"pretrain.tokenizer={sys.argv[2]}",
                                  "pretrain.vocab_size=4096" if sys.argv[2] == "bpe" else "pretrain.steps=1"]).pretrain
start = time.perf_counter()
plan_corpus(config)  # pass 1: digest and sample, and the tokenizer (a BPE is trained on the sample)
scanned = time.perf_counter()
corpus = prepare_corpus(config)  # pass 2: the token file (the scan above is reused)
done = time.perf_counter()
tokens = corpus.tokens
print(json.dumps({"seconds": done - start, "pass1_seconds": scanned - start, "pass2_seconds": done - scanned,
                  "tokens": tokens["count"], "token_file_bytes": tokens["count"] * np.dtype(tokens["dtype"]).itemsize,
                  "sample_chars": corpus.sample["chars"], "record": corpus.records()["corpus"]}))
"""

LATER = """
import json, sys, time
from types import SimpleNamespace
from tasks.data.labeler import load_labeler
from tasks.data.prompts import make_prompts
from tasks.storage.inputs import corpus_sample
record = json.loads(sys.argv[1])
start = time.perf_counter()
text, _ = corpus_sample(SimpleNamespace(manifest={"corpus": record}, ref="bench"))  # the recorded sample
""" + _PROMPTS_AND_RATER

OLD_PREPARE = """
import json, sys, time
from tasks.config import apply_overrides, tiny
from tasks.pretrain import load_corpus
config = apply_overrides(tiny(), [f"pretrain.corpus={sys.argv[1]}"]).pretrain
start = time.perf_counter()
corpus = load_corpus(config)
done = time.perf_counter()
print(json.dumps({"seconds": done - start, "tokens": len(corpus.tokens), "digest": corpus.digest}))
"""

OLD_LATER = """
import json, sys, time
from types import SimpleNamespace
from tasks.data.labeler import load_labeler
from tasks.data.prompts import make_prompts
from tasks.storage.inputs import training_corpus
start = time.perf_counter()
text, _ = training_corpus(SimpleNamespace(manifest={"corpus": {"uri": sys.argv[1], "digest": sys.argv[2]}},
                                          ref="bench"))  # the whole corpus again, re-hashed
""" + _PROMPTS_AND_RATER


PEAK = """
import json, resource
print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)}))
"""


def measure(script: str, args: list[str], code: Path, env: dict, limit_gb: float | None) -> dict:
    """Run a measurement in a fresh process; its own peak resident memory (ru_maxrss, kilobytes on Linux)."""
    def cap():
        if limit_gb:
            limit = int(limit_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script) + PEAK, *args], cwd=code, env=env,
                          capture_output=True, text=True, preexec_fn=cap)
    wall = time.perf_counter() - start
    if done.returncode:
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"error": error, "process_seconds": wall}
    lines = done.stdout.strip().splitlines()
    return {**json.loads(lines[-2]), **json.loads(lines[-1]), "process_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--tokenizers", default="bytes,bpe", help="which preparations to run, comma-separated")
    parser.add_argument("--old", type=Path, help="a checkout of the code before the token file, to compare")
    parser.add_argument("--old-only", action="store_true", help="with --old: measure only the old code")
    parser.add_argument("--old-steps", default="prepare,later", help="with --old: which of its steps to run")
    parser.add_argument("--corpus-dir", type=Path, help="generate the corpus here (and reuse it) instead of a "
                        "temporary folder; it is not deleted")
    parser.add_argument("--limit-gb", type=float, help="cap each measuring process's address space")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="palm-rlhf-corpus-bench-") as tmp:
        started = time.perf_counter()
        corpus = generate(args.corpus_dir or Path(tmp, "corpus"), args.gigabytes)
        size = sum(f.stat().st_size for f in corpus.glob("part-*.txt"))
        print(f"corpus: {size / (1 << 30):.2f} GiB in {corpus} ({time.perf_counter() - started:.0f} s to generate "
              f"or find)", file=sys.stderr)
        env = {**os.environ, "PALM_RLHF_HOME": str(Path(tmp, "home")), "PALM_RLHF_PROGRESS": "0",
               "PYTHONPATH": str(ROOT)}
        rows = []
        record = None
        if not args.old_only:
            for kind in [k for k in args.tokenizers.split(",") if k]:
                r = measure(PREPARE, [str(corpus), kind], ROOT, env, args.limit_gb)
                rows.append((f"new: prepare, {kind} tokenizer", r))
                record = record or r.get("record")
                print(f"{kind}: {r}", file=sys.stderr)
            if record:
                rows.append(("new: later stage (recorded sample: read, prompts, rater)",
                             measure(LATER, [json.dumps(record)], ROOT, env, args.limit_gb)))
        if args.old:
            old_env = {**env, "PYTHONPATH": str(args.old)}
            r = measure(OLD_PREPARE, [str(corpus)], args.old, old_env, args.limit_gb)
            if "prepare" in args.old_steps:
                rows.append(("old: prepare, bytes (load_corpus: one string, a list of byte ids)", r))
            print(f"old: {r}", file=sys.stderr)
            if "digest" in r and "later" in args.old_steps:
                rows.append(("old: later stage (whole corpus: read, hash, prompts, rater)",
                             measure(OLD_LATER, [str(corpus), r["digest"]], args.old, old_env, args.limit_gb)))
    load = os.getloadavg()
    print(f"corpus: {size / (1 << 30):.2f} GiB ({size / 1e9:.2f} GB) of text in {FILE_BYTES >> 20} MiB files; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| step | wall time, s | pass 1 / pass 2, s | tokenize MB/s | peak RSS, GiB | tokens | token file, MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    megabytes = size / 1e6
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | failed after {r['process_seconds']:.0f} s: {r['error']} | | | | | |")
            continue
        phases, rate = "", ""
        if "pass2_seconds" in r:
            phases = f"{r['pass1_seconds']:.1f} / {r['pass2_seconds']:.1f}"
            rate = f"{megabytes / r['pass2_seconds']:.1f}"
        elif "read_seconds" in r:
            phases = f"read {r['read_seconds']:.1f}, prompts {r['prompts_seconds']:.1f}, rater {r['rater_seconds']:.1f}"
        elif name.startswith("old: prepare"):
            rate = f"{megabytes / r['seconds']:.1f}"
        file_mib = f"{r['token_file_bytes'] / (1 << 20):.0f}" if "token_file_bytes" in r else ""
        print(f"| {name} | {r['seconds']:.1f} | {phases} | {rate} | {r['peak_rss_gb']:.2f} | {r.get('tokens', '')} "
              f"| {file_mib} |")
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "load": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
