"""`gpt2 quantize` against llama.cpp's quantizer on a full-size random model (run by hand; Markdown out).

    python benchmarks/bench_quantize.py [--shape distilgpt2] [--types Q4_K_M Q8_0] [--runs 3] [--out /tmp/...]

Writes a random distilgpt2- (or gpt2-) shaped F32 GGUF under --out (never in the repository), then for each
file type times llama_model_quantize (llama-cpp-python, llama-quantize's code, --threads threads) and our
quantize_checkpoint on the same file in the same run, median of --runs after a warm-up (numba compiles on
first use). Ours also measures every tensor's error, as the command does. Both files are then compared
tensor by tensor. Target: ours at most 2x llama.cpp's time for Q4_K_M.

Quality (our KLD from F32 no worse than llama-quantize's) needs real weights: on random ones both files are
byte-identical anyway, which the last column checks.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from synthetic import build_gguf  # noqa: E402

from gpt2cli.gguf_file import GPT2Config  # noqa: E402
from gpt2cli.gguf_reader import read_gguf  # noqa: E402
from gpt2cli.quant_types import file_type  # noqa: E402
from gpt2cli.quantize import load_source, quantize_checkpoint  # noqa: E402

SHAPES = {"distilgpt2": GPT2Config(n_layer=6), "gpt2": GPT2Config(n_layer=12)}


def llama_quantize(llama_cpp, src: Path, dst: Path, ftype: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(ftype).id)
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: numba compiles (or loads its cache), the page cache holds the source
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def same_tensors(a: Path, b: Path) -> bool:
    ca, cb = read_gguf(a), read_gguf(b)
    return ca.tensors.keys() == cb.tensors.keys() and all(
        info.qtype == cb.tensors[name].qtype
        and np.array_equal(info.blocks(ca.data), cb.tensors[name].blocks(cb.data))
        for name, info in ca.tensors.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="distilgpt2")
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q8_0", "Q2_K"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpt2-bench-quantize"))
    args = parser.parse_args()

    import llama_cpp

    quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    numba.set_num_threads(args.threads)

    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / f"{args.shape}.F32.gguf"
    if not src.is_file():
        build_gguf(src, config=SHAPES[args.shape])
    checkpoint = load_source(str(src))

    print(f"{args.shape} (random weights), {args.threads} threads, median of {args.runs} runs\n")
    print("| type | llama.cpp (s) | gpt2 quantize (s) | ratio | file (MB) | bits/weight | same bytes |")
    print("|---|---|---|---|---|---|---|")
    for ftype in args.types:
        ft = file_type(ftype)
        theirs, ours = args.out / f"llama.{ft.name}.gguf", args.out / f"ours.{ft.name}.gguf"

        def run_llama(ft=ft, theirs=theirs):
            llama_quantize(llama_cpp, src, theirs, ft.name, args.threads)

        def run_ours(ft=ft, ours=ours):
            return quantize_checkpoint(checkpoint, ft, ours)

        t_llama, t_ours = median_seconds(run_llama, args.runs), median_seconds(run_ours, args.runs)
        report = run_ours()
        same = "yes" if same_tensors(theirs, ours) else "NO"
        print(
            f"| {ft.name} | {t_llama:.2f} | {t_ours:.2f} | {t_ours / t_llama:.2f} | "
            f"{report.file_size / 1e6:.1f} | {report.bits_per_weight:.2f} | {same} |"
        )
    del quiet


if __name__ == "__main__":
    main()
