"""`gpt2 generate -n N`: N sequences decoded as one batch against the same N decoded one at a time.

Alternates the two in one process and prints medians of the decoding tokens/s and their ratio (run by hand):

    python benchmarks/bench_generate_n.py /tmp/gpt2-bench/distilgpt2.Q4_K_M.gguf -n 5 --runs 3

--clock cpu counts the process's CPU time of each whole `generate` call instead of the decoding's wall time:
on a machine shared with other work (and with NUMBA_NUM_THREADS=1) it measures our own cost, though it then
includes the prompt's prefill, which the batch does once and the sequences one at a time n times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from gpt2cli.generate import GenerationSettings, generate
from gpt2cli.gguf_file import ModelFile
from gpt2cli.model import GPT2Model

PROMPT = "Hello, I'm a language model,"


def decode_rate(
    model: GPT2Model, mf: ModelFile, ids: list[int], settings: GenerationSettings, cpu_clock: bool
) -> tuple[int, float]:
    """(generated tokens, seconds) of one `generate` call: the decoding's wall time (prefill excluded), or
    with cpu_clock the CPU time of the whole call."""
    start = time.process_time()
    gens = list(generate(model, mf.tokenizer, ids, settings))
    seconds = time.process_time() - start if cpu_clock else max(g.seconds for g in gens)
    return sum(len(g.token_ids) for g in gens), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .gguf file")
    parser.add_argument("-n", type=int, default=5, help="sequences")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    mf = ModelFile(args.model)
    model = GPT2Model(mf.weights, mf.config)
    ids = mf.tokenizer.encode(PROMPT)
    batched = GenerationSettings(max_new_tokens=args.tokens, num_return_sequences=args.n, seed=0)
    alone = replace(batched, num_return_sequences=1)
    for warm_up in (batched, alone):  # compile (or load) the kernels of both paths
        list(generate(model, mf.tokenizer, ids, replace(warm_up, max_new_tokens=2)))
    together, one_by_one = [], []
    for run in range(args.runs):
        tokens, seconds = decode_rate(model, mf, ids, replace(batched, seed=run), args.clock == "cpu")
        together.append(tokens / seconds)
        tokens = seconds = 0
        for i in range(args.n):
            t, s = decode_rate(model, mf, ids, replace(alone, seed=run * args.n + i), args.clock == "cpu")
            tokens, seconds = tokens + t, seconds + s
        one_by_one.append(tokens / seconds)
        print(
            f"run {run}: batch of {args.n} {together[-1]:.1f} tok/s, one at a time {one_by_one[-1]:.1f} tok/s"
        )
    a, b = statistics.median(together), statistics.median(one_by_one)
    print(f"median: batch {a:.1f} tok/s, one at a time {b:.1f} tok/s, ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
