"""Micro-benchmark of every registered block type (kernels.KERNELS); prints Markdown tables.

    python benchmarks/bench_kernels.py [--types Q4_0 Q8_0 ...] [--shapes 50257x768 3072x768] [--matmul]

Per type and shape: dequantization throughput (weights/s, median of --runs) against gguf-py on the same
blocks and against a numpy copy of as many f32 values (how much of the memory bandwidth it reaches), then
matvec in GB/s of weight bytes read. --matmul adds the fused matmul against "dequantize everything, then
numpy matmul". --int8 times instead the batched int8 product (kernels.tiles) against the f32 path that
gpt2cli.model takes otherwise (the fused kernels for short batches, else a tile of rows at a time dequantized
for numpy's BLAS), the two interleaved run by run so that a busy machine slows both alike:

    python benchmarks/bench_kernels.py --int8 --threads 1 --clock cpu --types Q4_K Q6_K \\
        --shapes 2304x768 3072x768 768x3072 --tokens 64 128 256 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from gguf import GGMLQuantizationType, quants

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpt2cli.kernels import KERNELS, BlockKernels  # noqa: E402
from gpt2cli.model import BLAS_MIN_TOKENS, SCRATCH_BYTES  # noqa: E402

# Wall time by default; --clock cpu takes the process's CPU time instead, which with --threads 1 measures the
# kernels' own speed even while other processes share the cores (wall times then jump by scheduler ticks).
CLOCK = time.perf_counter


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # compile, warm the caches
    times = []
    for _ in range(runs):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times)


def weights_like_a_model(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)


def stored_blocks(kernels: BlockKernels, rows: int, cols: int) -> np.ndarray:
    """u8[rows, row_bytes]: our quantizer's output, else gguf-py's, else random bytes (only speed counts)."""
    x = weights_like_a_model(rows, cols)
    if kernels.quantize is not None:
        blocks = np.empty((rows, kernels.row_bytes(cols)), dtype=np.uint8)
        kernels.quantize(x, blocks)
        return blocks
    try:
        return np.ascontiguousarray(quants.quantize(x, kernels.qtype)).view(np.uint8).reshape(rows, -1)
    except NotImplementedError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(rows, kernels.row_bytes(cols)), dtype=np.uint8)


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def bench_dequantize(kernels: BlockKernels, rows: int, cols: int, runs: int) -> str:
    blocks = stored_blocks(kernels, rows, cols)
    out = np.empty((rows, cols), dtype=np.float32)
    ours = median_seconds(lambda: kernels.dequantize(blocks, out), runs)
    oracle = median_seconds(lambda: quants.dequantize(blocks, kernels.qtype), max(1, runs // 4))
    source = np.ones((rows, cols), dtype=np.float32)
    copy = median_seconds(lambda: np.copyto(out, source), runs)
    return f"{rows * cols / ours / 1e9:.2f} G ({oracle / ours:.3g}x, {copy / ours:.2f})"


def bench_matvec(kernels: BlockKernels, rows: int, cols: int, runs: int) -> str:
    blocks = stored_blocks(kernels, rows, cols)
    x = np.random.default_rng(1).standard_normal(cols, dtype=np.float32)
    y = np.empty(rows, dtype=np.float32)
    seconds = median_seconds(lambda: kernels.matvec(blocks, x, y), runs)
    return f"{blocks.nbytes / seconds / 1e9:.1f} GB/s ({seconds * 1e3:.2f} ms)"


def bench_type(kernels: BlockKernels, shapes: list[tuple[int, int]], runs: int) -> list[str]:
    cells = [kernels.qtype.name]
    cells += [bench_dequantize(kernels, rows, cols, runs) for rows, cols in shapes]
    cells += [bench_matvec(kernels, rows, cols, runs) for rows, cols in shapes]
    return cells


def bench_matmul(kernels: BlockKernels, shape: tuple[int, int], tokens: list[int], runs: int) -> list[str]:
    rows, cols = shape
    blocks = stored_blocks(kernels, rows, cols)
    scratch = np.empty((rows, cols), dtype=np.float32)
    cells = [kernels.qtype.name]
    for n in tokens:
        x = np.random.default_rng(2).standard_normal((n, cols), dtype=np.float32)
        y = np.empty((n, rows), dtype=np.float32)

        def dequantize_then_numpy(x: np.ndarray = x, y: np.ndarray = y) -> None:
            kernels.dequantize(blocks, scratch)
            np.matmul(x, scratch.T, out=y)

        fused = median_seconds(lambda x=x, y=y: kernels.matmul(blocks, x, y), max(3, runs // 2))
        numpy = median_seconds(dequantize_then_numpy, max(3, runs // 2))
        cells.append(f"{fused * 1e3:.1f} / {numpy * 1e3:.1f}")
    return cells


def interleaved_medians(fns: list[Callable[[], object]], runs: int) -> list[float]:
    for fn in fns:
        fn()  # compile, warm the caches
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, spent in zip(fns, times, strict=True):
            start = CLOCK()
            fn()
            spent.append(CLOCK() - start)
    return [statistics.median(spent) for spent in times]


def bench_int8(kernels: BlockKernels, shape: tuple[int, int], tokens: list[int], runs: int) -> list[str]:
    """Per batch size: int8 ms / f32 ms (f32 time over int8 time: > 1 where int8 wins), the f32 path being
    the one gpt2cli.model takes without int8: the fused kernels below BLAS_MIN_TOKENS, else a tile of rows at
    a time dequantized for numpy's BLAS."""
    rows, cols = shape
    blocks = stored_blocks(kernels, rows, cols)
    scratch = np.empty(SCRATCH_BYTES // 4, dtype=np.float32)
    tile_rows = max(1, min(rows, scratch.size // cols))
    cells = [f"{kernels.qtype.name} {rows}x{cols}"]
    for n in tokens:
        x = np.random.default_rng(2).standard_normal((n, cols), dtype=np.float32)
        y = np.empty((n, rows), dtype=np.float32)

        def dequantize_then_blas(x: np.ndarray = x, y: np.ndarray = y) -> None:
            for r0 in range(0, rows, tile_rows):
                r1 = min(r0 + tile_rows, rows)
                tile = scratch[: (r1 - r0) * cols].reshape(r1 - r0, cols)
                kernels.dequantize(blocks[r0:r1], tile)
                np.matmul(x, tile.T, out=y[:, r0:r1])

        def fused(x: np.ndarray = x, y: np.ndarray = y) -> None:
            kernels.matmul(blocks, x, y)

        int8, f32 = interleaved_medians(
            [
                lambda x=x, y=y: kernels.int8_matmul(blocks, x, y),
                fused if n < BLAS_MIN_TOKENS else dequantize_then_blas,
            ],
            runs,
        )
        cells.append(f"{int8 * 1e3:.1f} / {f32 * 1e3:.1f} ({f32 / int8:.2f}x)")
    return cells


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--types", nargs="+", help="type names (default: every registered type)")
    parser.add_argument("--shapes", nargs="+", default=[(50257, 768), (3072, 768)], type=parse_shape)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--matmul", action="store_true", help="also time matmul for --tokens")
    parser.add_argument("--matmul-shape", default=(3072, 768), type=parse_shape)
    parser.add_argument("--tokens", nargs="+", type=int, default=[8, 64, 512])
    parser.add_argument("--int8", action="store_true", help="int8_matmul against dequantize + BLAS")
    parser.add_argument("--threads", type=int, help="numba threads (default: all cores)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time

    names = [name.upper() for name in args.types] if args.types else [q.name for q in KERNELS]
    selected = [KERNELS[GGMLQuantizationType[name]] for name in names]
    print(f"numba threads: {numba.get_num_threads()}, {args.clock} clock")
    if args.int8:
        print(f"\nint8_matmul ms / f32 ms (fused below {BLAS_MIN_TOKENS} tokens, else dequantize + BLAS;")
        print("> 1x where int8 wins)\n")
        header = ["type, shape"] + [f"n={n}" for n in args.tokens]
        print(markdown_table(header, []))
        for k in selected:
            for shape in args.shapes if k.int8_matmul is not None else []:
                print(markdown_table(header, [bench_int8(k, shape, args.tokens, args.runs)]).splitlines()[-1])
        return
    print("dequantize: weights/s (speed-up over gguf-py, fraction of a numpy copy of as many f32)\n")

    header = ["type"] + [f"dequantize {rows}x{cols}" for rows, cols in args.shapes]
    header += [f"matvec {rows}x{cols}" for rows, cols in args.shapes]
    print(markdown_table(header, [bench_type(k, args.shapes, args.runs) for k in selected]))

    if args.matmul:
        rows, cols = args.matmul_shape
        print(f"\nmatmul {rows}x{cols}, ms: fused kernel / dequantize whole matrix + numpy matmul\n")
        header = ["type"] + [f"n={n}" for n in args.tokens]
        table = [bench_matmul(k, args.matmul_shape, args.tokens, args.runs) for k in selected]
        print(markdown_table(header, table))


if __name__ == "__main__":
    main()
