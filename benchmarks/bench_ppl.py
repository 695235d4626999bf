"""`gpt2 ppl` throughput next to llama.cpp's prompt processing on the same GGUF, in the same run (by hand).

Both evaluate the same windows of WikiText tokens (random ids without ../shared/data): ours is `perplexity()`
with the hf protocol at ctx = stride = 1024 (logits and log-softmax of every scored position included);
llama.cpp, through llama-cpp-python, evaluates each window's tokens from an empty KV cache, once computing
only the last position's logits (prompt processing, as llama-bench's pp) and once all of them (what a
perplexity run needs). The runs alternate window by window so that other load on the machine hits them alike.
The file is a full-size random distilgpt2-shaped GGUF, written under /tmp on first use (never commit it).

    python benchmarks/bench_ppl.py [--qtype Q8_0] [--windows 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WIKITEXT_TOKENS = 283_287  # wiki.test.raw with CRLF read as LF


def plain_cpu_buffers(llama_cpp) -> None:
    """Load weights without llama.cpp's extra buffer types (`use_extra_bufts = false`, as --no-repack).

    The llama-cpp-python 0.3.36 wheel here is built with AMX_INT8 and REPACK, and segfaults in llama_decode on
    every quantized file (F32/F16 run) on these VMs; its Llama() exposes no switch, so the default model
    params it starts from are patched.
    """
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qtype", default="Q8_0", choices=["F32", "Q8_0"])
    parser.add_argument("--windows", type=int, default=4, help="windows of 1024 tokens to time")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads and Numba's")
    parser.add_argument(
        "--blas-threads", type=int, help="OpenBLAS threads for our prefill (default: --threads)"
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gpt2-ppl-bench"))
    parser.add_argument(
        "--llama-extra-buffers",
        action="store_true",
        help="let llama.cpp repack weights (AMX/AVX-512 buffers); off by default, see plain_cpu_buffers",
    )
    args = parser.parse_args()
    # Before numpy and numba start their thread pools.
    blas_threads = args.blas_threads or args.threads
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(blas_threads)
    from gpt2cli.cli import THREAD_ENVIRONMENT  # as `gpt2 ppl` runs

    os.environ.update(THREAD_ENVIRONMENT)

    import numpy as np
    from conftest import shared_data_dir
    from gguf import GGMLQuantizationType
    from synthetic import build_gguf

    from gpt2cli.gguf_file import GPT2Config, ModelFile
    from gpt2cli.model import GPT2Model
    from gpt2cli.ppl import PplSettings, perplexity, tokenize_file

    path = args.dir / f"distilgpt2-random.{args.qtype}.gguf"
    if not path.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build_gguf(path, GGMLQuantizationType[args.qtype], config=GPT2Config(n_layer=6))
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config)
    ctx = 1024
    n_tokens = args.windows * ctx
    wikitext = shared_data_dir() / "wikitext" / "wiki.test.raw"
    if wikitext.is_file():
        ids, source = tokenize_file(wikitext, mf.tokenizer, max_tokens=n_tokens), "WikiText-2 test"
    else:
        ids, source = np.random.default_rng(0).integers(0, 50256, n_tokens), "random ids"
    settings = PplSettings("hf", ctx, ctx)
    perplexity(model, ids[:64], PplSettings("hf", 64, 64))  # compile the kernels

    import llama_cpp

    if not args.llama_extra_buffers:
        plain_cpu_buffers(llama_cpp)

    def llama(logits_all: bool):
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=ctx,
            n_batch=ctx,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            logits_all=logits_all,
            verbose=False,
        )

    llama_pp, llama_all = llama(False), llama(True)
    ours_s, pp_s, all_s, evaluated = [], [], [], []
    for begin in range(0, len(ids) - 1, ctx):
        window = ids[begin : begin + ctx]
        result = perplexity(model, window, settings)
        ours_s.append(result.seconds)
        evaluated.append(result.evaluated_tokens)
        inputs = window[:-1].tolist()
        for llm, seconds in ((llama_pp, pp_s), (llama_all, all_s)):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(inputs)
            seconds.append(time.perf_counter() - t0)

    tokens = sum(evaluated)
    ours = tokens / sum(ours_s)
    pp = tokens / sum(pp_s)
    pp_all = tokens / sum(all_s)
    print(
        f"{args.qtype} distilgpt2-shaped random GGUF, {len(evaluated)} windows of {ctx} {source} tokens, "
        f"{args.threads} threads ({blas_threads} for OpenBLAS)"
        + ("" if args.llama_extra_buffers else "; llama.cpp without extra (repacked) weight buffers")
        + "\n"
    )
    print("| run | tokens/s | ours / this |")
    print("|---|---:|---:|")
    print(f"| ours: gpt2 ppl, hf protocol, stride {ctx} | {ours:,.0f} | 1.00 |")
    print(f"| llama.cpp prompt processing (last logits) | {pp:,.0f} | {ours / pp:.2f} |")
    print(f"| llama.cpp prompt processing (all logits) | {pp_all:,.0f} | {ours / pp_all:.2f} |")
    window_s = statistics.median(ours_s)
    print(
        f"\nours: median {window_s:.2f} s per window; the whole WikiText-2 test file "
        f"({WIKITEXT_TOKENS:,} tokens, hf, stride {ctx}) takes {WIKITEXT_TOKENS / ours / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
