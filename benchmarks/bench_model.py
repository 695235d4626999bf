"""Decode and prompt-processing tokens/s, peak RSS and start-up time, ours next to llama.cpp (run by hand).

Each measurement runs in a fresh process (so RSS is that run's own) with 2 threads on the same files, e.g.
those written by make_random_gguf.py; llama.cpp is driven through llama-cpp-python when it is installed.

    python benchmarks/bench_model.py /tmp/gpt2-bench/distilgpt2.*.gguf --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2


def tokens(n: int) -> list[int]:
    return [(7919 * i + 11) % 50000 for i in range(n)]  # any ids: speed does not depend on them


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(path: str, prompt: int, gen: int, runs: int) -> dict:
    from gpt2cli.gguf_file import ModelFile
    from gpt2cli.model import GPT2Model

    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config)
    cache = model.new_cache()
    model.forward(tokens(8), cache)  # compiles (or loads) every kernel the file needs
    model.forward([1], cache)
    tg = []
    for _ in range(runs):
        cache.reset()
        model.forward(tokens(8), cache, logits_from=7)
        t0 = time.perf_counter()
        for t in tokens(gen):
            model.forward([t], cache)
        tg.append(gen / (time.perf_counter() - t0))
    rss_generate = peak_rss_mb()
    pp = []
    for _ in range(runs):
        cache.reset()
        t0 = time.perf_counter()
        model.forward(tokens(prompt), cache, logits_from=prompt - 1)
        pp.append(prompt / (time.perf_counter() - t0))
    return {"tg": statistics.median(tg), "pp": statistics.median(pp), "rss": rss_generate}


def plain_cpu_llama(path: str):
    """llama.cpp on its plain CPU path, as bench_ppl loads it."""
    import llama_cpp
    from bench_ppl import plain_cpu_buffers

    plain_cpu_buffers(llama_cpp)
    return llama_cpp.Llama(
        model_path=path, n_ctx=1024, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )


def worker_llama(path: str, prompt: int, gen: int, runs: int) -> dict:
    llm = plain_cpu_llama(path)
    llm.eval(tokens(8))
    tg = []
    for _ in range(runs):
        llm.reset()
        llm.eval(tokens(8))
        t0 = time.perf_counter()
        for t in tokens(gen):
            llm.eval([t])
        tg.append(gen / (time.perf_counter() - t0))
    rss_generate = peak_rss_mb()
    pp = []
    for _ in range(runs):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens(prompt))
        pp.append(prompt / (time.perf_counter() - t0))
    return {"tg": statistics.median(tg), "pp": statistics.median(pp), "rss": rss_generate}


def run_worker(kind: str, path: Path, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", kind, str(path), "--prompt", str(args.prompt),
           "--gen", str(args.gen), "--runs", str(args.runs)]  # fmt: skip
    env = {**os.environ, "NUMBA_NUM_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS)}
    if kind == "ours":
        from gpt2cli.cli import THREAD_ENVIRONMENT  # as `gpt2 generate` runs

        env.update(THREAD_ENVIRONMENT)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{kind} failed on {path.name}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio_cells(ours: dict, ref: dict | None, key: str) -> list[str]:
    if ref is None:
        return [f"{ours[key]:.1f}", "", ""]
    return [f"{ours[key]:.1f}", f"{ref[key]:.1f}", f"{ours[key] / ref[key]:.2f}"]


def first_token_seconds(path: Path, numba_cache: str | None) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of `gpt2 generate` printing one token; a fresh NUMBA_CACHE_DIR makes
    it a cold start. Run as `python -m gpt2cli`, so it measures the gpt2cli this script imports (set
    PYTHONPATH to a checkout) and not the launcher in front of an installed `gpt2` (pyenv's shim alone
    takes ~0.1 s)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": str(THREADS)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # pip compiles an installed package's bytecode: so do we, once
    if numba_cache:
        env["NUMBA_CACHE_DIR"] = numba_cache
    cmd = [sys.executable, "-m", "gpt2cli", "generate", "Hello", "--model", str(path),
           "--max-new-tokens", "1", "--temperature", "0"]  # fmt: skip
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"gpt2 generate failed on {path.name} (status {status})")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens for prompt processing")
    parser.add_argument("--gen", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--startup", action="store_true", help="also time cold and warm start-up")
    parser.add_argument("--worker", choices=["ours", "llama"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.prompt, args.gen, args.runs) < 1:
        parser.error("--prompt, --gen and --runs must be at least 1 (each is a rate's denominator)")
    if args.worker:
        worker = worker_ours if args.worker == "ours" else worker_llama
        print(json.dumps(worker(str(args.files[0]), args.prompt, args.gen, args.runs)))
        return
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
    print(f"decode: {args.gen} tokens after an 8-token prompt; prompt processing: {args.prompt} tokens; "
          f"medians of {args.runs} runs, {THREADS} threads; RSS: peak while generating")  # fmt: skip
    columns = ["file", "MB", "decode tok/s", "llama.cpp", "ratio", "prompt tok/s", "llama.cpp", "ratio",
               "RSS MB", "llama.cpp RSS MB"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for path in args.files:
        ours = run_worker("ours", path, args)
        ref = run_worker("llama", path, args) if have_llama else None
        if ours is None:
            continue
        size = path.stat().st_size / 1e6
        row = [path.name, f"{size:.0f}", *ratio_cells(ours, ref, "tg"), *ratio_cells(ours, ref, "pp"),
               f"{ours['rss']:.0f}", f"{ref['rss']:.0f}" if ref else ""]  # fmt: skip
        print("| " + " | ".join(row) + " |", flush=True)
    if args.startup:
        path = args.files[0]
        with tempfile.TemporaryDirectory() as cold:
            cold_wall, cold_cpu = first_token_seconds(path, cold)
        first_token_seconds(path, None)
        warm = [first_token_seconds(path, None) for _ in range(args.runs)]
        warm_wall, warm_cpu = (statistics.median(run[i] for run in warm) for i in range(2))
        print(f"\nstart-up to the first token on {path.name}: warm {warm_wall:.2f} s ({warm_cpu:.2f} s CPU), "
              f"cold {cold_wall:.2f} s ({cold_cpu:.2f} s CPU)")  # fmt: skip


if __name__ == "__main__":
    main()
